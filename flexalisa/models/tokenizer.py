"""Tokenizer from an HF `tokenizer.json`, a GPT-2-style `vocab.json` + `merges.txt` (OPT), or GGUF
vocabulary metadata (`tokenizers` package).

Each builds the `tokenizers` pipeline that `transformers` builds for the same files; the GGUF
one lives in `gguf_tokenizer.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from flexalisa.errors import ModelLoadError, one_line
from flexalisa.models.gguf_tokenizer import GGUFVocab, gguf_backend


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> text, identical to HF's fast tokenizer."""

    def __init__(self, backend: HFTokenizer, chat_template: str | None = None) -> None:
        self.backend = backend
        self.chat_template = chat_template  # Jinja source from the checkpoint, if it has one

    def apply_chat_template(self, conversation: str | list[dict]) -> str:
        """A conversation (a list of {"role", "content"} messages, or one user prompt) in the
        model's own chat template (rendered with Jinja, which torch already depends on), ending
        with the assistant's generation prompt. BOS renders empty and encoding adds it where
        the tokenizer adds one (transformers renders it and adds none: the same ids where a
        template starts with BOS exactly when its tokenizer adds one, as LLaMA-family files do)."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template (needed by --chat and by "
                                 "\"messages\")")
        import jinja2

        messages = ([{"role": "user", "content": conversation}]
                    if isinstance(conversation, str) else conversation)
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=True, bos_token="",
                                   eos_token="")
        except jinja2.TemplateError as exc:
            raise ModelLoadError(f"cannot render the model's chat template ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        """tokenizer.json, plus the chat template from tokenizer_config.json beside it."""
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ModelLoadError(f"{path}: cannot read tokenizer ({one_line(exc)})") from None
        template = None
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                template = json.loads(config.read_text()).get("chat_template")
            except json.JSONDecodeError:
                template = None  # the template is optional; a broken config only loses it
        jinja_file = path.parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(backend, template if isinstance(template, str) else None)

    @classmethod
    def from_vocab_merges(cls, directory: Path) -> Tokenizer:
        """A GPT-2-style byte-level BPE checkpoint without tokenizer.json (OPT ships this way):
        vocab.json, merges.txt and, optionally, tokenizer_config.json (``add_prefix_space``,
        ``add_bos_token``, the special tokens, ``added_tokens_decoder``) and
        special_tokens_map.json. Builds the pipeline transformers builds for these files."""
        config = {**_read_json(directory / "special_tokens_map.json"),
                  **_read_json(directory / "tokenizer_config.json")}
        try:
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{directory}: cannot read vocab.json / merges.txt ({exc})"
                                 ) from None
        merges = [tuple(line.split(" ", 1)) for line in lines
                  if line and not line.startswith("#version")]
        if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
            raise ModelLoadError(f"{directory}: vocab.json must map tokens to ids and each "
                                 "merges.txt line must hold two tokens")
        try:
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed vocab
            raise ModelLoadError(f"{directory}: cannot build the BPE from vocab.json / "
                                 f"merges.txt ({one_line(exc)})") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(config.get("add_prefix_space", False)))
        backend.decoder = decoders.ByteLevel()
        added = config.get("added_tokens_decoder")
        added = [t for t in (added.values() if isinstance(added, dict) else ())
                 if isinstance(t, dict)]
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        specials = [_content(config.get(n)) for n in names]
        specials += [_content(t) for t in added if t.get("special", True)]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(specials) if t])
        plain = [_content(t) for t in added if not t.get("special", True)]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain if t])
        bos = _content(config.get("bos_token"))
        if config.get("add_bos_token") and bos:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))])
        template = config.get("chat_template")
        return cls(backend, template if isinstance(template, str) else None)

    @classmethod
    def from_gguf(cls, vocab: GGUFVocab) -> Tokenizer:
        """A GGUF file's tokenizer (``gguf_tokenizer.gguf_vocab`` reads its metadata)."""
        return cls(gguf_backend(vocab), vocab.chat_template)

    def to_json(self) -> str:
        return json.dumps(json.loads(self.backend.to_str()))


def _read_json(path: Path) -> dict:
    """An optional JSON object file: {} when it is missing; ModelLoadError when it is broken."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _content(token) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...};
    None for anything else."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None
