"""The deterministic text the fake upstream streams and the load generator checks.

Both sides compute the same tokens from ``(seed, index)``, so every stream's text can be verified
exactly without either side keeping a copy. The vocabulary holds a few words that a gateway could
mangle if it re-encoded JSON or SSE carelessly: quotes, backslashes, non-ASCII, control characters,
and text that looks like SSE framing.
"""

from __future__ import annotations

__all__ = ["VOCABULARY", "token", "text", "parse_prompt", "prompt"]

VOCABULARY: tuple[str, ...] = (
    "the ", "relay ", "streams ", "tokens ", "quickly ", "and ", "never ", "buffers ",
    "a ", "chunk ", "of ", "text ", "to ", "every ", "reader ", "while ",
    "upstream ", "keeps ", "writing ", "more ", "words ", "in ", "order ", "without ",
    "naïve ", "café ", "über ", "日本語 ", "🚀 ", "“smart” ", 'say "hi" ', "back\\slash ",
    "tab\t", "new\nline ", "data: ", ": colon ", "</script> ", "{json} ", "[DONE] ", "\\n ",
    "alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta ", "eta ", "theta ",
    "iota ", "kappa ", "lambda ", "mu ", "nu ", "xi ", "omicron ", "pi ",
    "rho ", "sigma ", "tau ", "upsilon ", "phi ", "chi ", "psi ", "omega. ",
)  # fmt: skip


def token(seed: int, index: int) -> str:
    """The ``index``-th token of the stream named by ``seed``."""
    # A cheap mixing step so neighbouring seeds give different texts.
    return VOCABULARY[(seed * 2654435761 + index * 40503) % 4294967291 % len(VOCABULARY)]


def text(seed: int, tokens: int) -> str:
    """The whole answer of the stream named by ``seed``."""
    return "".join(token(seed, i) for i in range(tokens))


def prompt(tokens: int, delay: float, seed: int) -> str:
    """The user message that carries the stream's parameters.

    The load generator also sends them as an extra ``bench`` body field; the message is the fallback
    for a gateway that drops unknown fields, since every gateway forwards the messages.
    """
    return f"bench tokens={tokens} delay={delay!r} seed={seed}"


def parse_prompt(message: str) -> dict[str, float] | None:
    """The parameters in a :func:`prompt` message, or None when it is not one."""
    parts = message.split()
    if not parts or parts[0] != "bench":
        return None
    found: dict[str, float] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            continue
        try:
            found[key] = float(value)
        except ValueError:
            continue
    return found
