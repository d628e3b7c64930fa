"""Compiled CPU kernels for the decode step: one-query attention for fp32
(`csrc/decode_attention.c`) and SWA's selection bookkeeping (`csrc/swa_select.c`).

torch's fused SDPA spent most of a decode step's attention on per-(row, head) overhead: at
SmolLM2's shapes (batch 32, 3 KV heads of 3 query heads each, 64 dims, ~160 slots) its 30 calls
took ~30 ms a step on the AMD EPYC box, where this kernel takes ~10 (docs/performance-notes.md).
It reads each key and value row once for the query heads that share it, keeps a unit's queries
and accumulators in vector registers, and splits the (row, KV head) units over torch's own
OpenMP threads. Besides the output it can return the log-sum-exp (to merge partial attentions)
and the softmax weights (which sparsity methods score tokens by). Given an index array it
attends the rows it names where they lie (a sparse selection, without gathering a copy).

SWA's per-step selection (`select_top`) and score bookkeeping (`window_push`, `window_drop`)
each replace a dozen small torch ops per layer with one pass, with the same results bit for
bit; at SmolLM2's shapes those ops cost about what attending 80% fewer tokens saves.

The library is compiled once per machine with the system C compiler (`$CC`, else `cc`) at
`-O3 -march=native`, into `$XDG_CACHE_HOME/flexalisa` (else `~/.cache/flexalisa`), named by a
hash of the sources, the compiler's version and the CPU's flags. Where there is no compiler,
the build fails, or `FLEXALISA_NATIVE=0` is set (read once per process; a value other than 0 or
1 also turns it off, with that reason), every function here declines (None or False) and its
callers compute the same thing with torch's ops (attention through SDPA, or matmuls and a
softmax, with other last bits; the selection and bookkeeping with the same values).
`status()` says which, and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "decode_attention.c", CSRC / "swa_select.c")  # built into one library
MAX_GROUP = 8  # query heads per KV head the kernel is specialised for (flexalisa_max_group)
HEAD_DIMS = (32, 64, 128)  # head dims it is specialised for (flexalisa_supports_head_dim)
BUILD_TIMEOUT_S = 120


@dataclass(frozen=True)
class NativeStatus:
    available: bool  # the kernel is loaded and `decode_attention` uses it
    reason: str  # why not, or the library's path


def status() -> NativeStatus:
    lib, reason = _build()
    return NativeStatus(lib is not None, reason)


def describe(device: str) -> str:
    """What runs one-query fp32 attention on `device`, for reports: the kernel or SDPA."""
    if torch.device(device).type != "cpu":
        return "sdpa"
    got = status()
    return "native" if got.available else f"sdpa ({got.reason})"


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     scale: float | None = None, with_lse: bool = False,
                     with_probs: bool = False, indices: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """Softmax attention of one query per head, or None where the kernel does not apply.

    q (B, Hkv, G, D): the G query heads sharing each KV head; k, v (B, Hkv, N, D), any strides
    with unit stride in D. The S slots attended are k's and v's N rows (S = N), or with
    ``indices`` (B, Hkv|1, S) int64 with unit stride in S, the rows it names, per KV head or
    shared by them: a selection attended where it lies, the same sums as over its gathered
    copy; an index outside [0, N) raises IndexError before anything is read. mask bool,
    True = may attend, (B, S) or (B, Hkv|1, S) with unit stride in S, or None for every slot;
    scale defaults to D ** -0.5. Returns out (B, Hkv, G, D), and where asked the log-sum-exp of
    the scaled scores (B, Hkv, G) and the softmax weights (B, Hkv, G, S); a row with no valid
    slot gets zeros and an lse of -inf. None (the caller's cue to use torch) unless every
    tensor is fp32 on the CPU, D is one of `HEAD_DIMS`, G <= `MAX_GROUP`, S > 0, and the
    kernel is built.
    """
    batch, num_kv_heads, group, head_dim = q.shape
    num_rows = k.shape[2]
    num_slots = num_rows if indices is None else indices.shape[-1]
    if mask is not None and mask.dim() == 2:
        mask = mask[:, None]  # (B, 1, S): shared by the heads
    if not (_on_cpu(q, k, v, *(t for t in (mask, indices) if t is not None))
            and q.dtype == k.dtype == v.dtype == torch.float32
            and head_dim in HEAD_DIMS and 1 <= group <= MAX_GROUP and num_slots > 0
            and k.shape == v.shape == (batch, num_kv_heads, num_rows, head_dim)
            and k.stride(3) == 1 and v.stride(3) == 1
            and (indices is None or _fits_heads(indices, torch.int64, batch, num_kv_heads))
            and (mask is None or (_fits_heads(mask, torch.bool, batch, num_kv_heads)
                                  and mask.shape[2] == num_slots))):
        return None
    lib = _build()[0]
    if lib is None:
        return None
    q = q.contiguous()
    threads = max(1, torch.get_num_threads())
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_kv_heads, group) if with_lse else None
    probs = torch.empty(batch, num_kv_heads, group, num_slots) if with_probs else None
    scratch = None if with_probs else torch.empty(threads * group * num_slots)
    mask_b, mask_h = _head_strides(mask)
    idx_b, idx_h = _head_strides(indices)
    rc = lib.flexalisa_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(),
        batch, num_kv_heads, group, head_dim, num_slots,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask_b, mask_h, head_dim ** -0.5 if scale is None else scale, threads,
        _ptr(lse), _ptr(probs), _ptr(scratch), _ptr(indices), idx_b, idx_h, num_rows)
    if rc == -2:
        raise IndexError(f"attention indices outside the {num_rows} rows of k and v")
    assert rc == 0, f"native decode attention refused shape {tuple(q.shape)}"
    return out, lse, probs


def _fits_heads(t: Tensor, dtype: torch.dtype, batch: int, num_kv_heads: int) -> bool:
    """Whether t is a (B, Hkv|1, S) tensor of ``dtype`` with unit stride in S."""
    return (t.dtype == dtype and t.dim() == 3 and t.shape[0] == batch
            and t.shape[1] in (1, num_kv_heads) and (t.stride(2) == 1 or t.shape[2] == 1))


def _head_strides(t: Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of a (B, Hkv|1, S) argument; a head stride of 0 where the heads
    share it, (0, 0) for None."""
    if t is None:
        return 0, 0
    return t.stride(0), t.stride(1) if t.shape[1] > 1 else 0


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "flexalisa"


@functools.lru_cache(maxsize=1)
def _build() -> tuple[ctypes.CDLL | None, str]:
    """Compile (once per source, compiler and CPU) and load the kernel; (None, why) if not.

    Where the cache directory cannot be written, it builds in a private temporary directory,
    loads the library and removes the directory (the library stays mapped): every process then
    compiles it again (~2 s), but none loads a file another user could have put there.
    """
    switch = os.environ.get("FLEXALISA_NATIVE", "1")
    if switch == "0":
        return None, "disabled by FLEXALISA_NATIVE=0"
    if switch != "1":  # not guessed either way: off, and the reports say why
        return None, f"FLEXALISA_NATIVE must be 0 or 1, got {switch!r}"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES) + version.encode()
                             + _cpu_flags().encode() + platform.machine().encode()
                             ).hexdigest()[:16]
        target = cache_dir() / f"native-{key}.so"
        try:
            error = None if target.exists() else _compile(compiler, target)
            lib = None if error else ctypes.CDLL(str(target))
        except OSError:  # an unwritable cache directory
            with tempfile.TemporaryDirectory(prefix="flexalisa-") as tmp:
                target = Path(tmp) / target.name
                error = _compile(compiler, target)
                lib = None if error else ctypes.CDLL(str(target))
        if lib is None:
            return None, error
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"build or load failed: {exc}"
    fn = lib.flexalisa_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = ([ptr] * 5 + [i64] * 13 + [ctypes.c_float, ctypes.c_int]
                   + [ptr] * 4 + [i64] * 3)
    fn.restype = ctypes.c_int
    fn = lib.flexalisa_select_top
    fn.argtypes = [ptr] + [i64] * 5 + [ptr] * 3 + [i64, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.flexalisa_window_push
    fn.argtypes = ([ptr] + [i64] * 3 + [ptr] + [i64] * 2 + [ptr] + [i64] * 2 + [ptr] + [i64] * 2
                   + [ptr] + [i64] * 3 + [ptr] + [i64] * 2 + [ptr] + [i64] * 3)
    fn.restype = ctypes.c_int
    fn = lib.flexalisa_window_drop
    fn.argtypes = ([ptr] * 2 + [i64] * 4 + [ptr] + [i64] * 8 + [ptr] + [i64] * 3 + [ptr]
                   + [i64] * 4)
    fn.restype = ctypes.c_int
    if lib.flexalisa_max_group() != MAX_GROUP or not all(
            lib.flexalisa_supports_head_dim(d) for d in HEAD_DIMS):
        return None, f"{target} does not match this module's shapes"
    return lib, str(target)


def _compile(compiler: str, target: Path) -> str | None:
    """Build the kernel at `target` (through a temporary file beside it, renamed atomically,
    so a concurrent build finds one whole file); the compiler's error, or None. OSError where
    `target`'s directory cannot be made or written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-fPIC", "-shared", "-fopenmp",
               "-fno-math-errno", *map(str, SOURCES), "-o", str(built), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            return f"build failed: {' '.join(cmd)}: {res.stderr.strip()[:500]}"
        os.replace(built, target)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def select_top(scores: Tensor, local: Tensor, candidates: Tensor, num_global: Tensor,
               width: int) -> Tensor | None:
    """``StepBudget.select_top``'s indices in one pass, or None where the kernel does not
    apply: scores (..., B, Hsel, S) float64 on the CPU, rows evenly spaced with unit stride
    in S; local, candidates (B, 1, S) bool; num_global (B, 1, 1) long; returns
    (..., B, Hsel, width) long: per row the local slots and the num_global top-scoring
    candidates (ties: the lower slot) ascending, then S - 1."""
    lead, num_slots = scores.shape[:-1], scores.shape[-1]
    row_stride = _row_stride(scores)
    if not (_on_cpu(scores, local, candidates, num_global) and scores.dtype == torch.float64
            and scores.dim() >= 3
            and row_stride is not None and num_slots > 0
            and local.shape == candidates.shape == (scores.shape[-3], 1, num_slots)
            and local.dtype == candidates.dtype == torch.bool):
        return None
    lib = _build()[0]
    if lib is None:
        return None
    local, candidates = local.contiguous(), candidates.contiguous()
    num_global = num_global.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(*lead, width, dtype=torch.int64)
    rc = lib.flexalisa_select_top(
        scores.data_ptr(), math.prod(lead), lead[-1], lead[-2], num_slots, row_stride,
        local.data_ptr(), candidates.data_ptr(), num_global.data_ptr(), width, out.data_ptr(),
        max(1, torch.get_num_threads()))
    if rc != 0:
        raise ValueError(f"select_top: a row takes more than {width} slots, or more global "
                         f"tokens than it has candidates")
    return out


def window_push(weights: Tensor, indices: Tensor, entry: Tensor, ring_slots: Tensor,
                ring_weights: Tensor, totals: Tensor, live: Tensor) -> bool:
    """``WindowScores.push`` of one row in one pass, for a record of one layer:
    weights (B, Hsel, K) float32, the step's attention summed over each group's query heads;
    indices (B, Hsel|1, K) long and entry (B, Hsel|1, K) bool, the selection; ring_slots,
    ring_weights (B, Hsel, Kr) the ring row to fill; totals (B, Hsel, L + 1) float64 and live
    int32, the window's sums, added to as the torch path adds. False (nothing done) where the
    kernel does not apply."""
    if weights.dim() != 3 or ring_slots.dim() != 3:  # one layer's row only
        return False
    batch, num_groups, num_entries = weights.shape
    width = ring_slots.shape[2]
    if not (_on_cpu(weights, indices, entry, ring_slots, ring_weights, totals, live)
            and weights.dtype == torch.float32
            and weights.is_contiguous() and num_entries <= width
            and _fits_heads(indices, torch.int64, batch, num_groups)
            and _fits_heads(entry, torch.bool, batch, num_groups)
            and indices.shape[2] == entry.shape[2] == num_entries
            and ring_slots.dtype == torch.int64 and ring_weights.dtype == torch.float32
            and totals.dtype == torch.float64 and live.dtype == torch.int32
            and ring_slots.shape == ring_weights.shape == (batch, num_groups, width)
            and totals.shape == live.shape and totals.shape[:2] == (batch, num_groups)
            and all(t.stride(2) == 1 for t in (ring_slots, ring_weights, totals, live))):
        return False
    lib = _build()[0]
    if lib is None:
        return False
    rc = lib.flexalisa_window_push(
        weights.data_ptr(), batch, num_groups, num_entries,
        indices.data_ptr(), *_head_strides(indices), entry.data_ptr(), *_head_strides(entry),
        ring_slots.data_ptr(), ring_slots.stride(0), ring_slots.stride(1),
        ring_weights.data_ptr(), ring_weights.stride(0), ring_weights.stride(1), width,
        totals.data_ptr(), totals.stride(0), totals.stride(1),
        live.data_ptr(), live.stride(0), live.stride(1), totals.shape[2] - 1)
    if rc != 0:
        raise IndexError(f"window_push: a selected slot outside [0, {totals.shape[2] - 1}]")
    return True


def window_drop(ring_slots: Tensor, ring_weights: Tensor, totals: Tensor, live: Tensor,
                ring_rows: list[int]) -> bool:
    """``WindowScores.trim``'s drop of one ring row per sequence, for a record of any number
    of leading layer axes: ring_slots, ring_weights (..., B, W, Hsel, Kr); totals float64 and
    live int32 (..., B, Hsel, L + 1); ring_rows[b] the ring row sequence b drops, or -1 for
    none. Subtracts those rows' entries and zeroes the totals of slots left with no live entry,
    the torch path's sums. False (nothing done) where the kernel does not apply."""
    lead = ring_slots.shape[:-4]
    batch, _, num_groups, width = ring_slots.shape[-4:]
    if not (_on_cpu(ring_slots, ring_weights, totals, live) and len(lead) <= 1
            and ring_slots.dtype == torch.int64 and ring_weights.dtype == torch.float32
            and totals.dtype == torch.float64 and live.dtype == torch.int32
            and ring_weights.shape == ring_slots.shape and totals.shape == live.shape
            and totals.shape[:-1] == (*lead, batch, num_groups) and len(ring_rows) == batch
            and all(t.stride(-1) == 1 for t in (ring_slots, ring_weights, totals, live))):
        return False
    lib = _build()[0]
    if lib is None:
        return False

    def strides(t: Tensor, axes: int) -> list[int]:  # (n, ...) with n's 0 without a layer axis
        return ([t.stride(0)] if lead else [0]) + list(t.stride()[len(lead):len(lead) + axes])

    rows = torch.tensor(ring_rows, dtype=torch.int64)
    rc = lib.flexalisa_window_drop(
        ring_slots.data_ptr(), ring_weights.data_ptr(), math.prod(lead), batch, num_groups,
        width, rows.data_ptr(), *strides(ring_slots, 3), *strides(ring_weights, 3),
        totals.data_ptr(), *strides(totals, 2), live.data_ptr(), *strides(live, 2),
        totals.shape[-1] - 1)
    if rc != 0:
        raise IndexError(f"window_drop: a stored slot outside [0, {totals.shape[-1] - 1}]")
    return True


def _on_cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _row_stride(t: Tensor) -> int | None:
    """The distance between consecutive (·, S) rows of t when every row is evenly spaced
    from the last with unit stride in S (a slice of a contiguous buffer), else None."""
    if t.dim() < 1 or (t.stride(-1) != 1 and t.shape[-1] > 1):
        return None
    step, inner = None, 1
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1], strict=True))):
        if size == 1:
            continue
        if step is None:
            step = stride
        elif stride != step * inner:
            return None
        inner *= size
    return step if step is not None else t.shape[-1]
