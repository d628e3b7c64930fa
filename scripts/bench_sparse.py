"""Decode throughput of SWA vs dense on the all-on-device engine, in one run.

    python scripts/bench_sparse.py [--batch 16] [--prompt-len 1024] [--gen-len 128]

One prefill (SWA's, which also seeds its scores; the KV is the same as dense's) fills a cache;
each repeat then decodes ``gen_len - 1`` greedy steps from a copy of it, dense and SWA
alternating so that load drift hits both alike. Decode throughput = batch x (gen_len - 1) /
decode time (FlexGen's definition). One untimed pass per method counts the K/V rows SWA's
attention reads (its selection, attended where it lies in the cache, or gathered where the
compiled kernel is not built), to show it reads only its selection.

Caveat: on a 135M model at batch 16 on a CPU a decode step is dominated by the weight GEMMs
(about 135M multiply-adds per row), not attention, so attention sparsity changes little here.
Prints one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import Tensor

from flexalisa.attention import Selection, SparsityMethod, make_method
from flexalisa.cache import KVCache
from flexalisa.engine import Engine
from flexalisa.eval import read_text, text_segments
from flexalisa.models import load_model


class CountingMethod:
    """Delegates to ``inner``; counts the K/V rows each selection makes the attention read."""

    def __init__(self, inner: SparsityMethod) -> None:
        self.inner = inner
        self.rows_read = 0  # B x K_width per layer-step: rows read per KV head
        self.rows_selected = 0  # real (non-padding) selected entries, per KV head
        self.rows_cached = 0  # valid cached tokens: what dense attention reads

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def select(self, state, layer_idx: int, valid: Tensor, q=None, keys=None) -> Selection:
        sel = self.inner.select(state, layer_idx, valid, q=q, keys=keys)
        self.rows_read += sel.indices.shape[0] * sel.indices.shape[-1]  # B x K per KV head
        self.rows_selected += int(sel.counts.sum()) // sel.num_heads
        self.rows_cached += int(valid.sum())
        return sel


def decode(engine: Engine, cache: KVCache, state, logits: Tensor, positions: Tensor,
           steps: int) -> float:
    """Greedy decode ``steps`` tokens; returns the wall time in seconds."""
    started = time.perf_counter()
    for step_idx in range(steps):
        next_ids = logits.argmax(dim=-1)
        logits = engine.decode_step(cache, next_ids, positions + step_idx, state)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    weights, tok = load_model()
    method = make_method("swa", args.sparsity)
    prompts = text_segments(read_text(None), tok, args.batch, args.prompt_len)  # (B, T)
    valid = torch.ones_like(prompts, dtype=torch.bool)
    dense = Engine(weights)
    swa = Engine(dense.weights, method=method)  # shares the prepared (packed) weights
    max_len = args.prompt_len + args.gen_len
    cache = KVCache(swa.spec, args.batch, max_len, swa.device, swa.dtype)
    state = swa.new_method_state(args.batch, max_len)
    started = time.perf_counter()
    logits = swa.prefill(cache, prompts, valid, state)
    print(f"prefill {time.perf_counter() - started:.1f} s", file=sys.stderr)
    positions = torch.full((args.batch,), args.prompt_len)
    steps = args.gen_len - 1
    counter = CountingMethod(method)
    swa.method = counter  # the untimed counting pass
    decode(swa, copy.deepcopy(cache), copy.deepcopy(state), logits, positions, steps)
    swa.method = method
    times: dict[str, list[float]] = {"dense": [], "swa": []}
    for repeat_idx in range(args.repeats):
        for name, engine, st in (("dense", dense, None), ("swa", swa, state)):
            seconds = decode(engine, copy.deepcopy(cache), copy.deepcopy(st), logits,
                             positions, steps)
            times[name].append(seconds)
            print(f"repeat {repeat_idx} {name}: {seconds:.2f} s", file=sys.stderr)
    tput = {name: args.batch * steps / statistics.median(t) for name, t in times.items()}
    read_share = counter.rows_read / counter.rows_cached
    assert read_share < 1.0 - args.sparsity + 0.05, f"SWA read {read_share:.3f} of the KV"
    print(json.dumps({
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "sparsity": args.sparsity, "threads": torch.get_num_threads(),
        "dense_decode_tok_s": round(tput["dense"], 2), "swa_decode_tok_s": round(tput["swa"], 2),
        "swa_over_dense": round(tput["swa"] / tput["dense"], 3),
        "dense_decode_s": [round(t, 2) for t in times["dense"]],
        "swa_decode_s": [round(t, 2) for t in times["swa"]],
        "swa_kv_rows_read_share": round(read_share, 4),
        "swa_kv_rows_selected_share": round(counter.rows_selected / counter.rows_cached, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
