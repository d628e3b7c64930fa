"""`flexalisa generate` end to end on a tiny model: outputs, per-line limits, and bad input."""

from __future__ import annotations

import json

import pytest

from flexalisa.cli import main
from tests.conftest import write_jsonl

PROMPTS = [{"id": i, "prompt": f"The {w} of the module is"} for i, w in
           enumerate(["name", "value", "type", "size", "list", "code", "file"])]


def run(tiny_chat_model, tmp_path, rows, *extra):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(out), "--gen-len", "6", "--batch-size", "3", *extra])
    return code, out


def read(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_writes_every_id_once_with_all_fields(tiny_chat_model, tmp_path):
    rows = PROMPTS + [{"id": "short", "prompt": "import os", "max_new_tokens": 2}]
    code, out = run(tiny_chat_model, tmp_path, rows, "--ignore-eos")
    assert code == 0
    results = {r["id"]: r for r in read(out)}
    assert set(results) == {r["id"] for r in rows}
    assert results["short"]["completion_tokens"] == 2
    assert all(r["completion_tokens"] == 6 for k, r in results.items() if k != "short")
    assert all(r["finish_reason"] == "length" for r in results.values())
    assert all(isinstance(r["text"], str) and r["prompt_tokens"] > 0 for r in results.values())
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    stats = json.loads((tmp_path / "report.json").read_text())["stats"]
    assert stats["generated_tokens"] == 6 * 7 + 2 and stats["total_tok_s"] > 0


def test_rerun_skips_finished_ids(tiny_chat_model, tmp_path, capsys, monkeypatch):
    run(tiny_chat_model, tmp_path, PROMPTS[:4])
    code, out = run(tiny_chat_model, tmp_path, PROMPTS)  # 4 of 7 done: the rest is generated
    assert code == 0 and "resuming: 4 of 7 ids already" in capsys.readouterr().err
    assert sorted(r["id"] for r in read(out)) == list(range(7))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ids_already_done"] == 4 and report["stats"]["num_prompts"] == 3

    before = {name: (tmp_path / name).read_text() for name in ("out.jsonl", "report.json")}
    monkeypatch.setattr("flexalisa.api.load_model", lambda *a: pytest.fail("loaded"))
    code, out = run(tiny_chat_model, tmp_path, PROMPTS)  # all done: no model, report kept
    assert code == 0 and "nothing to do: all 7 ids" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_text() for name in before} == before


def test_a_refilled_job_writes_and_resumes_by_group(tiny_chat_model, tmp_path, capsys):
    """Where the engine refills rows (CUDA by default; --refill on here), a job runs in groups
    of 4 batches, each written at once; a rerun skips the groups already written and reruns a
    partly written one whole, writing only its missing ids, and ends with the uninterrupted
    run's lines."""
    rows = [{"id": i, "prompt": f"Item {i} of the list is", "max_new_tokens": 1 + i % 6}
            for i in range(14)]
    full = tmp_path / "full"
    full.mkdir()
    code, out = run(tiny_chat_model, full, rows, "--batch-size", "2", "--ignore-eos",
                    "--refill", "on")
    assert code == 0
    reference = read(out)
    assert sorted(r["id"] for r in reference) == list(range(14))
    assert [r["completion_tokens"] for r in sorted(reference, key=lambda r: r["id"])] == [
        r["max_new_tokens"] for r in rows]
    for kept, rerun in ((8, 6), (5, 14)):  # the first group (8 ids) written whole, or in part
        cut = tmp_path / f"cut{kept}"
        cut.mkdir()
        (cut / "out.jsonl").write_text("".join(line + "\n" for line in
                                               out.read_text().splitlines()[:kept]))
        code, resumed = run(tiny_chat_model, cut, rows, "--batch-size", "2", "--ignore-eos",
                            "--refill", "on")
        assert code == 0 and f"resuming: {kept} of 14" in capsys.readouterr().err
        assert sorted(map(json.dumps, read(resumed))) == sorted(map(json.dumps, reference))
        report = json.loads((cut / "report.json").read_text())
        assert report["stats"]["num_prompts"] == rerun


def test_sampling_is_seeded_per_row(tiny_chat_model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, out_a = run(tiny_chat_model, tmp_path / "a", PROMPTS, "--temperature", "1.0", "--seed", "7")
    _, out_b = run(tiny_chat_model, tmp_path / "b", PROMPTS[:2], "--temperature", "1.0", "--seed",
                   "7", "--batch-size", "1")
    a = {r["id"]: r["text"] for r in read(out_a)}
    b = {r["id"]: r["text"] for r in read(out_b)}
    assert all(a[k] == b[k] for k in b)  # same seed + id -> same sample, whatever the batch


def test_a_line_may_set_its_own_sampling(tiny_chat_model, tmp_path):
    """A line's "temperature", "top_p" and "seed" replace the job's for that line only."""
    for name in ("greedy", "hot", "mixed"):
        (tmp_path / name).mkdir()
    _, greedy = run(tiny_chat_model, tmp_path / "greedy", PROMPTS, "--ignore-eos")
    _, hot = run(tiny_chat_model, tmp_path / "hot", PROMPTS, "--ignore-eos", "--temperature",
                 "1.0", "--top-p", "0.9", "--seed", "7")
    rows = [dict(r, temperature=1.0, seed=7) if r["id"] % 2 else r for r in PROMPTS]
    _, mixed = run(tiny_chat_model, tmp_path / "mixed", rows, "--ignore-eos", "--top-p", "0.9")
    greedy, hot, mixed = ({r["id"]: r["text"] for r in read(out)} for out in (greedy, hot, mixed))
    assert all(mixed[i] == (hot[i] if i % 2 else greedy[i]) for i in greedy)
    assert any(hot[i] != greedy[i] for i in greedy)  # the sampled lines did sample


BAD_INPUTS = [
    (["{\"id\": 1, \"prompt\": \"ok\"}", "{not json"], "in.jsonl:2: malformed JSON"),
    ([{"prompt": "no id"}], "in.jsonl:1: missing \"id\""),
    ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "in.jsonl:2: duplicate id 1"),
    ([{"id": 1, "prompt": "x " * 200}], "the model's context is 96"),
    ([{"id": 1, "prompt": 5}], "non-string \"prompt\""),
    ([{"id": 1, "prompt": "a", "max_new_tokens": 0}], "\"max_new_tokens\" must be an integer"),
    ([{"id": 1, "prompt": "a", "temperature": -0.5}], "in.jsonl:1: temperature must be >= 0"),
    ([{"id": 1, "prompt": "a", "top_p": 1.5}], "in.jsonl:1: top_p must be in (0, 1]"),
    ([{"id": 1, "prompt": "a", "seed": "7"}], "in.jsonl:1: \"seed\" must be an integer"),
    ([{"id": 1, "prompt": "a", "top_k": 1.5}], "in.jsonl:1: \"top_k\" must be an integer"),
    ([{"id": 1, "prompt": "a", "top_k": -1}], "in.jsonl:1: top_k must be an integer >= 0"),
    (["[1, 2]"], "expected a JSON object"),
    ([{"id": 1, "prompt": "a", "stop": ["x", ""]}], "in.jsonl:1: \"stop\" must be a non-empty"),
    ([{"id": 1, "prompt": "a", "stop": 3}], "in.jsonl:1: \"stop\" must be a non-empty"),
    ([{"id": 1}], "in.jsonl:1: needs a \"prompt\" or a \"messages\" list"),
    ([{"id": 1, "prompt": "a", "messages": []}], "needs a \"prompt\" or a \"messages\" list"),
    ([{"id": 1, "messages": [{"role": "user", "content": 3}]}], "\"messages\" must be a"),
    ([{"id": 1, "messages": [{"role": "user", "content": "hi"}]}], "has no chat template"),
]


@pytest.mark.parametrize("rows, message", BAD_INPUTS)
def test_bad_input_is_one_line_error(tiny_chat_model, tmp_path, capsys, rows, message):
    code, out = run(tiny_chat_model, tmp_path, rows)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("flexalisa: error:") and message in err and "\n" not in err
    assert not out.exists()  # nothing generated, nothing lost


def test_refill_on_with_sparsity_or_a_placement_is_a_one_line_error(tiny_chat_model, tmp_path,
                                                                    capsys):
    for extra in (["--sparsity", "0.5"], ["--gpu-mem", "1GB"]):
        code, out = run(tiny_chat_model, tmp_path, PROMPTS[:2], "--refill", "on", *extra)
        err = capsys.readouterr().err.strip()
        assert code == 1 and not out.exists() and "\n" not in err
        assert err.startswith("flexalisa: error:") and "needs the all-on-device engine" in err


def test_chat_flag_without_template_is_an_error(tiny_chat_model, tmp_path, capsys):
    code, out = run(tiny_chat_model, tmp_path, PROMPTS[:1], "--chat")
    assert code == 1 and not out.exists()
    assert "has no chat template" in capsys.readouterr().err


def test_stop_strings_from_the_flag_and_per_line(tiny_chat_model, tmp_path):
    """--stop ends every line's completion at its first stop string; a line's own "stop"
    replaces the flag's. The texts are the unstopped ones cut before the stop."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "stop").mkdir()
    _, ref_out = run(tiny_chat_model, tmp_path / "ref", PROMPTS, "--ignore-eos")
    ref = {r["id"]: r["text"] for r in read(ref_out)}
    stop = next(t[k:k + 2] for i, t in ref.items() if i != 0 for k in range(2, len(t) - 1)
                if t[k:k + 2].isprintable() and t[k:k + 2].strip())
    rows = [dict(r, stop=["\u2603"]) if r["id"] == 0 else r for r in PROMPTS]
    code, out = run(tiny_chat_model, tmp_path / "stop", rows, "--ignore-eos", "--stop", stop)
    assert code == 0
    got = {r["id"]: r for r in read(out)}
    assert got[0]["text"] == ref[0] and got[0]["finish_reason"] == "length"  # its own stop
    stopped = [k for k in got if k != 0 and stop in ref[k]]
    assert stopped
    for k in got:
        if k != 0:
            assert got[k]["text"] == ref[k][:ref[k].find(stop)] if k in stopped else ref[k]
            assert got[k]["finish_reason"] == ("stop" if k in stopped else "length")


def test_empty_stop_flag_is_an_error(tiny_chat_model, tmp_path, capsys):
    code, out = run(tiny_chat_model, tmp_path, PROMPTS[:1], "--stop", "")
    err = capsys.readouterr().err.strip()
    assert code == 1 and "stop strings must be non-empty" in err and "\n" not in err
    assert not out.exists()


def test_a_byte_order_mark_is_not_an_error(tiny_chat_model, tmp_path):
    inp = tmp_path / "bom.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "prompt": "The module"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(out), "--gen-len", "2"]) == 0
    assert [r["id"] for r in read(out)] == [1]


@pytest.mark.parametrize("where, message", [
    ("under_a_file", "cannot create it under"),
    ("a_directory", "is a directory"),
])
def test_an_unwritable_output_is_refused_before_the_model_loads(
        tiny_chat_model, tmp_path, capsys, monkeypatch, where, message):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS[:1])
    out = inp / "out.jsonl" if where == "under_a_file" else tmp_path
    monkeypatch.setattr("flexalisa.api.load_model", lambda *a: pytest.fail("loaded"))
    code = main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("flexalisa: error: --output") and message in err
    assert "\n" not in err


def test_a_failed_write_is_one_line_and_keeps_the_batches_before(tiny_chat_model, tmp_path,
                                                                 capsys, monkeypatch):
    import flexalisa.jobs

    real_fsync, calls = flexalisa.jobs.os.fsync, []

    def fsync_then_full(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(flexalisa.jobs.os, "fsync", fsync_then_full)
    code, out = run(tiny_chat_model, tmp_path, PROMPTS)  # batches of 3: the second write fails
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "No space left on device; the batches before this one are saved" in err
    monkeypatch.setattr(flexalisa.jobs.os, "fsync", real_fsync)
    assert run(tiny_chat_model, tmp_path, PROMPTS)[0] == 0  # the rerun completes the job
    assert sorted(r["id"] for r in read(out)) == list(range(len(PROMPTS)))
