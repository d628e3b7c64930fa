"""Stop strings: detection from a row's last tokens only, and cutting the text."""

from __future__ import annotations

from flexalisa.stops import StopStrings, cut_at_stop


def test_detects_a_stop_across_tokens_from_the_tail_only():
    pieces = {1: "ab", 2: "c", 3: "\u00e9", 4: "", 5: "x"}  # 4 decodes to nothing
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return "".join(pieces[i] for i in ids)

    stops = StopStrings(decode, [("bc\u00e9",), ()])
    assert not stops(0, [1])
    assert stops(0, [5] * 100 + [1, 2, 4, 3])  # "…ab", "c", "", "é"
    assert max(seen) == 4 * 3 + 4  # a bounded tail, not the whole row
    assert not stops(1, [1, 2, 3])  # a row with no stop strings never stops
    assert stops and not StopStrings(decode, [(), ()])


def test_cut_at_the_first_stop():
    assert cut_at_stop("one\n\ntwo###three", ["###", "\n\n"]) == ("one", True)
    assert cut_at_stop("no stop", ["###"]) == ("no stop", False)
    assert cut_at_stop("text", []) == ("text", False)
