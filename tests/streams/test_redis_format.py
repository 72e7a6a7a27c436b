"""The layout of log entries in Redis: many chunks per entry, numbered by the last one."""

from __future__ import annotations

from tokenrelay.streams.redis_format import END_FIELDS, decode, encode


def _entry(last: int, chunks: list[bytes]) -> tuple[bytes, dict[bytes, bytes]]:
    fields = encode(chunks)
    return b"0-%d" % last, {bytes(k): bytes(v) for k, v in fields.items()}  # type: ignore[arg-type]


def test_a_resume_inside_an_entry_gets_only_the_chunks_after_it() -> None:
    entries = [_entry(3, [b"a", b"", b"ccc"]), _entry(5, [b"dd", b"e\n\n"])]
    everything = [(1, b"a"), (2, b""), (3, b"ccc"), (4, b"dd"), (5, b"e\n\n")]
    assert decode(entries, 0) == (everything, False)
    assert decode(entries, 2) == ([(3, b"ccc"), (4, b"dd"), (5, b"e\n\n")], False)
    assert decode(entries, 5) == ([], False)


def test_a_batch_written_twice_is_read_once() -> None:
    """A flush whose reply was lost is sent again with the chunks appended since."""
    entries = [_entry(2, [b"a", b"b"]), _entry(4, [b"a", b"b", b"c", b"d"]), (b"0-5", END_FIELDS)]
    assert decode(entries, 0) == ([(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d")], True)
