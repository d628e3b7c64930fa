"""The tokenizer a GGUF file describes in its metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM2, LLaMA-3, Qwen2) get the
pipeline transformers builds for the same file, token for token:

* BPE over the file's vocabulary and merges; a token spelled outside the byte alphabet is
  respelled through it, as transformers does;
* the pre-tokenizer split of the vocabulary's family (``tokenizer.ggml.pre``): LLaMA-3's,
  Qwen2's or GPT-4o's regex, else GPT-2's (SmolLM2's ``smollm`` is one of those);
* control tokens (type 3) as special tokens, user-defined ones (type 4) as plain added tokens;
* BOS / EOS added as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say.

SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``: LLaMA-1/2, Mistral, TinyLlama)
get transformers' ``LlamaTokenizer`` pipeline: BPE with byte fallback over the vocabulary, with
merges from the file or, as such files usually have none, rebuilt from the token scores
(``sentencepiece_merges``); spaces as "▁" with one prepended to the text; BOS added unless the
file says otherwise. Other models (``t5``, Gemma's) raise ModelLoadError.

The named special tokens (BOS, EOS, unknown, padding) are special in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from flexalisa.errors import ModelLoadError, one_line

CONTROL_TOKEN_TYPE = 3  # llama.cpp token type: control (special) token
USER_DEFINED_TOKEN_TYPE = 4  # llama.cpp token type: added token matched whole, not special

# Pre-tokenizer splits by tokenizer.ggml.pre; these spellings are the vocabularies' own.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]  # the vocabulary, by id
    token_types: list[int]  # llama.cpp token type per id (3 = control, 4 = user-defined)
    merges: list[str]  # "left right" per merge, best first
    scores: list[float] = ()  # SentencePiece piece scores, by id (merges are rebuilt from them)
    pre: str | None = None  # tokenizer.ggml.pre: the pre-tokenizer family
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False  # prepend BOS when encoding (files of SentencePiece: default True)
    add_eos_token: bool = False  # append EOS when encoding
    chat_template: str | None = None  # Jinja source, if the file has one


def gguf_vocab(reader) -> GGUFVocab:
    """The tokenizer metadata of an open GGUFReader."""
    def value(key: str, default=None):
        field = reader.fields.get(f"tokenizer.{key}")
        return default if field is None else field.contents()

    model = value("ggml.model")
    if model is None:
        raise ModelLoadError("GGUF file has no tokenizer metadata")
    return GGUFVocab(model=model, tokens=list(value("ggml.tokens", [])),
                     token_types=list(value("ggml.token_type", [])),
                     merges=list(value("ggml.merges", [])),
                     scores=list(value("ggml.scores", [])), pre=value("ggml.pre"),
                     bos_token_id=value("ggml.bos_token_id"),
                     eos_token_id=value("ggml.eos_token_id"),
                     unk_token_id=value("ggml.unknown_token_id"),
                     pad_token_id=value("ggml.padding_token_id"),
                     add_bos_token=bool(value("ggml.add_bos_token", model == "llama")),
                     add_eos_token=bool(value("ggml.add_eos_token", False)),
                     chat_template=value("chat_template"))


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def gguf_backend(vocab: GGUFVocab) -> HFTokenizer:
    """The `tokenizers` pipeline for a GGUF vocabulary (see the module doc)."""
    if vocab.model == "gpt2":
        backend = _byte_level_backend(vocab)
    elif vocab.model == "llama":
        backend = _sentencepiece_backend(vocab)
    else:
        raise ModelLoadError(f"unsupported GGUF tokenizer model {vocab.model!r} (supported: "
                             "gpt2, byte-level BPE; llama, SentencePiece BPE)")
    named = [_token(vocab, i) for i in (vocab.bos_token_id, vocab.eos_token_id,
                                        vocab.unk_token_id, vocab.pad_token_id)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys(named) if t is not None])
    _add_bos_eos(backend, vocab)
    return backend


def _token(vocab: GGUFVocab, token_id: int | None) -> str | None:
    ok = token_id is not None and 0 <= token_id < len(vocab.tokens)
    return vocab.tokens[token_id] if ok else None


def _sentencepiece_backend(vocab: GGUFVocab) -> HFTokenizer:
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    if vocab.merges:
        pairs = [tuple(m.split(" ", 1)) for m in vocab.merges]
    elif len(vocab.scores) == len(vocab.tokens):
        pairs = sentencepiece_merges(ids, dict(zip(vocab.tokens, vocab.scores)))
    else:
        raise ModelLoadError("SentencePiece GGUF vocabulary has neither merges nor scores")
    backend = _bpe(ids, pairs, fuse_unk=True, byte_fallback=True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(vocab.tokens, vocab.token_types)
                                if kind == CONTROL_TOKEN_TYPE])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(vocab.tokens, vocab.token_types)
                        if kind == USER_DEFINED_TOKEN_TYPE])
    return backend


def sentencepiece_merges(ids: dict[str, int], scores: dict[str, float]
                         ) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces
    of the vocabulary, ranked by the whole piece's score (best first), then by the halves'
    lengths, longest first; ties keep the vocabulary's order (transformers' rule)."""
    merges = []
    for piece, score in scores.items():
        halves = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        local = [(left, right, score) for left, right in halves if left in ids and right in ids]
        merges.extend(sorted(local, key=lambda m: (ids[m[0]], ids[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_backend(vocab: GGUFVocab) -> HFTokenizer:
    spelling = byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(
            spelling[b] for b in token.encode("utf-8"))

    ids = {spelled(token): i for i, token in enumerate(vocab.tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in vocab.merges]
    backend = _bpe(ids, pairs, fuse_unk=False, byte_fallback=False)
    split = PRE_TOKENIZER_SPLITS.get(vocab.pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    kinds = list(zip(vocab.tokens, vocab.token_types))
    # a control token spelled outside the byte alphabet is a mislabel; it is not added
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in kinds
                                if kind == CONTROL_TOKEN_TYPE and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in kinds
                        if kind == USER_DEFINED_TOKEN_TYPE and t in ids])
    return backend


def _bpe(ids: dict[str, int], pairs: list, **options) -> HFTokenizer:
    try:
        return HFTokenizer(models.BPE(vocab=ids, merges=pairs, **options))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed vocabulary
        raise ModelLoadError("GGUF tokenizer metadata does not make a BPE vocabulary "
                             f"({one_line(exc)})") from None


def _add_bos_eos(backend: HFTokenizer, vocab: GGUFVocab) -> None:
    bos = _token(vocab, vocab.bos_token_id) if vocab.add_bos_token else None
    eos = _token(vocab, vocab.eos_token_id) if vocab.add_eos_token else None
    if bos is None and eos is None:
        return
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"]
                                   + ([f"{eos}:1"] if eos else []))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t])
