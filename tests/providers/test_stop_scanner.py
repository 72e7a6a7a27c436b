"""The worker process's pure parts, tested on their own."""

from __future__ import annotations

import pytest

from tokenrelay.providers.local.worker import StopScanner


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "found"),
    [
        (["Hello", " wor", "ld"], (" world",), "Hello", True),
        (["a, 1", "0, 1", "1"], (", 12",), "a, 10, 11", False),
        (["ab", "cX", "Yd"], ("XY", "bc"), "a", True),
        (["x<", "|e", "nd|", ">"], ("<|end|>",), "x", True),
    ],
)
def test_stop_scanner_holds_back_only_possible_stops(
    pieces: list[str], stops: tuple[str, ...], sent: str, found: bool
) -> None:
    scanner = StopScanner(stops)
    out = []
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            break
    else:
        out.append(scanner.flush(""))
    assert "".join(out) == sent
    assert hit is found
