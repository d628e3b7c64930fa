"""The Python API, flexalisa's counterpart of vLLM's offline ``LLM``: load a model once, then
generate for lists of prompts.

    from flexalisa import LLM, SamplingParams

    llm = LLM()                                   # the embedded SmolLM2, all on the CPU
    for c in llm.generate(["The capital of France is"], max_new_tokens=16):
        print(c.text, c.finish_reason)

    llm = LLM(sparsity_method="swa", sparsity=0.8, gpu_mem="300MiB")   # offloaded, ALISA's SWA

Budgets, ``policy`` or ``auto_policy`` run the offloading runtime with the policy the cost model
searched (or the one given), exactly as ``flexalisa generate`` does; ``flexalisa generate`` is
this class plus JSONL files, resume and a report (``generate_job.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flexalisa.attention import SparsityMethod, make_method
from flexalisa.batch_size import (
    BatchChoice,
    engine_batch_size,
    engine_weight_bytes,
    offload_batch_limit,
)
from flexalisa.engine import Engine, default_dtype, resolve_device
from flexalisa.errors import FlexalisaError, JobInputError
from flexalisa.jobs import check_messages, plan_batches
from flexalisa.models import load_model
from flexalisa.placement import PlacementRequest, Workload, hardware_profile, make_generator
from flexalisa.report import RunStats, merge_extras
from flexalisa.sampling import SamplingParams, per_row
from flexalisa.stops import StopStrings, cut_at_stop


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text (special tokens such as EOS decoded away), cut before a stop
    token_ids: list[int]  # generated ids, EOS (or the tokens of a stop string) included
    prompt_tokens: int  # tokens of the prompt as fed to the model (after any chat template)
    finish_reason: str  # "stop" (EOS) or "length" (token limit or end of the context)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def method_from_flags(name: str | None = None, sparsity: float = 0.0, per_kv_head: bool = False,
                      query_channels: int = 0) -> SparsityMethod | None:
    """The attention method ``name`` at ``sparsity``; None for dense attention. No name:
    ALISA's SWA when a sparsity is given (``--sparsity 0.8`` alone, as DESIGN.md writes the
    job), else dense."""
    if name is None:
        name = "swa" if sparsity else "dense"
    if name == "dense":
        if sparsity or per_kv_head or query_channels:
            raise FlexalisaError("--sparsity needs a --sparsity-method other than dense (as do "
                                 "--per-kv-head and --query-channels)")
        return None
    try:
        return make_method(name, sparsity, per_kv_head=per_kv_head,
                           query_channels=query_channels)
    except ValueError as exc:
        raise FlexalisaError(str(exc)) from None


class LLM:
    """A loaded model and where it runs; ``generate`` batches prompts through it.

    Errors (unknown model paths, corrupt checkpoints, prompts longer than the context, budgets
    no placement fits) raise ``flexalisa.errors.FlexalisaError`` with a one-line message.
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "cpu",
                 sparsity_method: str | None = None, sparsity: float = 0.0,
                 per_kv_head: bool = False, query_channels: int = 0,
                 batch_size: int | None = None,
                 gpu_mem: str | None = None, cpu_mem: str | None = None,
                 policy: str | Path | None = None, auto_policy: bool = False,
                 hardware: str = "local", refill: bool | None = None) -> None:
        """``model``: HF checkpoint dir or .gguf (None = the embedded SmolLM2-135M);
        ``sparsity_method`` ("dense", "swa", "h2o", "local", "strided", "sinks"; None: swa
        when ``sparsity`` is given, else dense), ``sparsity``,
        ``per_kv_head``, ``query_channels``: as the CLI's flags (flexalisa.attention);
        ``batch_size``: prompts per batch (a policy's own batch wins; None: as many as memory
        holds up to a cap per device, or the cost model's choice when it places the model, see
        ``flexalisa.batch_size``); ``gpu_mem``/``cpu_mem``:
        budgets with units ("512MiB"), enforced on a CPU-only machine too; ``policy``: a
        policy.json; ``auto_policy``: search one with the cost model on ``hardware`` (a preset,
        a hw.json, or "local": measure this machine once, ~15 s); ``refill``: refill rows
        that end with waiting prompts (continuous batching; None: on CUDA, see
        ``refilling``)."""
        placement = PlacementRequest(policy_path=Path(policy) if policy else None,
                                     auto_policy=auto_policy, hardware=hardware,
                                     gpu_mem=gpu_mem, cpu_mem=cpu_mem)
        method = method_from_flags(sparsity_method, sparsity, per_kv_head, query_channels)
        self._setup(model, device, method, placement, batch_size, refill)

    @classmethod
    def from_parts(cls, model: str | Path | None, device: str, method: SparsityMethod | None,
                   placement: PlacementRequest, batch_size: int | None,
                   refill: bool | None = None) -> LLM:
        """As the constructor, for callers that already built the method and placement."""
        llm = cls.__new__(cls)
        llm._setup(model, device, method, placement, batch_size, refill)
        return llm

    def _setup(self, model, device: str, method: SparsityMethod | None,
               placement: PlacementRequest, batch_size: int | None,
               refill: bool | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise FlexalisaError(f"batch_size must be >= 1, got {batch_size}")
        if refill and (method is not None or placement.offload):
            raise FlexalisaError("refilling rows (--refill on) needs the all-on-device engine "
                                 "with dense attention: drop --sparsity / --sparsity-method and "
                                 "the placement flags (--gpu-mem, --cpu-mem, --policy, "
                                 "--auto-policy)")
        self.device, self.method, self.placement = device, method, placement
        self.batch_size, self.refill = batch_size, refill
        # host weights in the compute dtype: a GPU run's fp16 host copy is all it keeps
        self.weights, tok = load_model(model, default_dtype(resolve_device(device)))
        if tok is None:
            raise FlexalisaError(f"{model}: no tokenizer (tokenizer.json, or vocab.json + "
                                 "merges.txt); generating text needs one")
        self.tokenizer = tok
        self.stats = RunStats()  # the last generate call's throughput (FlexGen's definitions)
        self._generator = None  # the Engine or OffloadRunner, made at the first generate
        self._made_for: Workload | None = None  # the workload it was searched or planned for
        self._policy = self._prediction = None
        self._hardware = None  # the measured or loaded profile, reused by later searches
        self._choice: BatchChoice | None = None  # the last workload's batch, without a policy

    # ---- preparing a workload -------------------------------------------------------------
    def encode(self, prompts: list[str | list[dict]], chat: bool = False,
               labels: list[str] | None = None) -> list[list[int]]:
        """Token ids per prompt; refuses empty prompts and ones that leave no room to generate.
        A prompt is text (put through the chat template as a user turn if ``chat``) or a
        conversation, a list of {"role", "content"} messages (always put through it).
        ``labels`` name the prompts in errors (default "prompt <index>")."""
        tok = self.tokenizer
        labels = labels or [f"prompt {i}" for i in range(len(prompts))]
        texts = []
        for prompt, label in zip(prompts, labels):
            if not isinstance(prompt, str):
                prompt = check_messages(prompt, label)
            texts.append(tok.apply_chat_template(prompt) if chat or isinstance(prompt, list)
                         else prompt)
        token_lists = tok.encode_batch(texts)
        max_len = self.weights.spec.max_seq_len
        for label, ids in zip(labels, token_lists):
            if not ids:
                raise JobInputError(f"{label} is empty")
            if len(ids) >= max_len:
                raise JobInputError(f"{label} has {len(ids)} tokens; the model's context is "
                                    f"{max_len}, leaving no room to generate")
        return token_lists

    def prepare(self, work: Workload):
        """(generator, policy, prediction) for ``work``: the Engine, or the OffloadRunner with
        the policy given or searched. A later workload with no longer prompts or generations
        (and, under the auto batch size, no more prompts than the search could batch) reuses
        them; a longer or larger one is searched (or planned) again, on the same hardware
        profile, which is measured or loaded once."""
        if not self._fits(work):
            self.close()
            req = self.placement
            if req.offload and (req.policy_path is None or req.hardware != "local"):
                self._hardware = self._hardware or hardware_profile(req)
            self._generator, self._policy, self._prediction = make_generator(
                req, self.weights, self.device, self.method, work, self._hardware)
            self._made_for = work
            if not req.offload:
                # keep the engine's weights (in fp32 on a CPU, its oneDNN-packed copy, which
                # later engines reuse) rather than a second, unpacked copy of the matrices
                self.weights = self._generator.weights
        return self._generator, self._policy, self._prediction

    def _fits(self, work: Workload) -> bool:
        if self._generator is None:
            return False
        made = self._made_for  # the method is the LLM's own
        # a placed model keeps its policy's batch, unless an auto batch may now be larger
        return not self.placement.offload or (work.prompt_len <= made.prompt_len
                                              and work.gen_len <= made.gen_len
                                              and work.batch <= made.batch)

    @property
    def effective_batch_size(self) -> int:
        """Prompts per batch of the last ``prepare``d workload (see ``batch_choice``)."""
        return self.batch_choice().size

    def batch_choice(self) -> BatchChoice:
        """Prompts per batch, and why: the policy's own batch once one was chosen or searched,
        else ``batch_size``, else (None) the ``auto`` size of the last ``workload``."""
        if self._policy is not None:
            if self.placement.policy_path is not None:
                return BatchChoice(self._policy.batch_size, "the policy's")
            return BatchChoice(self._policy.batch_size, "batch_size" if self.batch_size
                               else "auto: the cost model's choice")
        if self._choice is None:
            raise FlexalisaError("no workload yet: call workload() or generate() first")
        return self._choice

    def workload(self, token_lists: list[list[int]], limits: list[int]) -> Workload:
        """The workload ``prepare`` plans for: the batch (``batch_choice``), the longest prompt
        and generation, the sparsity method."""
        method = self.method
        name, sparsity = (method.name, method.sparsity) if method else ("dense", 0.0)
        prompt_len, gen_len = max(map(len, token_lists)), max(limits)
        device = resolve_device(self.device)
        if self.batch_size is not None:
            self._choice = BatchChoice(self.batch_size, "batch_size")
        elif self.placement.offload:  # the cost model's search picks it, up to this
            limit = offload_batch_limit(device, len(token_lists))
            self._choice = BatchChoice(limit, "auto: the most the cost model's search may use")
        else:
            dtype = default_dtype(device)
            self._choice = engine_batch_size(
                self.weights.spec, device, dtype, engine_weight_bytes(self.weights, device, dtype),
                len(token_lists), prompt_len, gen_len, name, sparsity, self.refilling(device))
        return Workload(batch=self._choice.size, prompt_len=prompt_len, gen_len=gen_len,
                        sparsity_method=name, sparsity=sparsity,
                        auto_batch=self.batch_size is None)

    # ---- generating -----------------------------------------------------------------------
    def chat(self, conversations: list[dict] | list[list[dict]],
             max_new_tokens: int | list[int] = 64,
             sampling: SamplingParams | list[SamplingParams] | None = None,
             **kwargs) -> list[Completion]:
        """``generate`` for conversations (one, or a list of them), each a list of {"role",
        "content"} messages put through the model's chat template; vLLM's ``LLM.chat``."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # one conversation
        return self.generate(list(conversations), max_new_tokens, sampling, **kwargs)

    def generate(self, prompts: str | list[str | list[dict]],
                 max_new_tokens: int | list[int] = 64,
                 sampling: SamplingParams | list[SamplingParams] | None = None, *,
                 stop: str | list[str] = (),
                 ignore_eos: bool = False, chat: bool = False,
                 progress: bool = False) -> list[Completion]:
        """One Completion per prompt, in input order. Prompts are batched by token length;
        ``max_new_tokens`` is one limit or one per prompt, and ``sampling`` one SamplingParams
        or one per prompt (as vLLM's); row i's sample depends only on its params and
        (their ``seed``, i); a row also ends once its text contains one of the ``stop``
        strings (finish_reason "stop", the text cut before it; EOS still ends rows unless
        ``ignore_eos``); ``chat`` wraps each text prompt in the model's chat template as a
        user turn; a prompt may also be a conversation (see ``encode``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return []
        limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
                  else list(max_new_tokens))
        if len(limits) != len(prompts) or any(n < 1 for n in limits):
            raise FlexalisaError(f"max_new_tokens must be >= 1, one value or one per prompt "
                                 f"({len(prompts)}), got {max_new_tokens!r}")
        stops = check_stops((stop,) if isinstance(stop, str) else stop)
        try:
            params = per_row(sampling, len(prompts))
        except ValueError as exc:
            raise FlexalisaError(str(exc)) from None
        token_lists = self.encode(prompts, chat)
        generator, _, _ = self.prepare(self.workload(token_lists, limits))
        self.stats = RunStats()
        out: list[Completion | None] = [None] * len(prompts)
        bar = _progress_bar(sum(limits)) if progress else None
        batches, max_batch = self.plan_runs(generator, token_lists)
        try:
            for batch in batches:
                done = self.run_batch(generator, [token_lists[i] for i in batch],
                                      [limits[i] for i in batch], [json.dumps(i) for i in batch],
                                      [params[i] for i in batch], ignore_eos,
                                      bar.update if bar else None,
                                      [stops] * len(batch), max_batch)
                for i, completion in zip(batch, done):
                    out[i] = completion
        finally:
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]

    def run_batch(self, generator, token_lists: list[list[int]], limits: list[int],
                  keys: list[str], sampling: SamplingParams | list[SamplingParams] | None,
                  ignore_eos: bool,
                  on_tokens: Callable[[int], None] | None = None,
                  stops: list[tuple[str, ...]] | None = None,
                  max_batch: int | None = None) -> list[Completion]:
        """One batch through ``generator`` (from ``prepare``); its throughput adds to
        ``self.stats``. ``sampling``: one SamplingParams or one per row; ``keys`` seed each
        row's sampler; ``stops``: each row's stop strings; ``max_batch``: the Engine runs at
        most this many rows at once, refilling rows that finish (``Engine.generate``).

        Out of device memory, the batch runs again with half the rows at once, down to one
        prompt (the offloading runner retries inside, with smaller GPU batches); each row's
        sample still depends only on its key."""
        stops = stops or [()] * len(token_lists)
        stop_when = StopStrings(self.tokenizer.decode, stops)
        at_once = len(token_lists) if max_batch is None else min(max_batch, len(token_lists))
        try:
            result = generator.generate(token_lists, limits, sampling=sampling,
                                        ignore_eos=ignore_eos, row_keys=keys,
                                        on_tokens=on_tokens, stop_when=stop_when or None,
                                        **({} if max_batch is None else {"max_batch": max_batch}))
        except torch.OutOfMemoryError:
            if at_once == 1:
                raise FlexalisaError(
                    f"out of {self.device} memory generating one prompt of "
                    f"{len(token_lists[0])} tokens; give --gpu-mem so that the offloading "
                    "runtime places the model") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.stats.extras["oom_splits"] = self.stats.extras.get("oom_splits", 0) + 1
            if at_once < len(token_lists):  # refilling: fewer rows at once
                return self.run_batch(generator, token_lists, limits, keys, sampling,
                                      ignore_eos, on_tokens, stops, at_once // 2)
            half = len(token_lists) // 2
            return [c for part in (slice(None, half), slice(half, None))
                    for c in self.run_batch(generator, token_lists[part], limits[part],
                                            keys[part], per_row(sampling, len(keys))[part],
                                            ignore_eos, on_tokens, stops[part])]
        self.stats.add(len(token_lists), result.num_prompt_tokens,
                       sum(len(t) for t in result.tokens), result.prefill_s, result.decode_s)
        if result.extras:
            self.stats.extras["runtime"] = merge_extras(self.stats.extras.get("runtime"),
                                                        result.extras)
        return [Completion(cut_at_stop(self.tokenizer.decode(tokens), row_stops)[0], tokens,
                           len(prompt), reason)
                for prompt, tokens, reason, row_stops in zip(
                    token_lists, result.tokens, result.finish_reasons, stop_when.stops)]

    def refilling(self, device: torch.device) -> bool:
        """Whether the engine refills rows that end with waiting prompts (``Engine.generate``'s
        ``max_batch``) in ``generate`` and jobs: ``refill``, where it is given; by default on
        CUDA, where a decode step costs about the same with fewer rows. Not by default on a
        CPU: there a step's cost follows its rows, so refilling gained 0-11% in the README's
        runs (``scripts/bench_refill.py``), while a refilled batch's cache holds twice the
        generation and a killed job redoes a group of batches. Never with a sparsity method
        or a placement (the offloading runner's batches are its policy's; a budget's plan
        counts a fixed batch's cache)."""
        if self.refill is False or self.method is not None or self.placement.offload:
            return False
        return bool(self.refill) or device.type == "cuda"

    def plan_runs(self, generator, token_lists: list[list[int]],
                  refill_group: int | None = None) -> tuple[list[list[int]], int | None]:
        """The prompt indices of each ``run_batch`` call, and the ``max_batch`` it passes.

        In fixed batches: ``effective_batch_size`` prompts per call, by token length, and None.
        Where the Engine refills rows (``refills``): the prompts of ``refill_group`` such
        batches per call (None: every prompt in one call), longest first, and
        ``effective_batch_size`` rows at once.
        """
        size = self.effective_batch_size
        refill = self.refills(generator)
        per_call = size if not refill else (
            max(len(token_lists), 1) if refill_group is None else size * refill_group)
        batches = list(plan_batches([len(t) for t in token_lists], per_call,
                                    longest_first=refill))
        return batches, size if refill else None

    def refills(self, generator) -> bool:
        """``refilling`` for the generator ``prepare`` made (the Engine, or not)."""
        return isinstance(generator, Engine) and self.refilling(generator.device)

    def close(self) -> None:
        """Stop the offloading runner's copy threads, if one runs; generate makes a new one."""
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()
        self._generator = self._made_for = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_stops(stops) -> tuple[str, ...]:
    """Stop strings as a tuple; refuses anything but non-empty strings."""
    stops = tuple(stops)
    if not all(isinstance(s, str) and s for s in stops):
        raise FlexalisaError(f"stop strings must be non-empty strings, got {list(stops)!r}")
    return stops


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="generate", file=sys.stderr, dynamic_ncols=True)
