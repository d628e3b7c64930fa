"""Run totals summed over blocks, reported as ``GenerationResult.extras``.

Keys (all bytes are logical transfers: a GPU-tier/device <-> host copy counts even on a
CPU-only machine, so a CPU run reports what a GPU run would move):
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flexalisa.kv import TieredKVStore
from flexalisa.runtime.budget import BlockMemory
from flexalisa.runtime.device import Device
from flexalisa.runtime.loop import BlockStats, phase_seconds
from flexalisa.schedule import Tier, phase_of
from policy.policy import Policy

EXTRAS_KEYS = {
    "runner": "'offload'",
    "device": "'cpu' or 'cuda'",
    "policy": "the Policy as a dict",
    "num_blocks": "blocks run (OOM reruns included)",
    "phase2_start_step": "resolved decode step phase II starts (first block; >= gen_len-1: never)",
    "phase3_start_step": "resolved decode step phase III starts (first block)",
    "phase_crossed_at_step": "{'phase2': s, 'phase3': s}: first generation step (0 = prefill) "
                             "run in that phase, None if never reached",
    "phase_s": "wall seconds: prefill, and decode steps in phase1/phase2/phase3",
    "h2d_bytes": "host -> device bytes: KV fetches + recompute hidden + weights + activations",
    "d2h_bytes": "device -> host bytes: KV moves/stores + kept hidden + activations",
    "bytes": "the same split by kind: kv_h2d, kv_d2h, weight_h2d, act_h2d, act_d2h",
    "tokens_fetched": "distinct (row, slot) CPU-tier K,V fetched, over layers and steps",
    "tokens_recomputed": "distinct (row, slot) K,V recomputed from hidden states",
    "peak_bytes": "{'gpu', 'cpu'}: fixed part (weights, buffers, activations) + KV peak",
    "peak_kv_bytes": "{'gpu', 'cpu', 'recompute'}: summed per-store peaks (an upper bound)",
    "reserved_bytes": "{'gpu', 'cpu'}: what the plan reserved against the budgets",
    "op_s": "seconds per op kind: linear, attention, selection, recompute, kv_gather, "
            "transfer_wait",
    "copy_mode": "how copy jobs ran: streams (cuda), threads or inline (cpu, no CPU free)",
    "transfer_busy_s": "seconds the copy lanes were busy",
    "transfer_hidden_share": "share of copy time overlapped with compute (cpu: 1 - wait/busy, "
                             "0 when inline; cuda: (compute + copy - wall) / copy, from CUDA "
                             "events)",
    "max_live_streamed_layers": "streamed weight layers on the device at once (<= 2)",
    "oom_retries": "blocks rerun with a smaller gpu batch after an out-of-memory error",
}
__doc__ = (__doc__ or "") + "\n".join(f"    {key}: {text}" for key, text in EXTRAS_KEYS.items())


class RunTotals:
    """Accumulates block results; ``extras()`` renders them."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.prefill_s = 0.0  # summed prefill wall time
        self.decode_s = 0.0  # summed decode wall time
        self.num_blocks = 0
        self.oom_retries = 0
        self.phase_starts: tuple[int, int] | None = None  # of the first block
        self.crossed: dict[str, int | None] = {"phase2": None, "phase3": None}
        self.phase_s = {"prefill": 0.0, "phase1": 0.0, "phase2": 0.0, "phase3": 0.0}
        self.bytes = dict.fromkeys(("kv_h2d", "kv_d2h", "weight_h2d", "act_h2d", "act_d2h"), 0)
        self.tokens = {"fetched": 0, "recomputed": 0}
        self.peak = {"gpu": 0, "cpu": 0}
        self.peak_kv = {tier.value: 0 for tier in Tier}
        self.reserved = {"gpu": 0, "cpu": 0}
        self.op_s: dict[str, float] = {}
        self.transfer_busy_s = 0.0
        self.max_live_streamed = 0

    def add_block(self, memory: BlockMemory, stats: BlockStats,
                  stores: Iterable[TieredKVStore], op_s: dict[str, float],
                  device: Device) -> None:
        self.num_blocks += 1
        plan = memory.plan
        phase2, phase3 = plan.phase2_start_step, plan.phase3_start_step
        if self.phase_starts is None:
            self.phase_starts = (phase2, phase3)
        for step_idx in range(len(stats.step_marks)):
            phase = phase_of(step_idx, phase2, phase3)
            for name, start in (("phase2", 2), ("phase3", 3)):
                if phase >= start and (self.crossed[name] is None
                                       or step_idx < self.crossed[name]):
                    self.crossed[name] = step_idx
        seconds = phase_seconds(stats, device, phase2, phase3)
        for name, value in seconds.items():
            self.phase_s[name] += value
        self.prefill_s += seconds["prefill"]
        self.decode_s += seconds["phase1"] + seconds["phase2"] + seconds["phase3"]
        kv_peak = dict.fromkeys(Tier, 0)
        for store in stores:
            c = store.counters
            self.bytes["kv_h2d"] += c.h2d_bytes
            self.bytes["kv_d2h"] += c.d2h_bytes
            self.tokens["fetched"] += c.tokens_fetched
            self.tokens["recomputed"] += c.tokens_recomputed
            for tier in Tier:
                kv_peak[tier] += c.peak_bytes[tier]
        for tier in Tier:
            self.peak_kv[tier.value] = max(self.peak_kv[tier.value], kv_peak[tier])
        self.peak["gpu"] = max(self.peak["gpu"], memory.gpu_fixed_bytes + kv_peak[Tier.GPU])
        self.peak["cpu"] = max(self.peak["cpu"], memory.cpu_fixed_bytes + kv_peak[Tier.CPU]
                               + kv_peak[Tier.RECOMPUTE])
        self.reserved["gpu"] = max(self.reserved["gpu"], memory.gpu_bytes)
        self.reserved["cpu"] = max(self.reserved["cpu"], memory.cpu_bytes)
        self.bytes["weight_h2d"] += stats.weight_h2d_bytes
        self.bytes["act_h2d"] += stats.act_h2d_bytes
        self.bytes["act_d2h"] += stats.act_d2h_bytes
        for kind, value in op_s.items():
            self.op_s[kind] = self.op_s.get(kind, 0.0) + value
        self.transfer_busy_s += device.busy_s(stats.handles)
        self.max_live_streamed = max(self.max_live_streamed, stats.max_live_streamed_layers)

    def extras(self, device: Device) -> dict[str, Any]:
        b = self.bytes
        phase2, phase3 = self.phase_starts or (None, None)
        busy = self.transfer_busy_s
        if device.kind == "cuda":  # events: compute and copy time that ran at the same time
            compute_s = sum(v for k, v in self.op_s.items() if k != "transfer_wait")
            overlap_s = compute_s + busy - (self.prefill_s + self.decode_s)
        elif device.copy_mode == "inline":  # the copies ran on the compute thread
            overlap_s = 0.0
        else:  # copy threads: what compute did not have to wait for
            overlap_s = busy - self.op_s.get("transfer_wait", 0.0)
        hidden = min(max(overlap_s, 0.0), busy) / busy if busy > 0 else 0.0
        return {
            "runner": "offload", "device": device.kind, "copy_mode": device.copy_mode,
            "policy": self.policy.to_dict(),
            "num_blocks": self.num_blocks, "phase2_start_step": phase2,
            "phase3_start_step": phase3, "phase_crossed_at_step": dict(self.crossed),
            "phase_s": dict(self.phase_s),
            "h2d_bytes": b["kv_h2d"] + b["weight_h2d"] + b["act_h2d"],
            "d2h_bytes": b["kv_d2h"] + b["act_d2h"], "bytes": dict(b),
            "tokens_fetched": self.tokens["fetched"],
            "tokens_recomputed": self.tokens["recomputed"],
            "peak_bytes": dict(self.peak), "peak_kv_bytes": dict(self.peak_kv),
            "reserved_bytes": dict(self.reserved), "op_s": dict(self.op_s),
            "transfer_busy_s": self.transfer_busy_s,
            "transfer_hidden_share": hidden,
            "max_live_streamed_layers": self.max_live_streamed,
            "oom_retries": self.oom_retries,
        }
