"""The real SmolLM2-135M GGUF: our loader, tokenizer and engine vs transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from flexalisa.engine import Engine, left_pad

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis converts",
]

TEXTS = [
    "Hello world", "hello  world", "  leading spaces", "trailing spaces   ",
    "\ttabs\tand\nnewlines\n",
    "", " ", "\n\n\n", "café crème brûlée", "naïve façade", "Ünïcödé ßtraße", "日本語のテキスト",
    "中文字符测试", "한국어 문장", "Здравствуй, мир", "مرحبا بالعالم", "שלום עולם", "🙂😀🚀👍🏽",
    "emoji in text 🎉 party", "e\u0301 combining accent", "zero\u200bwidth", "A" * 100,
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    "SELECT * FROM users WHERE id = 42;", "<div class=\"x\">hi</div>", "{\"json\": [1, 2, 3]}",
    "x = [i for i in range(10) if i % 2]", "#include <stdio.h>", "$ pip install torch==2.13.0",
    "3.14159 2.71828 1e-10 -0.0", "1234567890", "12,345.67 USD", "2026-11-23T15:12:46Z",
    "https://example.com/path?q=1&r=2", "user@example.com", "CamelCaseIdentifier snake_case",
    "ALL CAPS SENTENCE.", "Mixed.Punctuation!?;:", "quotes 'single' \"double\" `back`",
    "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "text<|im_end|>more", "a\r\nb\rc",
    "It's don't won't y'all", "(parentheses) [brackets] {braces}", "~!@#$%^&*()_+",
    "The quick brown fox jumps over the lazy dog.", "    indented code block",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def test_fifty_varied_strings():
    assert len(TEXTS) == 50


def test_tokenizer_matches_hf_ids_and_round_trips(smollm, smollm_hf):
    _, tok = smollm
    _, hf_tok = smollm_hf
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text


def test_greedy_32_tokens_match_hf_for_4_batched_prompts(smollm, smollm_hf):
    weights, tok = smollm
    hf_model, _ = smollm_hf
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # really ragged, so left padding is exercised
    ours = Engine(weights).generate(prompts, 32, ignore_eos=True)
    ids, valid = left_pad(prompts, pad_id=weights.spec.pad_token_id)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=32,
                                do_sample=False, eos_token_id=None,
                                pad_token_id=weights.spec.pad_token_id)
    assert ours.tokens == ref[:, ids.shape[1]:].tolist()


def test_logits_match_hf(smollm, smollm_hf):
    weights, tok = smollm
    hf_model, _ = smollm_hf
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    ids, valid = left_pad(prompts, pad_id=weights.spec.pad_token_id)
    ours = Engine(weights).forward_logits(ids, valid)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=valid.long()).logits
    assert (ours - ref).abs()[valid].max().item() <= 1e-3


def test_chat_template_matches_hf(smollm, smollm_hf):
    _, tok = smollm
    _, hf_tok = smollm_hf
    for prompt in ("Hi", "List three colors:\n- red", "¿Qué tal?"):
        ours = tok.apply_chat_template(prompt)
        ref = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
        assert ours == ref
        assert tok.encode(ours) == hf_tok(ref, add_special_tokens=False).input_ids
    conversation = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Sky colour?"},
                    {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "And grass?"}]
    assert tok.apply_chat_template(conversation) == hf_tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("add_bos", [True, False])
def test_gpt2_style_vocab_and_merges_match_hf(tmp_path, add_bos):
    """A checkpoint dir with vocab.json + merges.txt and no tokenizer.json, as OPT ships: the
    SmolLM2 vocabulary written in that form, with OPT's tokenizer_config fields."""
    import json

    transformers = pytest.importorskip("transformers")
    from flexalisa.models import default_model_path
    from flexalisa.models.gguf_loader import open_gguf
    from flexalisa.models.gguf_tokenizer import CONTROL_TOKEN_TYPE, gguf_vocab
    from flexalisa.models.loader import dir_tokenizer

    vocab = gguf_vocab(open_gguf(default_model_path()))
    tokens, types, merges = vocab.tokens, vocab.token_types, vocab.merges
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False}
                for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL_TOKEN_TYPE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": add_bos, "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>"},
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "errors": "replace",
        "added_tokens_decoder": specials}))
    tok = dir_tokenizer(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.encode("Hi")[0] == 0) == add_bos  # <|endoftext|> is id 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids) == text.replace("<|endoftext|>", "").replace(
            "<|im_start|>", "").replace("<|im_end|>", ""), text


def write_vocab_gguf(path, pre: str, add_bos: bool, extra_user_defined: tuple[str, ...]):
    """The SmolLM2 vocabulary in a GGUF of its own, with another pre-tokenizer family, BOS
    flag and user-defined tokens (tokenizer metadata and one tensor, no model)."""
    from flexalisa.models import default_model_path
    from flexalisa.models.gguf_loader import open_gguf
    from flexalisa.models.gguf_tokenizer import USER_DEFINED_TOKEN_TYPE, gguf_vocab

    vocab = gguf_vocab(open_gguf(default_model_path()))
    tokens = vocab.tokens + list(extra_user_defined)
    types = vocab.token_types + [USER_DEFINED_TOKEN_TYPE] * len(extra_user_defined)
    write_tokenizer_gguf(path, "gpt2", tokens, types, add_bos, tokenizer_pre=pre,
                         token_merges=vocab.merges)


def write_tokenizer_gguf(path, model: str, tokens: list[str], types: list[int],
                         add_bos: bool | None, **fields) -> None:
    """A GGUF of tokenizer metadata and one tensor, no model: BOS id 1, EOS id 2, the BOS flag
    unless None, and ``fields`` as further ``GGUFWriter.add_<name>(value)`` calls."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre, add_bos", [("llama-bpe", True), ("qwen2", False),
                                          ("gpt-4o", False), ("smollm", True)])
def test_gguf_pre_tokenizer_families_bos_and_user_tokens_match_hf(tmp_path, pre, add_bos):
    """LLaMA-3-, Qwen2- and GPT-4o-style splits, add_bos_token and user-defined tokens, as
    transformers reads them from the same GGUF."""
    transformers = pytest.importorskip("transformers")
    from flexalisa.models.gguf_loader import open_gguf
    from flexalisa.models.gguf_tokenizer import gguf_vocab
    from flexalisa.models.tokenizer import Tokenizer

    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, pre, add_bos, ("<think>", "</think>"))
    tok = Tokenizer.from_gguf(gguf_vocab(open_gguf(path)))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = TEXTS + ["<think>why</think> 12345678 don't   stop\n\n  x", "HTTPServer's URLs"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True).input_ids, (pre, text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), (pre, text)
    assert (tok.encode("Hi")[0] == 1) == add_bos
    assert tok.encode("<think>")[-1] == 49152


def write_sentencepiece_gguf(path, num_pieces: int, add_bos: bool | None,
                             add_space_prefix: bool):
    """A SentencePiece-style GGUF vocabulary, as LLaMA-2 files store one: <unk>, <s>, </s>, the
    256 byte pieces <0x00>..<0xFF>, then pieces with descending scores and no merges. The pieces
    are SmolLM2's first byte-level tokens spelled as text, "▁" for a space."""
    from flexalisa.models import default_model_path
    from flexalisa.models.gguf_loader import open_gguf
    from flexalisa.models.gguf_tokenizer import byte_alphabet, gguf_vocab

    unspell = {c: b for b, c in byte_alphabet().items()}
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    seen = set(tokens)
    for token in gguf_vocab(open_gguf(default_model_path())).tokens:
        try:
            text = bytes(unspell[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", "▁")
        if piece and piece.isprintable() and piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(1)
        if len(tokens) == 259 + num_pieces:
            break
    tokens.append("<|user|>")  # a user-defined token, matched whole
    types.append(4)
    scores = [0.0] * 259 + [-float(i) for i in range(num_pieces)] + [0.0]
    write_tokenizer_gguf(path, "llama", tokens, types, add_bos, token_scores=scores,
                         unk_token_id=0, add_space_prefix=add_space_prefix)


@pytest.mark.parametrize("add_bos, add_space_prefix", [(None, True), (False, False)])
def test_gguf_sentencepiece_vocabulary_matches_hf(tmp_path, add_bos, add_space_prefix):
    """LLaMA-2-style GGUF vocabularies: merges rebuilt from scores, byte fallback, "▁" spaces,
    BOS by default; as transformers reads the same file."""
    transformers = pytest.importorskip("transformers")
    from flexalisa.models.gguf_loader import open_gguf
    from flexalisa.models.gguf_tokenizer import gguf_vocab
    from flexalisa.models.tokenizer import Tokenizer

    path = tmp_path / "sp.gguf"
    write_sentencepiece_gguf(path, 3000, add_bos, add_space_prefix)
    tok = Tokenizer.from_gguf(gguf_vocab(open_gguf(path)))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["<s>a</s> <|user|>b", " x  y ", "▁literal▁marks"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
    assert (tok.encode("Hi")[0] == 1) == (add_bos is not False)
    assert len(tok.encode("the")) - (add_bos is not False) == 1  # merged from scores


def test_gguf_loads_in_fp16_as_the_fp32_load_cast(smollm):
    from flexalisa.models import load_model
    from tests.parity.test_tiny_models import assert_same_weights_in

    assert_same_weights_in(load_model(None, torch.float16)[0], smollm[0], torch.float16)
