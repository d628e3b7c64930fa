"""Score bookkeeping equals a naive reference that keeps every row densely."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.attention import make_method
from flexalisa.attention.scores import WindowScores, top_entries


class NaiveScores:
    """The spec, spelled out with python lists and dense rows (B, Hsel, L) float64."""

    def __init__(self, name: str, sparsity: float, groups: int, max_len: int) -> None:
        self.name, self.groups, self.max_len = name, groups, max_len
        self.ratio = 1 - Fraction(str(sparsity))
        self.rows: list[torch.Tensor] = []  # every row ever seen, oldest first
        self.width = sum(self.budget(max_len))  # seed rows keep their top `width` entries

    def k(self, n: int) -> int:
        exact = Fraction(n) * self.ratio / 2
        return int(exact + Fraction(1, 2))  # floor(x + 1/2): round half up

    def budget(self, n: int) -> tuple[int, int]:
        local = min(max(self.k(n), 1), n)
        return local, min(self.k(n), n - local)

    def head_summed(self, probs: torch.Tensor) -> torch.Tensor:
        batch, heads = probs.shape[:2]
        per = heads // self.groups
        return torch.stack(
            [probs[:, g * per : (g + 1) * per].sum(1) for g in range(self.groups)], 1
        )  # (B, Hsel, T, K)

    def observe_prefill(self, probs: torch.Tensor, valid: torch.Tensor) -> None:
        summed = self.head_summed(probs)  # (B, Hsel, T, S)
        batch, _, num_q, num_slots = summed.shape
        for t in range(num_q):
            row = torch.zeros(batch, self.groups, self.max_len, dtype=torch.float64)
            for b in range(batch):
                if not valid[b, num_slots - num_q + t]:
                    continue
                for g in range(self.groups):
                    slots = [s for s in range(num_slots) if valid[b, s]]
                    if self.name == "swa":  # the documented seed truncation
                        slots = sorted(slots, key=lambda s: (-float(summed[b, g, t, s]), s))
                        slots = slots[: self.width]
                    for s in slots:
                        row[b, g, s] = float(summed[b, g, t, s])
            self.rows.append(row)

    def observe(self, probs: torch.Tensor, picks: list[list[list[int]]]) -> None:
        summed = self.head_summed(probs)[:, :, 0]  # (B, Hsel, K)
        row = torch.zeros(len(picks), self.groups, self.max_len, dtype=torch.float64)
        for b, per_group in enumerate(picks):
            for g in range(self.groups):
                slots = per_group[min(g, len(per_group) - 1)]
                for j, s in enumerate(slots):
                    row[b, g, s] = float(summed[b, g, j])
        self.rows.append(row)

    def scores(self, b: int, g: int, n: int) -> torch.Tensor:
        rows = self.rows[-self.k(n) :] if self.name == "swa" and self.k(n) else self.rows
        if self.name == "swa" and not self.k(n):
            rows = []
        return sum((r[b, g] for r in rows), torch.zeros(self.max_len, dtype=torch.float64))

    def select(self, valid: torch.Tensor) -> list[list[list[int]]]:
        picks = []
        for b in range(valid.shape[0]):
            slots = [s for s in range(valid.shape[1]) if valid[b, s]]
            local_n, global_n = self.budget(len(slots))
            local, older = slots[len(slots) - local_n :], slots[: len(slots) - local_n]
            per_group = []
            for g in range(self.groups):
                score = self.scores(b, g, len(slots))
                ranked = sorted(older, key=lambda s, sc=score: (-float(sc[s]), s))
                per_group.append(sorted(ranked[:global_n] + local))
            picks.append(per_group)
        return picks


def selected(sel) -> list[list[list[int]]]:
    return [
        [row[mask].tolist() for row, mask in zip(rows, masks, strict=True)]
        for rows, masks in zip(sel.indices, sel.mask, strict=True)
    ]


def run_against_reference(data, quantized: bool) -> None:
    name = data.draw(st.sampled_from(["swa", "h2o"]))
    sparsity = data.draw(st.sampled_from([0.1, 0.3, 0.5, 0.8, 0.9]))
    batch, kv_heads = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    heads = kv_heads * data.draw(st.integers(1, 2))
    prompt, steps = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 24))
    pads = [data.draw(st.integers(0, prompt - 1)) for _ in range(batch)]
    per_kv_head = data.draw(st.booleans())
    max_len = prompt + steps + data.draw(st.integers(0, 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))

    def weights(*shape: int) -> torch.Tensor:
        if quantized:  # multiples of 1/8: every sum is exact, ties are common
            return torch.randint(0, 9, shape, generator=gen).float() / 8
        return torch.rand(*shape, generator=gen)

    method = make_method(name, sparsity, per_kv_head)
    state = method.init_state(batch, 2, kv_heads, max_len)
    naive = NaiveScores(name, sparsity, state.num_groups, max_len)
    valid = torch.arange(prompt + steps)[None, :] >= torch.tensor(pads)[:, None]  # (B, S)
    probs = weights(batch, heads, prompt, prompt)
    method.observe_prefill(state, 1, probs, valid[:, :prompt])
    naive.observe_prefill(probs, valid[:, :prompt])
    for length in range(prompt + 1, prompt + steps + 1):
        sel = method.select(state, 1, valid[:, :length])
        assert selected(sel) == naive.select(valid[:, :length])
        totals = state.layers[1].scores(length)
        for b in range(batch):
            for g in range(state.num_groups):
                expected = naive.scores(b, g, int(valid[b, :length].sum()))[:length]
                if quantized:
                    assert torch.equal(totals[b, g], expected)
                else:
                    torch.testing.assert_close(totals[b, g], expected, atol=1e-9, rtol=0)
        step_probs = (
            weights(batch, heads, 1, sel.indices.shape[-1])
            * sel.mask.repeat_interleave(heads // sel.num_heads, dim=1)[:, :, None]
        )
        method.observe(state, 1, step_probs, sel)
        naive.observe(step_probs, selected(sel))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_bookkeeping_equals_naive_reference_exactly_on_dyadic_weights(data) -> None:
    run_against_reference(data, quantized=True)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_bookkeeping_equals_naive_reference_on_random_weights(data) -> None:
    run_against_reference(data, quantized=False)


def test_ring_is_r_times_smaller_than_dense_rows() -> None:
    method = make_method("swa", 0.8)
    state = method.init_state(1, 1, 1, 1024)
    ring: WindowScores = state.layers[0]
    # window k(1024) = round(102.4) = 102 rows (+1 being pushed) of the largest budget 204
    assert ring.ring_slots.shape == (1, 103, 1, 204)
    dense_rows = 102 * 1024
    assert ring.ring_slots.numel() < 0.21 * dense_rows


def test_expired_slots_return_to_exact_zero() -> None:
    window = WindowScores.create(1, 1, 8, capacity=3, width=2, device=None)
    slots = torch.tensor([[[3, 5]]])
    entry = torch.ones(1, 1, 2, dtype=torch.bool)
    window.push(slots, torch.tensor([[[1.0, 0.5]]]), entry)
    window.push(slots, torch.tensor([[[1e-10, 0.25]]]), entry)  # 1 + 1e-10 rounds in float64
    window.trim(torch.tensor([1]))  # the first row leaves
    assert window.scores(8)[0, 0, 3] != 0 and window.scores(8)[0, 0, 5] == 0.25
    window.trim(torch.tensor([0]))  # and the second: no rounding residue may remain
    assert torch.equal(window.scores(8), torch.zeros(1, 1, 8, dtype=torch.float64))
    assert window.window_rows == [0] and window.num_rows == 2


def test_pushing_into_a_full_ring_is_refused() -> None:
    window = WindowScores.create(1, 1, 8, capacity=2, width=1, device=None)
    row = (torch.tensor([[[1]]]), torch.tensor([[[0.5]]]), torch.ones(1, 1, 1, dtype=torch.bool))
    window.push(*row)
    window.push(*row)
    with pytest.raises(ValueError, match="ring of 2 rows is full"):
        window.push(*row)
    window.trim(torch.tensor([1]))
    window.push(*row)  # room again; the oldest row was overwritten after it left the window
    assert window.scores(3)[0, 0].tolist() == [0.0, 1.0, 0.0]


def test_prefill_in_query_chunks_seeds_like_one_prefill() -> None:
    gen = torch.Generator().manual_seed(5)
    probs = torch.rand(2, 4, 12, 12, generator=gen).tril()  # causal: row t sees keys <= t
    valid = torch.arange(12)[None, :] >= torch.tensor([0, 3])[:, None]
    whole, chunked = make_method("swa", 0.5, True), make_method("swa", 0.5, True)
    state_whole, state_chunked = whole.init_state(2, 1, 2, 40), chunked.init_state(2, 1, 2, 40)
    whole.observe_prefill(state_whole, 0, probs, valid)
    for start, stop in [(0, 5), (5, 9), (9, 12)]:  # queries [start, stop) over keys [0, stop)
        chunked.observe_prefill(state_chunked, 0, probs[:, :, start:stop, :stop], valid[:, :stop])
    decode_valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    sel_whole = whole.select(state_whole, 0, decode_valid)
    sel_chunked = chunked.select(state_chunked, 0, decode_valid)
    assert torch.equal(sel_whole.indices, sel_chunked.indices)
    assert torch.equal(state_whole.layers[0].scores(13), state_chunked.layers[0].scores(13))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 7), st.integers(0, 9),
       st.integers(0, 2**31 - 1))
def test_push_rows_equals_pushing_row_by_row_bit_for_bit(batch, groups, num_new, before,
                                                          seed) -> None:
    """Seeding n rows at once (the prefill) leaves the same ring, sums and counts as n pushes,
    bit for bit: float64 sums in the same order, on rows after ``before`` earlier ones (the
    ring index wraps)."""
    capacity, width, max_len = 8, 5, 12
    gen = torch.Generator().manual_seed(seed)
    records = [WindowScores.create(batch, groups, max_len, capacity, width, None)
               for _ in range(2)]
    for _ in range(before):  # the same history in both, trimmed to leave room
        slots = torch.randint(0, max_len, (batch, groups, width), generator=gen)
        weights = torch.rand(batch, groups, width, generator=gen)
        for record in records:
            record.trim([min(rows, capacity - 1 - num_new) for rows in record.window_rows])
            record.push(slots, weights, torch.ones_like(slots, dtype=torch.bool))
    for record in records:
        record.trim([capacity - 1 - num_new] * batch)
    num_entries = int(torch.randint(1, width + 1, (1,), generator=gen))
    slots = torch.randint(0, max_len, (batch, groups, num_new, num_entries), generator=gen)
    weights = torch.rand(slots.shape, generator=gen) ** 3
    entry = torch.rand(slots.shape, generator=gen) > 0.2
    records[0].push_rows(slots, weights, entry)
    for row in range(num_new):
        records[1].push(slots[:, :, row], weights[:, :, row], entry[:, :, row])
    one, other = records
    for name in ("ring_slots", "ring_weights", "totals", "live"):
        assert torch.equal(getattr(one, name), getattr(other, name)), name
    assert one.window_rows == other.window_rows and one.num_rows == other.num_rows


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 45),
       st.integers(0, 2**16))
def test_top_entries_are_the_stable_sorts_first_entries(batch, rows, num_slots, width,
                                                        seed) -> None:
    """The seed rows' top entries are the first ``width`` of a stable descending sort, as a
    set in slot order; weights drawn from a few values so that ties are common, with padding
    keyed -1 as observe_prefill does."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randint(0, 4, (batch, 1, rows, num_slots), generator=generator) / 4
    weights[..., :num_slots // 3] = -1.0  # padding keys
    slots, picked = top_entries(weights, width)
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices[..., :width]
    assert torch.equal(slots, order.sort(dim=-1).values)
    assert torch.equal(picked, weights.gather(-1, slots))
