"""Stop strings: a row ends once its generated text contains one of its stop strings.

The engines call a ``StopWhen`` after appending each token of a row, with the row's prompt
index and its tokens so far; ``StopStrings`` answers by decoding only the row's last tokens,
so a check costs the same at any length. The completion's text is then cut before the first
stop string (``cut_at_stop``), as vLLM's ``stop`` does. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

StopWhen = Callable[[int, list[int]], bool]  # (prompt index, tokens so far) -> stop now


class StopStrings:
    """A ``StopWhen`` for per-row stop strings; ``decode(ids) -> text`` is the tokenizer's."""

    def __init__(self, decode: Callable[[list[int]], str],
                 stops: Sequence[Sequence[str]]) -> None:
        self.decode = decode
        self.stops = [tuple(s for s in row if s) for row in stops]
        # a character is at most 4 tokens (byte pieces), and a token may decode to nothing
        self.windows = [4 * max(map(len, row)) + 4 if row else 0 for row in self.stops]

    def __call__(self, row: int, tokens: list[int]) -> bool:
        stops = self.stops[row]
        if not stops:
            return False
        tail = self.decode(tokens[-self.windows[row]:])
        return any(stop in tail for stop in stops)

    def __bool__(self) -> bool:
        return any(self.stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether it had one."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)
