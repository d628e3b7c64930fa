"""The compiled one-query attention kernel (`flexalisa.attention.native`) against float64
softmax attention, its build and its fallbacks."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.attention import (
    attention_with_probs,
    dense_attention,
    gather_kv,
    native,
    partial_attention,
    partial_attention_probs,
    selected_attention,
)
from flexalisa.cli import main
from tests.conftest import write_jsonl


@pytest.fixture
def rebuild():
    """Clears the memoised build before and after, so a test's environment takes effect."""
    native._build.cache_clear()
    yield
    native._build.cache_clear()


def compiler_present() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is not None


def reference_all(q, k, v, mask):
    """float64 softmax attention, its lse and weights: q (B, Hkv, G, D), k/v (B, Hkv, S, D),
    mask (B, S) or (B, Hkv|1, S) or None; a row with no valid slot: zeros and lse -inf."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Hkv, G, S)
    if mask is not None:
        mask = mask[:, None] if mask.dim() == 2 else mask
        scores = scores.masked_fill(~mask[:, :, None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.double()).float(), lse.float(), probs.float()


def reference(q, k, v, mask):
    return reference_all(q, k, v, mask)[0]


def run(q, k, v, mask):
    return native.decode_attention(q, k, v, mask)[0]


def make_case(seed: int, batch: int, num_kv_heads: int, group: int, head_dim: int,
              num_slots: int, spare: int, pad: int, scale: float = 1.0):
    """q and views k, v of a cache with `spare` unused slots; row 0 left-padded by `pad`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_kv_heads, group, head_dim, generator=gen) * scale
    cache_k = torch.randn(batch, num_kv_heads, num_slots + spare, head_dim, generator=gen)
    cache_v = torch.randn(batch, num_kv_heads, num_slots + spare, head_dim, generator=gen)
    valid = torch.ones(batch, num_slots + spare, dtype=torch.bool)
    valid[0, :min(pad, num_slots - 1)] = False
    return q, cache_k[:, :, :num_slots], cache_v[:, :, :num_slots], valid[:, :num_slots]


def test_the_kernel_builds_wherever_there_is_a_compiler() -> None:
    """A machine with a C compiler must run the kernel; a broken build may not pass unseen."""
    if not compiler_present():
        pytest.skip("no C compiler: SDPA is used, as tested below")
    assert native.status().available, native.status().reason


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), num_kv_heads=st.integers(1, 4),
       group=st.integers(1, native.MAX_GROUP), head_dim=st.sampled_from(native.HEAD_DIMS),
       num_slots=st.integers(1, 70), spare=st.integers(0, 9), pad=st.integers(0, 20))
def test_matches_float64_attention(seed, batch, num_kv_heads, group, head_dim, num_slots,
                                   spare, pad) -> None:
    """Any group size and head dim it is built for, any slot count (vector blocks and a
    tail), cache views with spare slots, left padding."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    q, k, v, mask = make_case(seed, batch, num_kv_heads, group, head_dim, num_slots, spare, pad)
    out = run(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=2e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), num_kv_heads=st.integers(1, 4),
       group=st.integers(1, native.MAX_GROUP), head_dim=st.sampled_from(native.HEAD_DIMS),
       num_slots=st.integers(1, 40), mask_kind=st.sampled_from(["none", "shared", "per_head"]),
       empty_row=st.booleans())
def test_lse_and_weights_under_any_mask(seed, batch, num_kv_heads, group, head_dim, num_slots,
                                        mask_kind, empty_row) -> None:
    """The log-sum-exp and the softmax weights too, with no mask, one mask shared by the
    heads, or one per KV head; a (row, head) with no valid slot: zeros and lse -inf."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = make_case(seed, batch, num_kv_heads, group, head_dim, num_slots, 3, 0)
    mask = None
    if mask_kind != "none":
        heads = 1 if mask_kind == "shared" else num_kv_heads
        mask = torch.rand(batch, heads, num_slots + 2, generator=gen)[..., :num_slots] < 0.7
        mask[..., -1] = True
        if empty_row:
            mask[0, -1] = False
    out, lse, probs = native.decode_attention(q, k, v, mask, with_lse=True, with_probs=True)
    want_out, want_lse, want_probs = reference_all(q, k, v, mask)
    torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)


def test_the_partial_attention_api_takes_the_kernel_for_one_query() -> None:
    """partial_attention(_probs) and attention_with_probs at T = 1 return the kernel's
    results in their own shapes (B, Hq, 1, ...), per-KV-head masks included."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    q, k, v, _ = make_case(6, 2, 2, 3, 64, 30, 0, 0)
    mask = torch.rand(2, 2, 1, 30, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[..., 0] = True
    q_heads = q.reshape(2, 6, 1, 64)  # (B, Hq, 1, D)
    want_out, want_lse, want_probs = reference_all(q, k, v, mask[:, :, 0])
    out, lse, probs = partial_attention_probs(q_heads, k, v, mask)
    torch.testing.assert_close(out, want_out.view(2, 6, 1, 64), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse.view(2, 6, 1), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs, want_probs.view(2, 6, 1, 30), atol=1e-6, rtol=1e-5)
    out2, lse2 = partial_attention(q_heads, k, v, mask)
    out3, probs3 = attention_with_probs(q_heads, k, v, mask)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert torch.equal(out3, out) and torch.equal(probs3, probs)


def gathered(k, v, indices):
    """k, v (B, Hkv, N, D) at indices (B, Hkv|1, S): (B, Hkv, S, D) each, by plain indexing."""
    idx = indices.expand(-1, k.shape[1], -1)[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, idx), v.gather(2, idx)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), num_kv_heads=st.integers(1, 4),
       group=st.integers(1, native.MAX_GROUP), head_dim=st.sampled_from(native.HEAD_DIMS),
       num_rows=st.integers(1, 60), num_sel=st.integers(1, 40), per_head=st.booleans(),
       masked=st.booleans())
def test_indexed_slots_match_float64_attention_over_the_gathered_rows(
        seed, batch, num_kv_heads, group, head_dim, num_rows, num_sel, per_head, masked) -> None:
    """With an index array the kernel attends the rows it names where they lie (a cache view
    with spare slots): out, lse and weights as float64 attention over those rows gathered;
    indices per KV head or shared, unsorted, repeated (as selection padding repeats S-1),
    masked entries, a (row, head) with every entry masked."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = make_case(seed, batch, num_kv_heads, group, head_dim, num_rows, 5, 0)
    heads = num_kv_heads if per_head else 1
    indices = torch.randint(0, num_rows, (batch, heads, num_sel), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(batch, heads, num_sel, generator=gen) < 0.6
        mask[0, 0] = False  # nothing to attend: zeros and lse -inf
    out, lse, probs = native.decode_attention(q, k, v, mask, with_lse=True, with_probs=True,
                                              indices=indices)
    want_out, want_lse, want_probs = reference_all(q, *gathered(k, v, indices), mask)
    torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, 40])
def test_an_index_outside_the_rows_raises_before_reading(bad: int) -> None:
    if not native.status().available:
        pytest.skip(native.status().reason)
    q, k, v, _ = make_case(5, 2, 3, 3, 64, 40, 0, 0)
    indices = torch.arange(10).expand(2, 3, 10).clone()
    indices[1, 2, 7] = bad
    with pytest.raises(IndexError, match="outside the 40 rows"):
        native.decode_attention(q, k, v, None, indices=indices)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("heads", [1, 3])
def test_selected_attention_is_the_gathered_attention(monkeypatch, kernel: bool,
                                                      heads: int) -> None:
    """selected_attention gives what gather_kv and then attention_with_probs (or
    partial_attention_probs, with the lse) give: bit for bit where both run the kernel, and
    through those very functions where the kernel is not there."""
    if kernel and not native.status().available:
        pytest.skip(native.status().reason)
    if not kernel:
        monkeypatch.setattr(native, "decode_attention", lambda *args, **kwargs: None)
    q, k, v, _ = make_case(8, 3, 3, 2, 64, 50, 6, 0)
    q_heads = q.reshape(3, 6, 1, 64)
    gen = torch.Generator().manual_seed(2)
    indices = torch.sort(torch.randint(0, 50, (3, heads, 12), generator=gen)).values
    mask = torch.rand(3, heads, 12, generator=gen) < 0.8
    k_sel, v_sel = gather_kv(k, v, indices)
    out, lse, probs = selected_attention(q_heads, k, v, indices, mask)
    want_out, want_probs = attention_with_probs(q_heads, k_sel, v_sel, mask[:, :, None])
    assert lse is None and torch.equal(out, want_out) and torch.equal(probs, want_probs)
    out, lse, probs = selected_attention(q_heads, k, v, indices, mask, with_lse=True)
    want = partial_attention_probs(q_heads, k_sel, v_sel, mask[:, :, None])
    assert all(torch.equal(got, w) for got, w in zip((out, lse, probs), want, strict=True))
    ref_out, ref_lse, _ = reference_all(q, k_sel, v_sel, mask)
    torch.testing.assert_close(out, ref_out.view(3, 6, 1, 64), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.view(3, 6, 1), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_the_units_exactly(threads: int) -> None:
    """Each OpenMP thread has its own scratch: the result does not depend on the count."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    q, k, v, mask = make_case(1, 5, 3, 3, 64, 150, 7, 11)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run(q, k, v, mask)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_peaked_scores_underflow_to_zero_like_softmax() -> None:
    """Scores 100s apart: the exp of the far ones underflows to 0, as in float64."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    q, k, v, mask = make_case(2, 2, 2, 4, 64, 40, 0, 5, scale=40.0)
    out = run(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["head_dim", "group", "dtype", "mask_stride"])
def test_shapes_it_is_not_built_for_return_none(change: str) -> None:
    q, k, v, mask = make_case(3, 2, 2, 3, 64, 20, 0, 0)
    assert native.decode_attention(q, k, v, mask) is not None or not native.status().available
    if change == "head_dim":
        q, k, v = q[..., :48], k[..., :48], v[..., :48]
    elif change == "group":
        q = torch.randn(2, 2, native.MAX_GROUP + 1, 64)
    elif change == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    else:
        mask = torch.ones(20, 2, dtype=torch.bool).t()  # (B, S) with stride 2 along S
    assert native.decode_attention(q, k, v, mask) is None


def test_disabled_by_the_environment(monkeypatch, rebuild) -> None:
    """FLEXALISA_NATIVE=0: no kernel, and dense attention (SDPA) gives the same result."""
    q, k, v, mask = make_case(4, 3, 3, 3, 64, 33, 4, 6)
    monkeypatch.setenv("FLEXALISA_NATIVE", "0")
    assert native.status() == native.NativeStatus(False, "disabled by FLEXALISA_NATIVE=0")
    assert native.decode_attention(q, k, v, mask) is None
    out = dense_attention(q.reshape(3, 9, 1, 64), k, v, mask[:, None])  # (B, Hq, 1, D)
    torch.testing.assert_close(out.view(3, 3, 3, 64), reference(q, k, v, mask),
                               atol=2e-6, rtol=1e-5)


def test_an_unknown_switch_value_turns_it_off_and_says_so(monkeypatch, rebuild) -> None:
    monkeypatch.setenv("FLEXALISA_NATIVE", "false")
    assert native.status() == native.NativeStatus(
        False, "FLEXALISA_NATIVE must be 0 or 1, got 'false'")
    assert native.describe("cpu") == "sdpa (FLEXALISA_NATIVE must be 0 or 1, got 'false')"


def test_a_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path,
                                                           rebuild) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no space' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    got = native.status()
    assert not got.available
    assert got.reason.startswith("build failed") and "no space" in got.reason
    q, k, v, mask = make_case(5, 2, 1, 2, 32, 9, 0, 0)
    assert native.decode_attention(q, k, v, mask) is None


def test_no_compiler_falls_back(monkeypatch, rebuild) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-flexalisa")
    assert native.status() == native.NativeStatus(
        False, "no C compiler ('no-such-compiler-flexalisa' not on PATH)")


def test_builds_into_a_fresh_cache_once(monkeypatch, tmp_path, rebuild) -> None:
    """The first use compiles into the cache directory; the next process loads that file."""
    if not compiler_present():
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    got = native.status()
    assert got.available, got.reason
    built = list((tmp_path / "flexalisa").glob("native-*.so"))
    assert [str(p) for p in built] == [got.reason]
    mtime = built[0].stat().st_mtime_ns
    native._build.cache_clear()
    assert native.status() == got
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_the_job_report_says_which_attention_ran(tiny_chat_model, tmp_path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "The name of the module"}])
    assert main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(tmp_path / "out.jsonl"), "--gen-len", "3"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    want = "native" if native.status().available else f"sdpa ({native.status().reason})"
    assert report["decode_attention"] == want
    assert f"- **decode_attention**: `{want}`" in (tmp_path / "report.md").read_text()


def test_an_unwritable_cache_builds_in_a_private_temporary_directory(monkeypatch, tmp_path,
                                                                     rebuild) -> None:
    """The cache path is a file, so the directory cannot be made: the kernel is built in a
    temporary directory, loaded, and the directory removed; it still computes attention."""
    if not compiler_present():
        pytest.skip("no C compiler")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    got = native.status()
    assert got.available, got.reason
    assert not got.reason.startswith(str(blocker)) and not Path(got.reason).exists()
    q, k, v, mask = make_case(7, 2, 3, 3, 64, 25, 2, 4)
    torch.testing.assert_close(run(q, k, v, mask), reference(q, k, v, mask),
                               atol=2e-6, rtol=1e-5)
