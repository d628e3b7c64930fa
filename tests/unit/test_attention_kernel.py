"""The partial-attention kernel: exact merge of disjoint parts, probs, and gather_kv."""

from __future__ import annotations

import math

import pytest
import torch

from flexalisa.attention import (
    attention_probs,
    attention_with_probs,
    gather_kv,
    merge,
    partial_attention,
    partial_attention_probs,
)

B, HQ, HKV, T, S, D = 2, 6, 2, 3, 40, 16


def make_qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=gen)
    k = torch.randn(B, HKV, S, D, generator=gen)
    v = torch.randn(B, HKV, S, D, generator=gen)
    return q, k, v


def reference_attention(q, k, v, mask):
    """Plain softmax attention with K/V repeated per query head; mask (B, T, S)."""
    group = q.shape[1] // k.shape[1]
    kr = k.repeat_interleave(group, dim=1)  # (B, Hq, S, D)
    vr = v.repeat_interleave(group, dim=1)
    scores = q @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    return torch.softmax(scores, dim=-1) @ vr


def left_padding_valid() -> torch.Tensor:
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :7] = False  # row 1 is left-padded by 7 slots
    return valid


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_three_random_disjoint_parts_merge_to_dense(per_kv_head: bool) -> None:
    q, k, v = make_qkv()
    valid = left_padding_valid()
    dense_out, dense_lse = partial_attention(q, k, v, valid[:, None, :].expand(B, T, S))
    gen = torch.Generator().manual_seed(1)
    num_sets = HKV if per_kv_head else 1
    perm = torch.stack([torch.randperm(S, generator=gen) for _ in range(B * num_sets)])
    perm = perm.view(B, num_sets, S)  # a random order of the slots per (row, set)
    partials = []
    for part in torch.tensor_split(perm, [9, 22], dim=-1):  # parts of 9, 13 and 18 slots
        k_sel, v_sel = gather_kv(k, v, part)  # (B, Hkv, K, D)
        part_valid = torch.gather(valid[:, None].expand(B, num_sets, S), -1, part)
        partials.append(
            partial_attention(q, k_sel, v_sel, part_valid[:, :, None].expand(-1, -1, T, -1))
        )
    out, lse = merge(partials)
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out, reference_attention(q, k, v, valid[:, None].expand(B, T, S)), atol=1e-5, rtol=1e-5
    )


def test_an_empty_part_drops_out_of_the_merge() -> None:
    q, k, v = make_qkv()
    full = partial_attention(q, k, v)
    empty = partial_attention(q, k[:, :, :0], v[:, :, :0])
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()
    out, lse = merge([full, empty])
    torch.testing.assert_close(out, full[0])
    torch.testing.assert_close(lse, full[1])


def test_probs_variant_matches_partial_attention_and_attention_probs() -> None:
    q, k, v = make_qkv(2)
    mask = left_padding_valid()[:, None].expand(B, T, S)
    out, lse, probs = partial_attention_probs(q, k, v, mask)
    out_ref, lse_ref = partial_attention(q, k, v, mask)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(lse, lse_ref)
    torch.testing.assert_close(probs, attention_probs(q, k, mask))
    assert probs.shape == (B, HQ, T, S) and probs.dtype == torch.float32
    assert (probs[1, :, :, :7] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, HQ, T))


def test_attention_with_probs_matches_the_reference_per_kv_head_masks() -> None:
    q, k, v = make_qkv(4)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(B, HKV, T, S, generator=gen) > 0.5  # per KV head
    mask[0, 1] = False  # KV head 1 of row 0 sees no key: zero weights and output
    out, probs = attention_with_probs(q, k, v, mask)
    group = HQ // HKV
    per_head = mask.repeat_interleave(group, dim=1)  # (B, Hq, T, S)
    want = torch.stack([reference_attention(q[:, h:h + 1], k[:, h // group:h // group + 1],
                                            v[:, h // group:h // group + 1], per_head[:, h])
                        for h in range(HQ)], dim=1)[:, :, 0]
    seen = per_head.any(-1)  # (B, Hq, T): rows with a key
    torch.testing.assert_close(out[seen], want[seen])
    assert (out[~seen] == 0).all() and (probs[~seen] == 0).all()
    torch.testing.assert_close(probs, partial_attention_probs(q, k, v, mask)[2])


def test_gather_kv_shared_and_per_kv_head_selections() -> None:
    _, k, v = make_qkv(3)
    shared = torch.tensor([[0, 5, 39], [2, 3, 4]])  # (B, K)
    k_sel, v_sel = gather_kv(k, v, shared)
    assert k_sel.shape == (B, HKV, 3, D)
    for b in range(B):
        torch.testing.assert_close(k_sel[b], k[b][:, shared[b]])
        torch.testing.assert_close(v_sel[b], v[b][:, shared[b]])
    per_head = torch.tensor([[[1, 2], [30, 31]], [[7, 0], [8, 9]]])  # (B, Hkv, K)
    k_sel, v_sel = gather_kv(k, v, per_head)
    for b in range(B):
        for h in range(HKV):
            torch.testing.assert_close(k_sel[b, h], k[b, h, per_head[b, h]])
            torch.testing.assert_close(v_sel[b, h], v[b, h, per_head[b, h]])
    with pytest.raises(ValueError, match="indices must be"):
        gather_kv(k, v, torch.zeros(B, 3, 2, dtype=torch.long))


@pytest.mark.parametrize("v_layout", ["same", "other_strides"])
def test_gather_kv_on_cache_views(v_layout: str) -> None:
    """K, V as the Engine passes them (slot slices of a larger cache buffer) share one flat
    row index; a V whose strides differ from K's is gathered on its own. Both equal
    advanced indexing."""
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 2, HKV, 50, D, generator=gen)  # (K|V, B, Hkv, max_len, D)
    k = cache[0, :, :, :33]
    v = cache[1, :, :, :33]
    if v_layout == "other_strides":
        v = torch.randn(B, 33, HKV, D, generator=gen).transpose(1, 2)
    indices = torch.randint(0, 33, (B, 1, 9), generator=gen)
    k_sel, v_sel = gather_kv(k, v, indices)
    b, h = torch.arange(B)[:, None, None], torch.arange(HKV)[None, :, None]
    assert torch.equal(k_sel, k[b, h, indices]) and torch.equal(v_sel, v[b, h, indices])


def test_dense_selection_keeps_the_cache_layout() -> None:
    """Gathering with ``dense_selection`` rebuilds the contiguous cache's K, V at valid slots,
    in slot order, so the fused kernel sees the Engine's inputs; padding points at S-1."""
    from flexalisa.attention import dense_attention
    from flexalisa.attention.selection import dense_selection, mask_to_selection

    q, k, v = make_qkv(seed=3)
    q = q[:, :, -1:]
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :7] = False  # row 0 is left-padded by 7 slots
    sel = dense_selection(valid)
    assert sel.dense and sel.indices.shape == (B, 1, S)
    assert sel.indices[0, 0, :7].tolist() == [S - 1] * 7
    assert sel.indices[0, 0, 7:].tolist() == list(range(7, S))
    assert torch.equal(sel.mask[:, 0], valid)
    k_sel, v_sel = gather_kv(k, v, sel.indices)
    assert torch.equal(k_sel[:, :, 7:], k[:, :, 7:]) and torch.equal(v_sel[1], v[1])
    assert torch.equal(dense_attention(q, k_sel, v_sel, sel.mask),
                       dense_attention(q, k, v, valid[:, None]))
    assert not mask_to_selection(valid[:, None]).dense  # compacted: real entries to the front


@pytest.mark.parametrize("layout", ["contiguous", "slot_slice", "transposed", "int8_codes"])
def test_take_rows_equals_advanced_indexing(layout: str) -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, 50, 8, generator=gen)
    t = {"contiguous": base, "slot_slice": base[:, :, 10:40],  # a cache view: strided slots
         "transposed": base.transpose(1, 2),  # falls back to advanced indexing
         "int8_codes": (base * 20).to(torch.int8)}[layout]
    from flexalisa.attention.kernel import take_rows
    b = torch.arange(3)[:, None, None]
    h = torch.arange(t.shape[1])[None, :, None]
    s = torch.randint(0, t.shape[2], (3, t.shape[1], 7), generator=gen)
    assert torch.equal(take_rows(t, b, h, s), t[b, h, s])
    flat = (torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1]), torch.tensor([2, 0, 3]))
    assert torch.equal(take_rows(t, *flat), t[flat])  # (m,) entries, as the CPU tier reads them


@pytest.mark.parametrize("num_q", [1, T])
def test_dense_attention_matches_the_reference(num_q: int) -> None:
    """The fused kernel, with the one-query GQA fold (num_q 1) and without it (prefill rows),
    equals plain attention with K/V repeated per query head, left padding masked."""
    from flexalisa.attention import dense_attention

    q, k, v = make_qkv(seed=4)
    q = q[:, :, -num_q:]
    mask = torch.ones(B, num_q, S, dtype=torch.bool)
    mask[0, :, :9] = False  # row 0: 9 padding slots
    for row in range(num_q):  # causal over the last num_q slots (the queries' own tokens)
        mask[:, row, S - num_q + row + 1:] = False
    torch.testing.assert_close(dense_attention(q, k, v, mask),
                               reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
