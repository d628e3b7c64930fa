"""`flexalisa eval`: teacher-forced perplexity of a KV sparsity method, and top-1 agreement.

Each text segment of ``context`` tokens is evaluated as decoding would see it: a dense prefill of
the first ``prefill`` tokens, then one true token per step through ``Engine.decode_step`` with
the method's state, so every position attends only to the method's selection *as it evolved over
the previous steps* (not a dense prefill of the whole segment). The logits after token t score
token t + 1: ``context - prefill`` predictions per segment.

Several methods run in the same loop, stacked as row blocks of one batch
(``attention.mixed.RowMix``), so weights are read once per step for all of them and every row
sees exactly its own method's selection. The dense reference is a causal forward of each
segment, which is what dense decoding computes (a test pins the two together).
``top1_agreement`` is the share of positions where the method's argmax equals dense's.

Default text: the English text of the standard library's ``pydoc_data/topics.py`` (its topic
strings joined by blank lines), so the command runs anywhere; the exact tokens differ slightly
between Python versions. Segments are consecutive, from the start of the text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from flexalisa.attention import SparsityMethod, make_method
from flexalisa.attention.mixed import RowMix
from flexalisa.cache import KVCache
from flexalisa.cli_flags import add_sparsity_flags
from flexalisa.engine import Engine
from flexalisa.errors import FlexalisaError
from flexalisa.models import Tokenizer, load_model
from flexalisa.models.weights import ModelWeights

DEFAULT_TEXT = "pydoc_data.topics"  # the name reported when --text is not given


@dataclass(frozen=True)
class EvalConfig:
    model: str | None = None  # HF dir or .gguf; None = the embedded SmolLM2
    text: Path | None = None  # UTF-8 text file; None = stdlib pydoc_data/topics.py's text
    method: str = "swa"  # sparsity method name (flexalisa.attention.METHODS)
    sparsity: float = 0.8  # KV sparsity s in [0, 1)
    context: int = 1024  # tokens per segment (prefill + evaluated positions)
    prefill: int = 64  # dense prompt tokens before the teacher-forced decode
    per_kv_head: bool = False  # select per KV head (score-based methods)
    query_channels: int = 0  # SWA's query-aware global selection: r channels; 0 = paper form
    segments: int = 2  # consecutive text segments, run as batch rows
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        if not 1 <= self.prefill < self.context:
            raise FlexalisaError(f"--prefill {self.prefill} must be in [1, --context "
                                 f"{self.context})")
        if self.segments < 1:
            raise FlexalisaError(f"--segments must be >= 1, got {self.segments}")
        self.make_method()  # validates method, sparsity and query_channels

    def make_method(self) -> SparsityMethod:
        """The configured method; FlexalisaError naming a bad name, sparsity or option."""
        try:
            return make_method(self.method, self.sparsity, self.per_kv_head, self.query_channels)
        except ValueError as exc:
            raise FlexalisaError(str(exc)) from exc


@dataclass(frozen=True)
class MethodScore:
    """Teacher-forced accuracy of one method on the evaluated positions."""

    ppl: float  # exp(mean next-token NLL)
    top1_agreement: float  # share of positions whose argmax equals dense's
    num_tokens: int  # evaluated positions (segments x (context - prefill))


def read_text(path: Path | None) -> str:
    """The file's UTF-8 text, or the stdlib pydoc topics text when ``path`` is None."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics.values())
    if not path.is_file():
        raise FlexalisaError(f"--text {str(path)!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FlexalisaError(f"--text {str(path)!r} is not UTF-8: {exc.reason}") from exc


def text_segments(text: str, tok: Tokenizer, segments: int, context: int) -> Tensor:
    """(segments, context) long: consecutive token segments from the start of ``text``."""
    ids = tok.encode(text)
    needed = segments * context
    if len(ids) < needed:
        raise FlexalisaError(f"text has {len(ids)} tokens, fewer than --segments {segments} x "
                             f"--context {context} = {needed}")
    return torch.tensor(ids[:needed], dtype=torch.long).view(segments, context)


def teacher_forced(engine: Engine, ids: Tensor, prefill: int,
                   desc: str = "eval") -> tuple[Tensor, Tensor]:
    """Per-position NLL (B, T - prefill) float64 and argmax (B, T - prefill) long.

    ids (B, T): prefill of ids[:, :prefill], then decode steps feeding the true tokens.
    """
    batch, length = ids.shape
    ids = ids.to(engine.device)
    cache = KVCache(engine.spec, batch, length - 1, engine.device, engine.dtype)
    state = engine.new_method_state(batch, length - 1)
    valid = torch.ones(batch, prefill, dtype=torch.bool, device=engine.device)
    logits = engine.prefill(cache, ids[:, :prefill], valid, state)  # predicts ids[:, prefill]
    nll, top1 = [], []
    steps = tqdm(range(prefill, length), desc=desc, unit="step", file=sys.stderr,
                 mininterval=1.0 if sys.stderr.isatty() else 60.0)
    for step_idx in steps:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        nll.append(-logp.gather(-1, ids[:, step_idx, None])[:, 0].double())
        top1.append(logits.argmax(dim=-1))
        if step_idx + 1 < length:
            positions = torch.full((batch,), step_idx, device=engine.device)
            logits = engine.decode_step(cache, ids[:, step_idx], positions, state)
    return torch.stack(nll, dim=1).cpu(), torch.stack(top1, dim=1).cpu()


def dense_forced(engine: Engine, ids: Tensor, prefill: int) -> tuple[Tensor, Tensor]:
    """``teacher_forced`` for dense attention, from one causal forward per row.

    Dense decoding attends every earlier token, so its logits are the causal forward's (to
    float rounding; pinned by a test): (N, T - prefill) NLL float64 and argmax long.
    """
    nll, top1 = [], []
    for row in ids:
        logits = engine.forward_logits(row[None], torch.ones(1, row.numel(), dtype=torch.bool))
        logits = logits[0, prefill - 1:-1].float()  # (T - prefill, V): predicts row[prefill:]
        logp = torch.log_softmax(logits, dim=-1)
        target = row[prefill:].to(logits.device)
        nll.append(-logp.gather(-1, target[:, None])[:, 0].double().cpu())
        top1.append(logits.argmax(dim=-1).cpu())
    return torch.stack(nll), torch.stack(top1)


def score_methods(weights: ModelWeights, methods: list[SparsityMethod], ids: Tensor,
                  prefill: int, device: str = "cpu") -> tuple[MethodScore, list[MethodScore]]:
    """Dense's score and each method's on the segments ``ids`` (N, T).

    The methods run in one teacher-forced loop as row blocks of one batch; dense, whose decode
    equals a causal forward, runs as one forward pass (a dense block in the loop would also pad
    every other block's gather to the full cache).
    """
    dense = Engine(weights, device=device)
    dense_nll, dense_top1 = dense_forced(dense, ids, prefill)
    mixed = RowMix(tuple(methods), rows_per_part=ids.shape[0])
    # dense.weights are already on the device (and packed): the second engine shares them
    nll, top1 = teacher_forced(Engine(dense.weights, device=device, method=mixed),
                               ids.repeat(len(methods), 1), prefill)
    nll = torch.cat([dense_nll, nll]).view(len(methods) + 1, ids.shape[0], -1)  # (P, N, T')
    top1 = torch.cat([dense_top1, top1]).view(len(methods) + 1, ids.shape[0], -1)
    scores = [MethodScore(ppl=math.exp(float(nll[p].mean())),
                          top1_agreement=float((top1[p] == top1[0]).double().mean()),
                          num_tokens=nll[p].numel())
              for p in range(len(methods) + 1)]
    return scores[0], scores[1:]


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg``'s method against dense; returns the result record."""
    method = cfg.make_method()
    text = read_text(cfg.text)  # check the text before the slow model load
    weights, tok = load_model(cfg.model)
    if tok is None:
        raise FlexalisaError(f"{cfg.model}: no tokenizer (tokenizer.json, or vocab.json + "
                             "merges.txt); eval needs one")
    if cfg.context > weights.spec.max_seq_len:
        raise FlexalisaError(f"--context {cfg.context} exceeds the model's maximum sequence "
                             f"length {weights.spec.max_seq_len}")
    ids = text_segments(text, tok, cfg.segments, cfg.context)
    started = time.perf_counter()
    dense, (score,) = score_methods(weights, [method], ids, cfg.prefill, cfg.device)
    return {
        "method": cfg.method, "sparsity": cfg.sparsity, "per_kv_head": cfg.per_kv_head,
        "query_channels": cfg.query_channels, "ppl": score.ppl, "dense_ppl": dense.ppl,
        "ppl_ratio": score.ppl / dense.ppl, "top1_agreement": score.top1_agreement,
        "num_tokens": score.num_tokens, "segments": cfg.segments, "context": cfg.context,
        "prefill": cfg.prefill, "text": str(cfg.text) if cfg.text else DEFAULT_TEXT,
        "model": weights.spec.name, "elapsed_s": round(time.perf_counter() - started, 1),
    }


_SPARSITY_HELP = {  # eval's own wording of the shared sparsity flags
    "method": "dense, swa, h2o, local, strided or sinks",
    "sparsity": "KV sparsity s in [0, 1)",
    "per_kv_head": "select per KV head",
    "query_channels": "swa only: query-aware global selection from r query channels (SparQ)",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` subcommand (sets ``func``)."""
    p = subparsers.add_parser("eval", help="teacher-forced perplexity of a KV sparsity method")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: the stdlib's pydoc_data/topics.py text)")
    add_sparsity_flags(p, "--method", method_default="swa", method_choices=None,
                       sparsity_default=0.8, help_text=_SPARSITY_HELP)
    p.add_argument("--context", type=int, default=1024, help="tokens per segment")
    p.add_argument("--prefill", type=int, default=64, help="dense prompt tokens per segment")
    p.add_argument("--segments", type=int, default=2, help="text segments, run as batch rows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = EvalConfig(model=args.model, text=args.text, method=args.method,
                     sparsity=args.sparsity, context=args.context, prefill=args.prefill,
                     per_kv_head=args.per_kv_head, query_channels=args.query_channels,
                     segments=args.segments, device=args.device)
    print(json.dumps(run_eval(cfg)))
    return 0
