"""`flexalisa eval`: teacher-forced perplexity on the tiny chat model, and its errors."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from flexalisa.attention import make_method
from flexalisa.engine import Engine
from flexalisa.errors import FlexalisaError
from flexalisa.eval import EvalConfig, add_parser, run_eval, teacher_forced
from flexalisa.models import load_model

CONTEXT, PREFILL, SEGMENTS = 48, 8, 3  # the tiny model's context is 96


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flexalisa")
    add_parser(parser.add_subparsers(dest="subcommand", required=True))
    return parser.parse_args(["eval", *argv])


def cli_eval(model, *flags: str, capsys) -> dict:
    args = parse(["--model", str(model), "--context", str(CONTEXT), "--prefill", str(PREFILL),
                  "--segments", str(SEGMENTS), *flags])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_swa_at_zero_sparsity_is_exactly_dense(tiny_chat_model, capsys) -> None:
    out = cli_eval(tiny_chat_model, "--method", "swa", "--sparsity", "0", capsys=capsys)
    assert out["num_tokens"] == SEGMENTS * (CONTEXT - PREFILL)
    assert math.isclose(out["ppl"], out["dense_ppl"], rel_tol=1e-6)
    assert out["top1_agreement"] == 1.0
    assert out["method"] == "swa" and out["text"] == "pydoc_data.topics"


@pytest.mark.parametrize("flags", [
    ["--method", "swa", "--sparsity", "0.8"],
    ["--method", "swa", "--sparsity", "0.8", "--per-kv-head", "--query-channels", "4"],
    ["--method", "h2o", "--sparsity", "0.5"],
    ["--method", "local", "--sparsity", "0.9"],
])
def test_sparse_ppl_is_finite_and_differs_from_dense(tiny_chat_model, capsys, flags) -> None:
    out = cli_eval(tiny_chat_model, *flags, capsys=capsys)
    assert math.isfinite(out["ppl"]) and out["ppl"] > 1.0
    assert out["ppl"] != out["dense_ppl"]  # a 20% budget changes the logits
    assert 0.0 <= out["top1_agreement"] < 1.0
    assert math.isclose(out["ppl_ratio"], out["ppl"] / out["dense_ppl"])


def test_teacher_forced_dense_matches_a_full_forward(tiny_chat_model) -> None:
    """The decode loop scores token t + 1 from tokens <= t, as one causal forward does."""
    weights, _ = load_model(tiny_chat_model)
    engine = Engine(weights)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    nll, top1 = teacher_forced(engine, ids, prefill=5)
    logits = engine.forward_logits(ids, torch.ones_like(ids, dtype=torch.bool))  # (B, T, V)
    logp = torch.log_softmax(logits[:, 4:-1], dim=-1)  # predictions of ids[:, 5:]
    expected = -logp.gather(-1, ids[:, 5:, None])[..., 0]
    assert torch.allclose(nll.float(), expected, atol=1e-4)
    assert torch.equal(top1, logits[:, 4:-1].argmax(-1))
    sparse = Engine(weights, method=make_method("swa", 0.0))
    nll0, _ = teacher_forced(sparse, ids, prefill=5)
    assert torch.allclose(nll0, nll, atol=1e-5)


def test_bad_arguments_raise_one_line_errors(tiny_chat_model, tmp_path) -> None:
    model = str(tiny_chat_model)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    cases = [
        (dict(text=tmp_path / "missing.txt"), "is not a file"),
        (dict(text=short), "fewer than --segments"),
        (dict(context=200), "exceeds the model's maximum sequence length 96"),
    ]
    for overrides, message in cases:
        cfg = EvalConfig(model=model, **{"context": CONTEXT, "prefill": PREFILL, **overrides})
        with pytest.raises(FlexalisaError, match=message):
            run_eval(cfg)
    with pytest.raises(FlexalisaError, match="unknown sparsity method 'nope'"):
        EvalConfig(method="nope")
    with pytest.raises(FlexalisaError, match="sparsity 1.0"):
        EvalConfig(sparsity=1.0)
    with pytest.raises(FlexalisaError, match="swa only"):
        EvalConfig(method="h2o", query_channels=4)
    with pytest.raises(FlexalisaError, match="--prefill 64 must be in"):
        EvalConfig(context=64)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FlexalisaError, match="not UTF-8"):
        run_eval(EvalConfig(model=model, text=latin1, context=CONTEXT, prefill=PREFILL))
