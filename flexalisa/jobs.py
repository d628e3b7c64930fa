"""JSONL batch jobs: read and validate prompts, resume from an existing output, write results.

Input lines:  {"id": <str|int>, "prompt": <str>, "max_new_tokens": <int, optional>,
               "stop": <str or list of str, optional>, "temperature": <number, optional>,
               "top_p": <number, optional>, "top_k": <int, optional>, "seed": <int, optional>}
              or "messages": [{"role": <str>, "content": <str>}, ...] instead of "prompt": a
              conversation, put through the model's chat template
Output lines: {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}

Resume contract. Batches are a deterministic function of the whole input and the batch size
(prompts sorted by token length, then chunked), never of what is already done. A batch is skipped
when all its ids are in the output; otherwise the whole batch is recomputed, so its rows see the
same batch-mates as in an uninterrupted run, and only the missing ids are appended. Each batch is
appended with one write, then flushed and fsync'ed; a torn last line left by a kill is cut off
before resuming. Lines are never rewritten.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from flexalisa.errors import FlexalisaError, JobInputError
from flexalisa.sampling import SamplingParams

OUTPUT_KEYS = ("id", "text", "prompt_tokens", "completion_tokens", "finish_reason")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed")  # a line's own, over the job's


@dataclass(frozen=True)
class PromptRecord:
    id: str | int  # the caller's id, echoed unchanged
    prompt: str | list[dict]  # raw text (chat template only with --chat), or chat messages
    max_new_tokens: int | None  # per-line limit; None = the job's --gen-len
    line_no: int  # 1-based line in the input file, for error messages
    stop: tuple[str, ...] | None = None  # per-line stop strings; None = the job's --stop
    sampling: tuple[tuple[str, float], ...] = ()  # per-line SAMPLING_KEYS values, over the job's

    def sampling_params(self, job: SamplingParams) -> SamplingParams:
        """The job's sampling with this line's own values in place of the job's."""
        return replace(job, **dict(self.sampling)) if self.sampling else job

    @property
    def key(self) -> str:
        """Canonical id for set membership: 1 and "1" are different ids."""
        return json.dumps(self.id)


def _parse_line(text: str, line_no: int, path: Path) -> PromptRecord:
    where = f"{path}:{line_no}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobInputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise JobInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise JobInputError(f"{where}: missing \"id\"")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise JobInputError(f"{where}: \"id\" must be a string or an integer")
    if ("prompt" in obj) == ("messages" in obj):
        raise JobInputError(f"{where}: needs a \"prompt\" or a \"messages\" list, not both")
    if "messages" in obj:
        prompt = check_messages(obj["messages"], where)
    elif isinstance(obj["prompt"], str):
        prompt = obj["prompt"]
    else:
        raise JobInputError(f"{where}: non-string \"prompt\"")
    limit = obj.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise JobInputError(f"{where}: \"max_new_tokens\" must be an integer >= 1, got {limit!r}")
    stop = obj.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list)
                             or not all(isinstance(x, str) and x for x in stop)):
        raise JobInputError(f"{where}: \"stop\" must be a non-empty string or a list of them, "
                            f"got {stop!r}")
    return PromptRecord(obj["id"], prompt, limit, line_no,
                        None if stop is None else tuple(stop), _line_sampling(obj, where))


def _line_sampling(obj: dict, where: str) -> tuple[tuple[str, float], ...]:
    """A line's "temperature", "top_p", "top_k" and "seed", checked as SamplingParams checks
    them."""
    own = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    for key, value in own.items():
        integer = key in ("seed", "top_k")
        if (not isinstance(value, int if integer else (int, float)) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise JobInputError(f"{where}: \"{key}\" must be "
                                f"{'an integer' if integer else 'a finite number'}, "
                                f"got {value!r}")
    try:
        SamplingParams(**own)
    except ValueError as exc:
        raise JobInputError(f"{where}: {exc}") from None
    return tuple(own.items())


def check_messages(messages, where: str) -> list[dict]:
    """A chat conversation: a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise JobInputError(f"{where}: \"messages\" must be a non-empty list of "
                            "{\"role\": str, \"content\": str} objects")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompts(path: Path) -> list[PromptRecord]:
    """All records of a prompts file; raises JobInputError on the first bad line."""
    if not path.is_file():
        raise JobInputError(f"input file {str(path)!r} does not exist")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    # utf-8-sig: a byte-order mark that Windows tools put first is read as none
    with path.open(encoding="utf-8-sig", errors="strict") as fh:
        try:
            for line_no, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                rec = _parse_line(text, line_no, path)
                if rec.key in seen:
                    raise JobInputError(f"{path}:{line_no}: duplicate id {rec.id!r} "
                                        f"(first on line {seen[rec.key]})")
                seen[rec.key] = line_no
                records.append(rec)
        except UnicodeDecodeError as exc:
            raise JobInputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not records:
        raise JobInputError(f"{path}: no prompts")
    return records


def check_writable(path: Path) -> None:
    """Refuse an output path that could not be written, before the job loads anything; creates
    nothing (its folders are made when the first batch is written)."""
    if path.is_dir():
        raise FlexalisaError(f"--output {str(path)!r} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise FlexalisaError(f"--output {str(path)!r} is not writable")
        return
    parent = path.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FlexalisaError(f"--output {str(path)!r}: cannot create it under {str(parent)!r}")


def repair_and_read_done(path: Path) -> set[str]:
    """Keys of ids already in an output file; a torn (unterminated) last line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as fh:
            fh.truncate(len(complete))
    done: set[str] = set()
    for line_no, text in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            done.add(json.dumps(json.loads(text)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JobInputError(f"{path}:{line_no}: existing output line is not a result; "
                                "refusing to append to it") from None
    return done


def plan_batches(lengths: list[int], batch_size: int,
                 longest_first: bool = False) -> Iterator[list[int]]:
    """Prompt indices per batch, for prompts of these token lengths: sorted by length (ties by
    input order), then chunked; ``longest_first``: each chunk's indices listed from its
    longest prompt down (for the Engine's refilling, whose waiting prompts then fit the filled
    slots)."""
    if batch_size < 1:
        raise JobInputError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk[::-1] if longest_first else chunk


def append_results(path: Path, rows: list[dict]) -> None:
    """Append result lines with one write, then flush and fsync."""
    blob = "".join(json.dumps({k: row[k] for k in OUTPUT_KEYS}, ensure_ascii=False) + "\n"
                   for row in rows)
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # e.g. a full disk: what was written before stays; a torn last
        # line is cut off when the job is rerun (repair_and_read_done)
        raise FlexalisaError(f"writing {str(path)!r}: {exc.strerror}; the batches before this "
                            "one are saved, rerun the command to resume") from None
