"""Measure this machine into a `HardwareProfile` (the only module here that imports torch).

With CUDA the device is the GPU: fp16 GEMMs, device copies, pinned host<->device copies.
Without it the device is the CPU under a memory budget: fp32 GEMMs, and "h2d"/"d2h" are host
memcpy rates, which is what the runtime's CPU device pays to move a tensor between tiers.

Bandwidth accounting: GPU copies count read + write bytes. Host copies count read + 2 x write
bytes: torch's CPU kernels store through the cache (write-allocate reads each line first), and the
cost model counts host traffic the same way (``cost_model.timing._cpu_attention_s_per_token``).
When the CPU is the device, its "device memory bandwidth" is the rate a matrix-vector product
streams 256 MiB of 4096-wide weights (the rate table's 1-row point): what a decode step's GEMMs
get (one core often cannot reach the copy-based figure). Its copies are threads on the cores
compute uses, so how far they overlap compute is measured too (``copy_overlap``); a GPU's copy
engines are taken to overlap fully.

Each measurement repeats until its share of ``budget_s`` has passed (after one warm-up) and keeps
the fastest run (what the machine can do when other jobs leave it alone; the validation script
likewise keeps the fastest of repeated runs). ``gemm_flops_table`` samples the GEMM rate at
1..1024 token rows and two weight widths: on CPUs the small-row rate is far from both the
square-GEMM rate and the bandwidth roofline, and narrow weights run slower than wide ones.
The CPU device with one torch thread is timed in process CPU time (``time.process_time``), so
that other jobs on a shared machine do not inflate the figures; anything else in wall time.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cost_model.hardware import HardwareProfile

MIB = 2**20
DEFAULT_CPU_DEVICE_GPU_MEM_BYTES = 2 * 2**30  # budget for the CPU-as-device when none is given
GEMM_TABLE_ROWS = (1, 4, 16, 64, 256, 1024)  # token rows at which the GEMM rate is sampled
GEMM_TABLE_INNER = (512, 4096)  # weight input widths at which it is sampled


@dataclass(frozen=True)
class _Timer:
    clock: Callable[[], float]  # time.perf_counter, or time.process_time for one CPU thread
    sync: Callable[[], None]  # waits for queued device work
    budget_s: float  # wall seconds per measurement

    def best_s(self, fn: Callable[[], Any]) -> float:
        """The fastest of repeated timings: the machine's capability, not its momentary load."""
        fn()
        self.sync()
        best = float("inf")
        deadline = time.perf_counter() + self.budget_s
        while best == float("inf") or time.perf_counter() < deadline:
            start = self.clock()
            fn()
            self.sync()
            best = min(best, self.clock() - start)
        return max(best, 1e-9)


def _gemm_rate(torch: Any, timer: _Timer, device: str, dtype: Any, m: int, k: int,
               n: int) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return 2.0 * m * k * n / timer.best_s(lambda: a @ b)


def _copy_rate(timer: _Timer, src: Any, dst: Any) -> float:
    return src.numel() * src.element_size() / timer.best_s(lambda: dst.copy_(src))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def copy_threads_fit(threads: int) -> bool:
    """Whether compute on ``threads`` intra-op threads leaves a CPU free for copy threads.

    The runtime's CPU device runs its copies on worker threads only then, and inline on the
    compute thread otherwise (``flexalisa.runtime.device``); the profile follows the same rule.
    """
    return threads < usable_cpus()


def _copy_overlap(torch: Any, budget_s: float) -> float:
    """Share of min(copy, compute) that runs concurrently on the CPU device (see hardware.py).

    Compute: decode-like GEMMs (16 rows) streaming 256 MiB of weights on torch's threads. Copy:
    16 MiB memcpys on a worker thread with the same thread count, as the runtime's CPU device
    copies a streamed layer's weights. Each alone, then both at once, in wall time (two threads
    run); the fastest of repeated runs of each. Measured only where compute leaves a CPU free:
    elsewhere the runtime copies inline and nothing overlaps. On the 2-core box: ~1.0 with one
    compute thread; with two, a worker copy came out at ~0 (it only took turns with compute).
    """
    import threading

    threads = torch.get_num_threads()
    weights = [torch.empty(4096, 1024).uniform_() for _ in range(16)]  # 256 MiB
    x = torch.randn(16, 1024)
    src = torch.empty(16 * MIB, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)

    def gemms() -> None:
        for w in weights:
            x @ w.T

    def copies(count: int) -> None:
        torch.set_num_threads(threads)  # a new thread's own setting
        for _ in range(count):
            dst.copy_(src)

    def both(count: int) -> None:
        worker = threading.Thread(target=copies, args=(count,))
        worker.start()
        gemms()
        worker.join()

    timer = _Timer(time.perf_counter, lambda: None, budget_s / 4)
    gemm_s = timer.best_s(gemms)
    count = max(1, round(gemm_s / timer.best_s(lambda: copies(1))))  # copy time ~ gemm time
    copy_s = timer.best_s(lambda: copies(count))
    both_s = timer.best_s(lambda: both(count))
    return min(1.0, max(0.0, (gemm_s + copy_s - both_s) / min(gemm_s, copy_s)))


def _layer_overhead_s(torch: Any, timer: _Timer, device: str, dtype: Any) -> float:
    """Dispatch cost of one decoder layer's op sequence on tiny tensors (launch / Python cost).

    The ops of a LLaMA-style decode step: RMSNorm, Q/K/V, RoPE, a cache write, attention,
    O-proj, residual, RMSNorm, SwiGLU MLP, residual (about 35 ops).
    """
    x = torch.randn(1, 1, 64, device=device, dtype=dtype)
    w = torch.randn(64, 64, device=device, dtype=dtype)
    cache = torch.zeros(1, 8, 64, device=device, dtype=dtype)

    def norm(h: Any) -> Any:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w[0]

    def layer() -> None:
        h = norm(x)
        q, k, v = h @ w, h @ w, h @ w
        q = q * w[1] + torch.cat((-q[..., 32:], q[..., :32]), dim=-1) * w[2]
        k = k * w[1] + torch.cat((-k[..., 32:], k[..., :32]), dim=-1) * w[2]
        cache[:, 3:4].copy_(k)
        probs = torch.softmax(q @ cache.transpose(1, 2) * 0.125, dim=-1)
        h = x + (probs @ cache + v) @ w
        g = norm(h)
        h = h + (torch.nn.functional.silu(g @ w) * (g @ w)) @ w
        h.sum()

    return timer.best_s(layer)


RUNTIME_LAYERS = (2, 10)  # decoder layers of the two tiny models the runtime overhead is fit on


def _layer_step_overheads_s(torch: Any, timer: _Timer, device: str) -> dict[str, float]:
    """What flexalisa itself costs per layer per GPU batch and step, beyond the arithmetic:
    the per-op Python of its loops, its copies' dispatch and its kernels' launches.

    ``layer_overhead_s``: the offloading runtime (``flexalisa.runtime.OffloadRunner``) with the
    placement the searches pick on this box (half the layers streamed, every KV entry in the CPU
    tier, CPU-delegated attention). ``engine_layer_overhead_s``: the all-on-device engine
    (``flexalisa.engine.Engine``), which runs a searched policy that offloads nothing. Each
    runs on two tiny LLaMA models (64 channels, so compute is negligible) of ``RUNTIME_LAYERS``
    layers; the difference is divided by the extra layer-steps. Empty where flexalisa is not
    installed beside the cost model.
    """
    try:
        from cost_model.spec import ModelSpec
        from flexalisa.engine import Engine
        from flexalisa.models.dummy import dummy_weights
        from flexalisa.runtime import OffloadRunner
        from policy import Policy
    except ImportError:
        return {}
    batch, prompt_len, gen_len = 4, 16, 17
    policy = Policy(gpu_batch_size=batch, num_gpu_batches=1, weights_gpu_share=0.5,
                    weights_cpu_share=0.5, kv_gpu_share=0.0, kv_cpu_share=1.0,
                    kv_recompute_share=0.0, phase2_start_step=0, phase3_start_step=None,
                    act_gpu_share=1.0, act_cpu_share=0.0, cpu_attention=True)
    prompts = [[5] * prompt_len] * batch
    makers = {"layer_overhead_s": lambda w: OffloadRunner(w, policy, device=device),
              "engine_layer_overhead_s": lambda w: Engine(w, device=device)}
    sub = _Timer(timer.clock, timer.sync, timer.budget_s / (2 * len(makers)))
    out = {}
    for name, make in makers.items():
        seconds = []
        for layers in RUNTIME_LAYERS:
            spec = ModelSpec(family="llama", vocab_size=256, hidden_size=64, num_layers=layers,
                             num_heads=4, num_kv_heads=2, ffn_size=128, max_seq_len=64,
                             eos_token_ids=(2,), pad_token_id=0)
            generator = make(dummy_weights(spec))
            try:
                seconds.append(sub.best_s(lambda g=generator: g.generate(
                    prompts, gen_len, ignore_eos=True)))
            finally:
                getattr(generator, "close", lambda: None)()
        out[name] = max(0.0, seconds[1] - seconds[0]) / (
            (RUNTIME_LAYERS[1] - RUNTIME_LAYERS[0]) * gen_len)
    return out


SELECTION_POINTS = ((16, 128), (16, 512))  # (sequences, cached tokens) the fit is drawn through


def _selection_costs(torch: Any, timer: _Timer, device: str, dtype: Any
                     ) -> dict[str, float]:
    """What a sparse step costs beyond attending its selected tokens, per layer per GPU
    batch: a fixed part and a part per sequence per cached token.

    Times the runtime's own sparse path (``flexalisa.attention``: SWA at sparsity 0.8, 8 layers
    of 2 KV heads and 8 query heads of 64 channels) as a decode step runs it for each layer:
    ``select``, attention over the selected K, V rows with its weights (``selected_attention``:
    read in place by the compiled kernel on a CPU, gathered first elsewhere), ``observe``. From
    that it takes off fused dense attention over as many contiguous tokens, which the cost
    model prices already (by the bytes read), and draws a line through the two
    ``SELECTION_POINTS``: the scores a selection picks from are O(context), the calls' own
    cost is fixed. Nothing is recorded (zeros) where flexalisa is not installed beside the
    cost model.
    """
    try:
        from flexalisa.attention import dense_attention, make_method, selected_attention
    except ImportError:
        return {}
    layers, kv_heads, heads, head_dim = 8, 2, 8, 64
    timer = _Timer(timer.clock, timer.sync, timer.budget_s / 4)  # four timings share one budget
    extra = []
    for batch, context in SELECTION_POINTS:
        method = make_method("swa", 0.8)
        state = method.init_state(batch, layers, kv_heads, context + 1, device)
        valid = torch.ones(batch, context + 1, dtype=torch.bool, device=device)
        seed = torch.softmax(torch.randn(batch, heads, 16, context, device=device), dim=-1)
        for j in range(layers):
            method.observe_prefill(state, j, seed, valid[:, :context])
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        keys, values = (torch.randn(layers, batch, kv_heads, context + 1, head_dim,
                                    device=device, dtype=dtype) for _ in range(2))
        width = method.select(state, 0, valid).indices.shape[-1]
        state.ahead.clear()  # the same selections again from the first layer on

        def sparse(state: Any = state, method: Any = method, valid: Any = valid, q: Any = q,
                   keys: Any = keys, values: Any = values) -> None:
            for j in range(layers):  # the same step again: the window stays full
                sel = method.select(state, j, valid)
                _, _, probs = selected_attention(q, keys[j], values[j], sel.indices, sel.mask)
                method.observe(state, j, probs, sel)

        def dense(q: Any = q, keys: Any = keys, values: Any = values, width: int = width,
                  mask: Any = valid[:, None, :width]) -> None:
            for j in range(layers):
                dense_attention(q, keys[j, :, :, :width], values[j, :, :, :width], mask)

        extra.append(max(0.0, timer.best_s(sparse) - timer.best_s(dense)) / layers)
    (b0, n0), (b1, n1) = SELECTION_POINTS
    slope = max(0.0, (extra[1] - extra[0]) / (b1 * n1 - b0 * n0))
    return {"selection_overhead_s": max(0.0, extra[0] - slope * b0 * n0),
            "selection_s_per_token": slope}


def _linear_rate(timer: _Timer, x: Any, weights: list[Any],
                 multiply: Callable[[Any, Any], Any] | None = None) -> float:
    """FLOP/s of x @ W.T (torch's Linear layout) over each weight in turn, by ``multiply(x, w)``
    (default ``x @ w.T``)."""
    multiply = multiply or (lambda a, w: a @ w.T)

    def run() -> None:
        for w in weights:
            multiply(x, w)

    rows, inner = x.shape
    return 2.0 * rows * inner * weights[0].shape[0] * len(weights) / timer.best_s(run)


def _runtime_linear(torch: Any, device: str, dtype: Any
                    ) -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]] | None:
    """(pack, multiply) as flexalisa's engine and runtime multiply weights on this device
    (``flexalisa.models.linear``: oneDNN-packed fp32 weights on a CPU, which ran at about
    twice the rate of plain GEMMs at 4-16 rows on an AMD EPYC); None where they multiply plain
    tensors or flexalisa is not installed beside the cost model."""
    try:
        from flexalisa.models.linear import can_pack, linear, pack
    except ImportError:
        return None
    return (pack, linear) if can_pack(torch.device(device), dtype) else None


def _gemm_table(torch: Any, timer: _Timer, device: str, dtype: Any
                ) -> tuple[tuple[tuple[int, int, float], ...], float]:
    """(rows, inner, FLOP/s) over GEMM_TABLE_ROWS x GEMM_TABLE_INNER with (4096, inner) weights,
    multiplied as flexalisa's engine and runtime multiply them (``_runtime_linear``), and the
    plain one-row GEMV rate over the widest weights (a memory-bandwidth reading).

    Points with <= 64 rows stream 256 MiB of distinct weights (past any last-level cache), as a
    decode step streams a model's layers; larger row counts reuse one weight (compute-bound).
    """
    sub = _Timer(timer.clock, timer.sync,
                 timer.budget_s / (len(GEMM_TABLE_ROWS) * len(GEMM_TABLE_INNER) + 1))
    packing = _runtime_linear(torch, device, dtype)
    table, gemv = [], 0.0
    for inner in GEMM_TABLE_INNER:
        one = 4096 * inner * torch.finfo(dtype).bits // 8
        weights = [torch.empty(4096, inner, device=device, dtype=dtype).uniform_()
                   for _ in range(max(1, 256 * MIB // one))]
        if inner == GEMM_TABLE_INNER[-1]:
            gemv = _linear_rate(sub, torch.randn(1, inner, device=device, dtype=dtype), weights)
        multiply = None
        if packing is not None:
            weights, multiply = [packing[0](w) for w in weights], packing[1]
        for rows in GEMM_TABLE_ROWS:
            x = torch.randn(rows, inner, device=device, dtype=dtype)
            table.append((rows, inner, _linear_rate(sub, x, weights if rows <= 64 else
                                                    weights[:1], multiply)))
        del weights
    return tuple(sorted(table)), gemv


def _device_rates(torch: Any, timer: _Timer, cuda: bool, host_copy: float) -> dict[str, Any]:
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    big = 4096 if cuda else 1024
    table, gemv = _gemm_table(torch, _Timer(timer.clock, timer.sync, 2 * timer.budget_s),
                              device, dtype)
    rate = {(m, k): f for m, k, f in table}
    out: dict[str, Any] = dict(
        gpu_gemm_flops_per_s=_gemm_rate(torch, timer, device, dtype, big, big, big),
        gpu_skinny_flops_per_s=rate[(16, GEMM_TABLE_INNER[-1])], gemm_flops_table=table,
        **_selection_costs(torch, timer, device, dtype))
    out.update(_layer_step_overheads_s(torch, timer, device)
               or {"layer_overhead_s": _layer_overhead_s(torch, timer, device, dtype)})
    if cuda:
        pinned = torch.empty(64 * MIB, dtype=torch.uint8).pin_memory()
        dev_a = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
        dev_b = torch.empty_like(dev_a)
        out.update(h2d_bytes_per_s=_copy_rate(timer, pinned, dev_a[: pinned.numel()]),
                   d2h_bytes_per_s=_copy_rate(timer, dev_a[: pinned.numel()], pinned),
                   gpu_mem_bytes_per_s=2.0 * _copy_rate(timer, dev_a, dev_b),
                   gpu_name=torch.cuda.get_device_name(0), link_name="PCIe (measured)",
                   gpu_mem_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        # gemv: a plain one-row GEMV streaming 256 MiB of (4096, 4096) weights
        out.update(h2d_bytes_per_s=host_copy, d2h_bytes_per_s=host_copy,
                   # copies inline on the compute thread (no free CPU) cannot overlap at all
                   copy_overlap=(_copy_overlap(torch, timer.budget_s)
                                 if copy_threads_fit(torch.get_num_threads()) else 0.0),
                   gpu_mem_bytes_per_s=gemv / 2 * 4,  # 2 FLOPs per 4-byte weight read
                   gpu_name=f"CPU as device ({cpu_description()})",
                   link_name="host memcpy", gpu_mem_bytes=DEFAULT_CPU_DEVICE_GPU_MEM_BYTES)
    return out


def cpu_description() -> str:
    """The CPU's model name and widest vector extension, e.g. 'Intel Xeon ... (AVX-512, AMX)'.

    Benchmarks print it: the same code runs at very different speeds on an AVX2 and an
    AVX-512 host, so a figure is only comparable with one from the same kind of CPU.
    """
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("amx_tile", "AMX"))
           if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    return f"{name} ({', '.join(isa)})" if isa else name


def measure_profile(gpu_mem_bytes: int | None = None, cpu_mem_bytes: int | None = None,
                    budget_s: float = 15.0, threads: int | None = None) -> HardwareProfile:
    """Measure GEMM rates, memory and copy bandwidths, and dispatch overhead (~``budget_s``).

    ``threads`` sets torch's intra-op threads first (the runtime must then use the same count).
    """
    import psutil
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    one_cpu_thread = not cuda and torch.get_num_threads() == 1
    timer = _Timer(time.process_time if one_cpu_thread else time.perf_counter,
                   torch.cuda.synchronize if cuda else (lambda: None), budget_s / 8)
    host_a = torch.empty(64 * MIB, dtype=torch.uint8).fill_(1)
    host_copy = _copy_rate(timer, host_a, torch.empty_like(host_a))  # bytes copied per second
    rates = _device_rates(torch, timer, cuda, host_copy)
    cpu_flops = rates["gpu_gemm_flops_per_s"] if not cuda else _gemm_rate(
        torch, timer, "cpu", torch.float32, 1024, 1024, 1024)
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    rates["gpu_mem_bytes"] = int(gpu_mem_bytes or rates["gpu_mem_bytes"])
    return HardwareProfile(
        name=f"measured:{platform.node()}", device_kind="cuda" if cuda else "cpu",
        cpu_name=f"{cpu_description()} ({cores} cores, "
        f"{torch.get_num_threads()} torch threads)",
        cpu_mem_bytes=int(cpu_mem_bytes or psutil.virtual_memory().available),
        cpu_flops_per_s=cpu_flops, cpu_mem_bytes_per_s=3.0 * host_copy,
        compute_dtype_bytes=2 if cuda else 4, cpu_compute_dtype_bytes=4, **rates)
