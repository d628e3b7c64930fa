"""The tokenizer a GGUF file describes in its metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM2, LLaMA-3, Qwen2) get the
pipeline transformers builds for the same file, token for token:

* BPE over the file's vocabulary and merges; a token spelled outside the byte alphabet is
  respelled through it, as transformers does;
* the pre-tokenizer split of the vocabulary's family (``tokenizer.ggml.pre``): LLaMA-3's,
  Qwen2's or GPT-4o's regex, else GPT-2's (SmolLM2's ``smollm`` is one of those);
* control tokens (type 3) as special tokens, user-defined ones (type 4) as plain added tokens;
* BOS / EOS added as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say.

SentencePiece vocabularies (``llama``: LLaMA-2, Mistral) are not supported and raise
ModelLoadError.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from flexalisa.errors import ModelLoadError

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
    pre: str | None = None  # tokenizer.ggml.pre: the pre-tokenizer family
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool = False  # prepend BOS when encoding
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
                     merges=list(value("ggml.merges", [])), pre=value("ggml.pre"),
                     bos_token_id=value("ggml.bos_token_id"),
                     eos_token_id=value("ggml.eos_token_id"),
                     add_bos_token=bool(value("ggml.add_bos_token", False)),
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
    """The `tokenizers` pipeline for a byte-level BPE GGUF vocabulary (see the module doc)."""
    if vocab.model != "gpt2":
        raise ModelLoadError(f"unsupported GGUF tokenizer model {vocab.model!r} (supported: gpt2, "
                             "byte-level BPE; SentencePiece 'llama' vocabularies are not)")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(
            spelling[b] for b in token.encode("utf-8"))

    ids = {spelled(token): i for i, token in enumerate(vocab.tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in vocab.merges]
    backend = HFTokenizer(models.BPE(vocab=ids, merges=pairs, fuse_unk=False,
                                     byte_fallback=False))
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
    _add_bos_eos(backend, vocab)
    return backend


def _add_bos_eos(backend: HFTokenizer, vocab: GGUFVocab) -> None:
    def token(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None and 0 <= token_id < len(
            vocab.tokens) else None

    bos = token(vocab.bos_token_id) if vocab.add_bos_token else None
    eos = token(vocab.eos_token_id) if vocab.add_eos_token else None
    if bos is None and eos is None:
        return
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"]
                                   + ([f"{eos}:1"] if eos else []))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t])
