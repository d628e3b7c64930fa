"""The Python API (`flexalisa.LLM`): completions in input order equal HF transformers' greedy
generation per prompt; offloaded runs equal on-device ones; bad input raises FlexalisaError."""

from __future__ import annotations

import pytest
import torch

from flexalisa import LLM, SamplingParams
from flexalisa.errors import FlexalisaError, ModelLoadError
from policy import Policy

PROMPTS = ["The module", "A much longer prompt about the built-in functions and", "x = 1"]


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    with LLM(tiny_chat_model, batch_size=2) as llm:
        yield llm


def hf_greedy(model_dir, ids: list[int], max_new_tokens: int) -> list[int]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_completions_in_input_order_equal_hf_per_prompt(llm, tiny_chat_model):
    limits = [6, 9, 4]
    completions = llm.generate(PROMPTS, limits)  # batches of 2, sorted by length
    assert len(completions) == 3
    for prompt, limit, c in zip(PROMPTS, limits, completions):
        ids = llm.tokenizer.encode(prompt)
        assert c.prompt_tokens == len(ids)
        assert c.token_ids == hf_greedy(tiny_chat_model, ids, limit)
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert c.completion_tokens == len(c.token_ids) <= limit
        assert c.finish_reason == ("stop" if c.token_ids[-1] == 2 else "length")
    stats = llm.stats
    assert stats.num_prompts == 3 and stats.generated_tokens == sum(
        c.completion_tokens for c in completions) and stats.total_tok_s > 0


def test_a_single_string_and_an_empty_list(llm):
    [one] = llm.generate(PROMPTS[0], 6)
    assert one == llm.generate(PROMPTS, 6)[0]
    assert llm.generate([], 6) == []


def test_sampling_is_seeded(llm):
    def sample(seed):
        return [c.token_ids for c in llm.generate(PROMPTS, 8, SamplingParams(1.0, 1.0, seed),
                                                  ignore_eos=True)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sampling_per_prompt(llm):
    """One SamplingParams per prompt, as vLLM takes them: each row samples as it would with
    its params given to every row, and a greedy row is the greedy completion."""
    hot, cold = SamplingParams(1.0, 0.9, 5), SamplingParams()
    mixed = llm.generate(PROMPTS, 8, [hot, cold, hot], ignore_eos=True)
    assert mixed[1] == llm.generate(PROMPTS, 8, ignore_eos=True)[1]
    every = llm.generate(PROMPTS, 8, hot, ignore_eos=True)
    assert [mixed[0], mixed[2]] == [every[0], every[2]]
    with pytest.raises(FlexalisaError, match=r"one per prompt \(3\), got 2 items"):
        llm.generate(PROMPTS, 8, [hot, cold])


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.generate(["x " * 200]), "prompt 0 has"),
    (lambda llm: llm.generate(["", "a"]), "prompt 0 is empty"),
    (lambda llm: llm.generate(PROMPTS, [4, 4]), "one value or one per prompt (3)"),
    (lambda llm: llm.generate(PROMPTS, 0), "max_new_tokens must be >= 1"),
])
def test_bad_input_raises_flexalisa_error(llm, call, message):
    with pytest.raises(FlexalisaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(llm)


def test_bad_construction_raises_flexalisa_error(tiny_chat_model, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(tmp_path / "nowhere")
    with pytest.raises(FlexalisaError, match="--sparsity needs a --sparsity-method"):
        LLM(tiny_chat_model, sparsity_method="dense", sparsity=0.5)
    with pytest.raises(FlexalisaError, match="unknown sparsity method"):
        LLM(tiny_chat_model, sparsity_method="nope", sparsity=0.5)
    with pytest.raises(FlexalisaError, match="batch_size must be >= 1"):
        LLM(tiny_chat_model, batch_size=0)


def test_policy_runs_offloaded_with_the_on_device_tokens(llm, tiny_chat_model, tmp_path):
    """A policy streaming half the layers with KV over three tiers gives the engine's greedy
    tokens; a second call with shorter prompts reuses the runner, a longer one plans anew."""
    path = tmp_path / "policy.json"
    Policy(gpu_batch_size=1, num_gpu_batches=2, weights_gpu_share=0.5, weights_cpu_share=0.5,
           kv_gpu_share=0.3, kv_cpu_share=0.5, kv_recompute_share=0.2, phase2_start_step=0,
           phase3_start_step=0, act_gpu_share=0.5, act_cpu_share=0.5).save(path)
    want = [c.token_ids for c in llm.generate(PROMPTS, 10, ignore_eos=True)]
    with LLM(tiny_chat_model, policy=path) as off:
        assert [c.token_ids for c in off.generate(PROMPTS, 10, ignore_eos=True)] == want
        assert off.effective_batch_size == 2  # the policy's batch wins
        assert off.stats.extras["runtime"]["tokens_recomputed"] > 0
        runner = off.prepare(off.workload([[1] * 3], [4]))[0]
        assert [c.token_ids for c in off.generate(PROMPTS[:1], 4, ignore_eos=True)] == [
            want[0][:4]]
        assert off.prepare(off.workload([[1] * 3], [4]))[0] is runner
        off.generate(PROMPTS, 12, ignore_eos=True)
        assert off.prepare(off.workload([[1] * 3], [4]))[0] is not runner


def first_stop_prefix(tok, tokens: list[int], stop: str) -> list[int]:
    """The shortest prefix of ``tokens`` whose text contains ``stop``."""
    return next(tokens[:n] for n in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:n]))


def test_stop_strings_end_rows_and_cut_the_text(llm, tiny_chat_model, tmp_path):
    ref = llm.generate(PROMPTS, 12, ignore_eos=True)
    text = ref[1].text
    stop = next(s for s in (llm.tokenizer.decode(ref[1].token_ids[k:k + 2]) for k in range(3, 9))
                if s.isprintable() and text.find(s) > 0)  # two tokens' text, not at the start
    want = first_stop_prefix(llm.tokenizer, ref[1].token_ids, stop)
    got = llm.generate(PROMPTS, 12, stop=[stop, "never appears \u2603"], ignore_eos=True)
    assert got[1].token_ids == want and len(want) < 12
    assert got[1].text == text[:text.find(stop)] and got[1].finish_reason == "stop"
    for i in (0, 2):  # rows whose text lacks the stop string run on
        if stop not in ref[i].text:
            assert got[i] == ref[i]
    # the offloading runtime ends rows at the same tokens
    path = tmp_path / "policy.json"
    Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu_share=0.5, weights_cpu_share=0.5,
           kv_gpu_share=0.5, kv_cpu_share=0.5, kv_recompute_share=0.0, phase2_start_step=0,
           phase3_start_step=0, act_gpu_share=1.0, act_cpu_share=0.0).save(path)
    with LLM(tiny_chat_model, policy=path) as off:
        assert off.generate(PROMPTS, 12, stop=stop, ignore_eos=True) == got


def test_bad_stop_strings(llm):
    with pytest.raises(FlexalisaError, match="stop strings must be non-empty"):
        llm.generate(PROMPTS, 4, stop=[""])


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_llm(tiny_chat_model, tmp_path_factory):
    import json
    import shutil

    model = shutil.copytree(tiny_chat_model, tmp_path_factory.mktemp("templ") / "model")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    with LLM(model) as llm:
        yield llm


def test_conversations_go_through_the_chat_template(chat_llm):
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "The module"}]
    rendered = "<system>Be brief.\n<user>The module\n<assistant>"
    want = chat_llm.generate([rendered, rendered], 6)
    assert chat_llm.chat(conversation, 6) == want[:1]
    assert chat_llm.chat([conversation, conversation], 6) == want
    assert chat_llm.generate(["The module"], 6, chat=True) == chat_llm.generate(
        ["<user>The module\n<assistant>"], 6)
    with pytest.raises(FlexalisaError, match="prompt 1: \"messages\" must be a non-empty list"):
        chat_llm.generate(["ok", [{"role": "user"}]], 4)


def test_messages_lines_in_a_job(chat_llm, tmp_path):
    import json

    from flexalisa.cli import main
    from tests.conftest import write_jsonl

    rows = [{"id": "m", "messages": [{"role": "user", "content": "The module"}]},
            {"id": "p", "prompt": "<user>The module\n<assistant>"}]
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(chat_llm.weights.spec.name), "--input",
                 str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out),
                 "--gen-len", "6"]) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["m"]["text"] == got["p"]["text"]
    assert got["m"]["prompt_tokens"] == got["p"]["prompt_tokens"]


def test_out_of_memory_splits_the_batch(tiny_chat_model, monkeypatch):
    """A device that runs out of memory above one prompt per batch: each batch is split down
    to single prompts, with the single-prompt batches' completions; at one prompt, an error."""
    from flexalisa.engine import Engine

    with LLM(tiny_chat_model, batch_size=1) as one:
        want = one.generate(PROMPTS, 6)
    real = Engine.generate

    def small_device(self, prompts, *args, **kwargs):
        if len(prompts) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", small_device)
    limit = 1
    with LLM(tiny_chat_model, batch_size=3) as llm:
        assert llm.generate(PROMPTS, 6) == want
        assert llm.stats.extras["oom_splits"] == 2  # 3 -> 1 + 2, then 2 -> 1 + 1
        assert llm.stats.num_prompts == 3
        limit = 0
        with pytest.raises(FlexalisaError, match="out of cpu memory generating one prompt"):
            llm.generate(PROMPTS[:1], 6)


def test_sparsity_alone_is_swa(tiny_chat_model):
    with LLM(tiny_chat_model, sparsity=0.5) as llm:
        assert (llm.method.name, llm.method.sparsity) == ("swa", 0.5)
    with LLM(tiny_chat_model) as llm:
        assert llm.method is None


def test_the_engine_path_keeps_one_copy_of_the_weights(tiny_chat_model):
    """On a CPU in fp32 the LLM keeps the engine's packed weights instead of a second, loaded
    copy; an engine made after close() reuses them, with the same completions."""
    with LLM(tiny_chat_model) as llm:
        loaded = llm.weights.layers[0]["wqkv"]
        first = [c.token_ids for c in llm.generate(PROMPTS, 6, ignore_eos=True)]
        kept = llm.weights.layers[0]["wqkv"]
        assert kept.is_mkldnn and kept is not loaded and llm.weights is llm.prepare(
            llm.workload([[5] * 3], [4]))[0].weights
        llm.close()
        assert [c.token_ids for c in llm.generate(PROMPTS, 6, ignore_eos=True)] == first
        assert llm.weights.layers[0]["wqkv"] is kept
