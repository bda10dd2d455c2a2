"""The streaming, resumable ``softprompt score`` job (softprompt/jobs/) on a tiny ONNX bundle:
chunked results equal in-process ``Runtime.score``, SIGKILL at random moments then --resume
gives the uninterrupted output byte for byte, bad rows get error records, CSV and Parquet
round-trip, a checkpoint from another job is refused, and memory stays flat."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tolerances import SCORE

from softprompt import jobs
from softprompt.cli import main
from softprompt.runtime.api import Runtime

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def job(tiny_llama_bundle, tmp_path_factory):
    """(bundle, prompt file, a Runtime with prompt 'p' registered, work dir)."""
    d = tmp_path_factory.mktemp("job")
    prompt = d / "p.npy"
    np.save(prompt, np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    rt.add_prompt("p", prompt)
    return tiny_llama_bundle, prompt, rt, d


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Requests of 2-12 token-id contexts and text, with and without prompt and continuation."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ctx = [rng.randrange(3, 96) for _ in range(rng.randint(2, 12))] if i % 4 else "the movie was good"
        rows.append({"prompt": None if i % 5 == 0 else "p", "context": ctx,
                     "continuation": None if i % 7 == 0 else [rng.randrange(3, 96)]})
    return rows


BAD_LINES = ['not json', '[1, 2]', '{"prompt": [1], "context": [4]}', '{"context": 5}',
             '{"context": [4, 2.5]}', '{"context": [4], "continuation": {"a": 1}}',
             '{"prompt": "nope", "context": [4, 5]}', '{"context": [4], "extra": 1}',
             '{"context": [4, 100000]}']


def _write_jsonl(path: Path, rows: list[dict], bad_every: int = 0) -> dict:
    """Write rows (blank lines and BAD_LINES mixed in); return {record number: row or None}
    (records are the non-blank lines: a record's ``line`` in the output)."""
    lines, at = {}, 0
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            if bad_every and i % bad_every == 3:
                f.write(BAD_LINES[(i // bad_every) % len(BAD_LINES)] + "\n")
                at += 1
                lines[at] = None
                f.write("\n")  # a blank line is not a record
            f.write(json.dumps(r) + "\n")
            at += 1
            lines[at] = r
    return lines


def _score_cli(bundle, prompt, inp, out, *extra):
    return main(["score", str(bundle), "--backend", "onnx", "--prompt", f"p={prompt}",
                 "-i", str(inp), "-o", str(out), "--no-progress", *extra])


def _read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_chunks_equal_runtime_score_and_bad_rows_get_errors(job):
    bundle, prompt, rt, d = job
    lines = _write_jsonl(d / "in.jsonl", _rows(5000), bad_every=500)
    assert _score_cli(bundle, prompt, d / "in.jsonl", d / "out.jsonl", "--chunk-rows", "700") == 0
    recs = _read_records(d / "out.jsonl")
    assert [r["line"] for r in recs] == sorted(lines)  # every row once, in input order
    good = [n for n, r in lines.items() if r is not None]
    want = dict(zip(good, rt.score([lines[n] for n in good], errors="return")))
    for rec in recs:
        n = rec["line"]
        if lines[n] is None:
            assert set(rec) == {"line", "error"} and rec["error"], rec
            continue
        w = want[n]
        assert w.error is None and "error" not in rec, (rec, w.error)
        assert rec["tokens"] == w.tokens
        np.testing.assert_allclose(rec["token_logprobs"], w.token_logprobs, **SCORE["float32"])
        np.testing.assert_allclose(rec["logprob"], w.logprob, **SCORE["float32"])
    errors = {rec["line"]: rec["error"] for rec in recs if "error" in rec}
    assert len(errors) == 10
    msgs = " | ".join(errors.values())
    for expected in ("not valid JSON", "expected a JSON object", "prompt must be a string",
                     "context must be a string or a list of integer token ids",
                     "continuation must be", "unknown prompt 'nope'", "unknown request fields",
                     "[0, 96): [100000]"):
        assert expected in msgs, expected
    ck = json.loads((d / "out.jsonl.ckpt.json").read_text())
    assert ck["stage"] == "done" and ck["rows_done"] == len(lines)
    assert not (d / "out.jsonl.partial").exists()


def test_a_chunk_whose_score_call_raises_is_scored_row_by_row(job):
    *_, rt, _ = job

    class Flaky:  # a runtime whose batched call breaks on one poisoned row
        def score(self, reqs, errors="raise"):
            if any(r.get("context") == [13, 13] for r in reqs):
                if len(reqs) > 1:
                    raise RuntimeError("backend fell over")
                raise RuntimeError("this row breaks the backend")
            return rt.score(reqs, errors=errors)

    reqs = [{"prompt": "p", "context": [4, 5]}, {"context": [13, 13]}, "bad row", {"context": [6, 7]}]
    res = jobs.score_chunk(Flaky(), reqs)
    assert res[1].error == "RuntimeError: this row breaks the backend"
    assert res[2].error == "bad row"
    want = rt.score([reqs[0], reqs[3]])
    assert [res[0].logprob, res[3].logprob] == [want[0].logprob, want[1].logprob]


def _run(cmd, **kw):
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _rows_done(ck: Path) -> int:
    """Rows the checkpoint records as written (0 before the first one; it is replaced
    atomically, so a read sees a whole state)."""
    try:
        return json.loads(ck.read_text())["rows_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _run_until(p, ck: Path, rows: int) -> bool:
    """Wait until the running job's checkpoint records >= ``rows`` rows (True), or the job ends
    (False); by progress, not by time (the deadline only fails a job that stopped moving)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return False
        if _rows_done(ck) >= rows:
            return True
        time.sleep(0.002)
    raise AssertionError(f"the job wrote no checkpoint past {rows} rows in 120 s")


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(job):
    """SIGKILL during start-up, and at seeded points of the job's progress (read from its
    checkpoint, plus a seeded sub-chunk delay so kills land inside chunks and between a chunk's
    write and its checkpoint); every rerun resumes the previous one's work; the final output
    equals an uninterrupted run's, byte for byte."""
    bundle, prompt, _, d = job
    lines = _write_jsonl(d / "kill.jsonl", _rows(8000, seed=1), bad_every=700)
    cmd = [sys.executable, "-m", "softprompt.cli", "score", str(bundle), "--backend", "onnx",
           "--prompt", f"p={prompt}", "-i", str(d / "kill.jsonl"), "--chunk-rows", "100",
           "--no-progress", "--resume"]
    p = _run(cmd + ["-o", str(d / "ref.jsonl")])
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    out, ck = d / "killed.jsonl", d / "killed.jsonl.ckpt.json"
    rng = random.Random(13)
    # progress points to kill after: start-up (0), then six spread over the first 60 % of rows
    targets = [0] + sorted(rng.sample(range(100, int(0.6 * len(lines)), 100), 6))
    mid_job = 0
    for target in targets:
        p = _run(cmd + ["-o", str(out)])
        if not _run_until(p, ck, target):
            break  # the job finished first
        time.sleep(rng.uniform(0, 0.02))  # somewhere inside the next chunk
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        mid_job += 0 < _rows_done(ck) < len(lines)
    assert mid_job >= 4, f"{mid_job} of {len(targets)} kills in the middle of the job: proved little"
    p = _run(cmd + ["-o", str(out)])
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert out.read_bytes() == (d / "ref.jsonl").read_bytes()
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == sorted(lines)


def test_checkpoint_of_another_job_or_an_existing_output_is_refused(job, tmp_path):
    bundle, prompt, _, d = job
    _write_jsonl(tmp_path / "in.jsonl", _rows(50))
    out = tmp_path / "out.jsonl"
    _score_cli(bundle, prompt, tmp_path / "in.jsonl", out, "--chunk-rows", "20")
    with pytest.raises(SystemExit, match="has a checkpoint from an earlier run.*--resume"):
        _score_cli(bundle, prompt, tmp_path / "in.jsonl", out)
    with pytest.raises(SystemExit, match=r"belongs to another job: chunk_rows \(checkpoint 20, now 10\)"):
        _score_cli(bundle, prompt, tmp_path / "in.jsonl", out, "--chunk-rows", "10", "--resume")
    np.save(tmp_path / "q.npy", np.ones((5, 64), np.float32))
    with pytest.raises(SystemExit, match=r"belongs to another job: model.prompts.p"):
        main(["score", str(bundle), "--backend", "onnx", "--prompt", f"p={tmp_path / 'q.npy'}",
              "-i", str(tmp_path / "in.jsonl"), "-o", str(out), "--chunk-rows", "20",
              "--resume", "--no-progress"])
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write('{"context": [5, 6]}\n')
    with pytest.raises(SystemExit, match=r"belongs to another job: input.head_sha256 .*input.size"):
        _score_cli(bundle, prompt, tmp_path / "in.jsonl", out, "--chunk-rows", "20", "--resume")
    before = out.read_bytes()
    assert _score_cli(bundle, prompt, tmp_path / "in.jsonl", out, "--overwrite") == 0
    assert len(_read_records(out)) == 51 and out.read_bytes() != before
    (tmp_path / "other.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="other.jsonl already exists: pass --overwrite"):
        _score_cli(bundle, prompt, tmp_path / "in.jsonl", tmp_path / "other.jsonl")


def test_csv_and_parquet_round_trip(job, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bundle, prompt, rt, _ = job
    texts = ["the movie was good", "i hate this phone", "a very great film", "the team won",
             "price of the stock", "hello world", "politics and the election"]
    rows = [{"id": i, "prompt": "p" if i % 3 else "", "context": texts[i % 7],
             "continuation": ["positive", "negative", ""][i % 3]} for i in range(230)]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        f.write("id,prompt,context,continuation\n")
        for r in rows:
            f.write(f'{r["id"]},{r["prompt"]},"{r["context"]}",{r["continuation"]}\n')
        f.write('999,p,"a ""quoted""\nmulti-line context",yes\n')
        f.write("1000,p\n")  # a short row
    nulls = [{k: v if v != "" else None for k, v in r.items()} for r in rows]  # Parquet has nulls
    pq.write_table(pa.Table.from_pylist(nulls), tmp_path / "in.parquet", row_group_size=64)
    as_req = [{"prompt": r["prompt"] or None, "context": r["context"],
               "continuation": r["continuation"] or None} for r in rows]
    want = rt.score(as_req)
    for inp, first in (("in.csv", 1), ("in.parquet", 1)):  # line: the record number
        for out in ("out.jsonl", "out.csv", "out.parquet"):
            for p in tmp_path.glob(out + "*"):
                p.unlink()
            assert _score_cli(bundle, prompt, tmp_path / inp, tmp_path / out, "--chunk-rows", "50") == 0
            if out.endswith(".parquet"):
                got = pq.read_table(tmp_path / out).to_pylist()
                assert pq.ParquetFile(tmp_path / out).num_row_groups == 5  # one per chunk
            elif out.endswith(".csv"):
                import csv

                with open(tmp_path / out, newline="") as f:
                    got = [{k: (json.loads(v) if v and k != "error" else v or None)
                            for k, v in r.items()} for r in csv.DictReader(f)]
            else:
                got = _read_records(tmp_path / out)
            assert [g["line"] for g in got[:len(rows)]] == list(range(first, first + len(rows))), (inp, out)
            for g, w in zip(got, want):
                assert not g.get("error")
                assert g["tokens"] == w.tokens, (inp, out, g)
                assert abs(g["logprob"] - w.logprob) <= SCORE["float32"]["atol"], (inp, out, g)
            if inp == "in.csv":
                assert got[-2]["line"] == 231 and got[-2]["logprob"] is not None  # multi-line cell
                assert got[-1]["line"] == 232 and "2 fields, the header has 4" in got[-1]["error"]
            else:
                assert len(got) == len(rows)


@pytest.mark.slow
def test_memory_stays_flat_over_200k_rows(job, tmp_path):
    """200,000 short rows through the job in a fresh process: RSS grows < 200 MB after the first
    chunk (holding all results, as the old in-memory ``score`` did, would take far more)."""
    bundle, prompt, _, _ = job
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(200_000):
            f.write(f'{{"prompt": "p", "context": [{3 + i % 90}, 4], "continuation": [{5 + i % 80}]}}\n')
    script = f"""
import json
from softprompt.runtime.api import Runtime
from softprompt.jobs import score_file
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
rt = Runtime.load({str(bundle)!r}, backend="onnx", max_batch=512)
rt.add_prompt("p", {str(prompt)!r})
seen = []
s = score_file(rt, {str(tmp_path / 'big.jsonl')!r}, {str(tmp_path / 'big.out.jsonl')!r},
               chunk_rows=5000, on_chunk=lambda st: seen.append(rss()))
print(json.dumps({{"rows": s["rows"], "first": seen[0], "max": max(seen), "last": seen[-1]}}))
"""
    res = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["rows"] == 200_000
    assert m["max"] - m["first"] < 200e6, m  # RSS after each chunk against after the first
    assert sum(1 for _ in open(tmp_path / "big.out.jsonl")) == 200_000
