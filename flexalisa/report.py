"""Run statistics with FlexGen's throughput definitions, and the report.json / report.md files.

    prefill throughput = prompt tokens / prefill time
    decode throughput  = (generated tokens - prompts) / decode time  (1st token is from prefill)
    total throughput   = generated tokens / (prefill + decode time)
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunStats:
    num_prompts: int = 0  # prompts generated in this run (skipped ones excluded)
    prompt_tokens: int = 0  # real prompt tokens prefilled
    generated_tokens: int = 0  # tokens produced, EOS included
    prefill_s: float = 0.0  # summed prefill wall time
    decode_s: float = 0.0  # summed decode wall time
    extras: dict = field(default_factory=dict)  # runner-specific counters and settings

    def add(self, num_prompts: int, prompt_tokens: int, generated: int, prefill_s: float,
            decode_s: float) -> None:
        self.num_prompts += num_prompts
        self.prompt_tokens += prompt_tokens
        self.generated_tokens += generated
        self.prefill_s += prefill_s
        self.decode_s += decode_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.generated_tokens - self.num_prompts
        return steps / self.decode_s if self.decode_s else 0.0

    @property
    def total_tok_s(self) -> float:
        elapsed = self.prefill_s + self.decode_s
        return self.generated_tokens / elapsed if elapsed else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s,
                 total_tok_s=self.total_tok_s)
        return d

    def summary_line(self) -> str:
        return (f"{self.num_prompts} prompts, {self.prompt_tokens} prompt + "
                f"{self.generated_tokens} generated tokens in "
                f"{self.prefill_s + self.decode_s:.2f} s | throughput tok/s: "
                f"prefill {self.prefill_tok_s:.1f}, decode {self.decode_tok_s:.1f}, "
                f"total {self.total_tok_s:.1f}")


def summarize_runs(runs: list[RunStats]) -> dict:
    """Median of each FlexGen throughput over repeated runs, with `_min` / `_max`, and the
    median elapsed seconds."""
    out: dict = {}
    for key in ("prefill_tok_s", "decode_tok_s", "total_tok_s"):
        values = [getattr(r, key) for r in runs]
        out[key] = statistics.median(values)
        out[key + "_min"], out[key + "_max"] = min(values), max(values)
    out["elapsed_s"] = statistics.median(r.prefill_s + r.decode_s for r in runs)
    return out


def timing_stats(batch: int, prompt_len: int, gen_len: int, prefill_s: float,
                 decode_s: float) -> RunStats:
    """RunStats of one fixed-shape run (every row: prompt_len in, gen_len out)."""
    stats = RunStats()
    stats.add(batch, batch * prompt_len, batch * gen_len, prefill_s, decode_s)
    return stats


def write_report(out_dir: Path, report: dict) -> tuple[Path, Path]:
    """report.json plus a human-readable report.md in out_dir."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict) -> str:
    stats = report.get("stats", {})
    lines = ["# flexalisa run report", ""]
    for key in ("model", "device", "command", "ids_already_done", "batch_size",
                "batch_size_source", "decode_attention"):
        if key in report:
            lines.append(f"- **{key}**: `{report[key]}`")
    lines += ["", "| metric | value |", "|---|---|"]
    for key in ("num_prompts", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s",
                "prefill_tok_s", "decode_tok_s", "total_tok_s"):
        if key in stats:
            value = stats[key]
            lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float)
                         else f"| {key} | {value} |")
    for section, body in report.items():
        if isinstance(body, dict) and section != "stats":
            lines += ["", f"## {section}", "", "```json", json.dumps(body, indent=2), "```"]
    return "\n".join(lines) + "\n"


_MAX_KEYS = ("peak_bytes", "peak_kv_bytes", "reserved_bytes", "max_live_streamed_layers")
_FIRST_KEYS = ("policy", "runner", "device", "copy_mode", "phase2_start_step",
               "phase3_start_step", "phase_crossed_at_step")


def merge_extras(prev: dict | None, new: dict) -> dict:
    """Combine one batch's runner extras into the job's: counts and seconds add up, peaks take
    the max, settings and first crossings keep the first batch's value, and the share of copy
    time hidden is the copy-time-weighted mean (the hidden seconds add up)."""
    if prev is None:
        return json.loads(json.dumps(new))  # a deep copy of plain data
    out = dict(prev)
    busy = (prev.get("transfer_busy_s", 0.0), new.get("transfer_busy_s", 0.0))
    for key, value in new.items():
        if key == "transfer_hidden_share" and key in out:
            hidden_s = out[key] * busy[0] + value * busy[1]
            out[key] = hidden_s / (busy[0] + busy[1]) if busy[0] + busy[1] > 0 else 0.0
        elif key not in out or key in _FIRST_KEYS:
            out.setdefault(key, value)
        elif key in _MAX_KEYS:
            out[key] = _combine(out[key], value, max)
        elif isinstance(value, (int, float, dict)) and not isinstance(value, bool):
            out[key] = _combine(out[key], value, lambda a, b: a + b)
        else:
            out[key] = value
    return out


def _combine(a, b, op):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _combine(a[k], b[k], op) if k in a and k in b else b.get(k, a.get(k))
                for k in {**a, **b}}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return op(a, b)
    return b


def breakdown_by_op(extras: dict) -> dict[str, float]:
    """Seconds per op kind that add up to the run's wall time (the phases' sum): the runner's
    timed sections (``op_s``); ``copies (inline)``, the copy jobs' time where they ran on the
    compute thread (no section times them; with copy threads or CUDA streams they overlap, and
    only ``transfer_wait`` is compute's); and ``other``, the rest (the loop's own work). The
    runner's ``kv_gather`` sections contain its ``recompute`` ones (``runtime/timing.py``), so
    here ``kv_gather`` is the gather less the recompute: every part counted once."""
    by_op = dict(extras.get("op_s", {}))
    if "kv_gather" in by_op and "recompute" in by_op:
        by_op["kv_gather"] = max(0.0, by_op["kv_gather"] - by_op["recompute"])
    if extras.get("copy_mode") == "inline":
        by_op["copies (inline)"] = extras.get("transfer_busy_s", 0.0)
    wall = sum(extras.get("phase_s", {}).values())
    if wall:
        by_op["other"] = max(0.0, wall - sum(by_op.values()))
    return by_op


def runtime_sections(extras: dict | None, policy, prediction,
                     measured_total_tok_s: float) -> dict:
    """Report sections for an offloaded run: the policy, the runner's counters, the breakdown
    the plots read, and predicted vs measured when the cost model chose or priced the policy."""
    sections: dict = {}
    if policy is not None:
        sections["policy"] = policy.to_dict()
    if extras:
        sections["runtime"] = {k: v for k, v in extras.items() if k != "policy"}
        sections["breakdown"] = {"by_op": breakdown_by_op(extras),
                                 "by_phase": extras.get("phase_s", {})}
    if prediction is not None:
        measured = measured_total_tok_s
        sections["prediction"] = {
            "predicted_prefill_tok_s": prediction.prefill_tok_per_s,
            "predicted_decode_tok_s": prediction.decode_tok_per_s,
            "predicted_total_tok_s": prediction.total_tok_per_s,
            "measured_total_tok_s": measured,
            "relative_error": (prediction.total_tok_per_s - measured) / measured
            if measured else None,
        }
    return sections


def kv_memory_per_step(spec, policy, prompt_len: int, gen_len: int, batch: int,
                       phase2_start_step: int, phase3_start_step: int,
                       dtype_bytes: int = 4) -> list[dict]:
    """Bytes each KV tier holds after every step, from the tier plan the runtime executed
    (the same `plan_tiers` call, with the phase starts it resolved), over all layers and rows.

    GPU and CPU tiers hold K and V; the recompute tier holds the layer-input hidden states.
    CPU-tier compression is counted at its code width (int8: 1 byte, int4: half a byte).
    """
    from flexalisa.schedule import TierPlanConfig, plan_tiers

    plan = plan_tiers(TierPlanConfig(
        prompt_len, gen_len, policy.kv_gpu_share, policy.kv_cpu_share,
        policy.kv_recompute_share, phase2_start_step, phase3_start_step))
    cpu_bytes = {"none": dtype_bytes, "int8": 1, "int4": 0.5}[policy.kv_compression]
    per_token = spec.num_layers * batch
    return [{"step": s.step_idx,
             "gpu": (s.gpu.end - s.gpu.start) * per_token * spec.kv_numel_per_token * dtype_bytes,
             "cpu": (s.cpu.end - s.cpu.start) * per_token * spec.kv_numel_per_token * cpu_bytes,
             "recompute": (s.recompute.end - s.recompute.start) * per_token
             * spec.hidden_numel_per_token * dtype_bytes}
            for s in plan.steps]
