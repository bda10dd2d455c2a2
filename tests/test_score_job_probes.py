"""``softprompt score`` against outside probes: a 50 MB line is refused before it is tokenised
(flat memory), unwritable outputs and a full disk end in one line (and resume still works), a
finished job rerun with the same command is complete (exit 0), ``line`` is the record number in
every format, and ``--keep-columns`` carries the input's other columns through."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softprompt.cli import main
from softprompt.jobs import JobError, score_file
from softprompt.jobs import formats
from softprompt.runtime.api import Runtime
from softprompt.runtime.requests import RequestError, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1"}
BIG = 50 * 1024 * 1024


def _byte_level_model(path: Path) -> Path:
    """A tiny Llama whose tokenizer is byte-level BPE (as SmolLM2's, GPT-2's, Qwen2's), with a
    few merges so a token covers up to 3 characters of text (5 with the special tokens)."""
    import torch
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tiny import tiny_config

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    merges = [("Ġ", "t"), ("Ġt", "h"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab, merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    config = tiny_config("llama")
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    return _byte_level_model(tmp_path_factory.mktemp("bytes") / "llama")


# --------------------------------------------------------------- 2. a 50 MB line
def test_character_bound_is_a_true_bound(byte_model):
    from transformers import AutoTokenizer

    tok = Tokenizer(AutoTokenizer.from_pretrained(byte_model).backend_tokenizer)
    assert tok.max_chars_per_token == 5  # "<pad>" and "</s>", added tokens, are text too
    texts = [" the" * 50, "er" * 90, "x" * 10, "é" * 40, "\n" * 30, "the rather other" * 7]
    real = Path(os.environ["SOFTPROMPT_HOME"]) / "models" / "SmolLM2-135M-Instruct" / "tokenizer.json"
    toks = [tok]
    if real.is_file():  # the default model's byte-level BPE: its longest entry is 81 bytes
        from tokenizers import Tokenizer as RawTokenizer

        toks.append(Tokenizer(RawTokenizer.from_file(str(real))))
        assert toks[-1].max_chars_per_token == 81
        texts += [" " * 5000, "=" * 3000, "#" * 4000, "\n" + " " * 4000, "-" * 999]
    for t in toks:
        k = t.max_chars_per_token
        for text in texts:
            n = len(t.encode(text, False))
            assert n >= len(text) / k, (text[:20], n, k)  # never refuses a text that fits
            with pytest.raises(RequestError, match=r"input too long: context is \d+ characters"):
                t.check_length(text, (len(text) - 1) // k, "context")
            t.check_length(text, n, "context")


def test_tokenizers_without_a_bound_are_left_alone():
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    from tiny import tiny_tokenizer

    assert Tokenizer(tiny_tokenizer().backend_tokenizer).max_chars_per_token is None  # word-level
    bpe = RawTokenizer(models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>", fuse_unk=True))
    assert Tokenizer(bpe).max_chars_per_token is None  # a run of unknown characters: one token
    ok = RawTokenizer(models.BPE({"a": 0, "ab": 1, "b": 2}, [("a", "b")]))
    assert Tokenizer(ok).max_chars_per_token == 2
    ok.normalizer = normalizers.NFKC()
    assert Tokenizer(ok).max_chars_per_token == 8  # composition shrinks a text up to 4 times
    ok.normalizer = normalizers.Strip()
    assert Tokenizer(ok).max_chars_per_token is None
    ok.normalizer = None
    ok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # drops whitespace
    assert Tokenizer(ok).max_chars_per_token is None
    assert Tokenizer(None).max_chars_per_token is None


def test_a_50mb_context_is_refused_before_tokenising_in_process(byte_model, monkeypatch):
    rt = Runtime.load(byte_model, backend="torch")
    encoded: list[int] = []  # lengths of the texts handed to the tokenizer
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, special: (
        encoded.append(len(text)), encode(self, text, special))[1])
    try:
        res = rt.score([{"context": "the " * (BIG // 4)}, {"context": "the movie"},
                        {"context": [5, 6], "continuation": "x" * BIG}], errors="return")
        assert encoded == [len("the movie")]  # neither long text reached the tokenizer
        assert res[0].error == ("input too long: context is 52428800 characters, more than the "
                                "2560 that 512 positions can hold (at most 5 characters a token "
                                "for this tokenizer)")
        assert res[1].error is None and res[2].error.startswith("input too long: continuation is")
        with pytest.raises(RequestError, match="input too long: context is 52428800 characters"):
            rt.generate(None, ["a" * BIG], max_new_tokens=1)
    finally:
        rt.close()


def test_a_50mb_line_through_softprompt_score_keeps_memory_flat(byte_model, tmp_path):
    """The probe's 50 MB line made `softprompt score` peak at ~5 GB and take 90 s: the whole line
    was tokenised before the length check. Now it is refused on its length: the child's peak
    RSS stays under 1.5 GB. The peak is the child's own VmHWM after exec (wait4's ru_maxrss
    would also count the pages it shared with this, the forking, pytest process)."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        f.write('{"context": "the movie was good"}\n')
        f.write('{"context": "' + "the " * (BIG // 4) + '"}\n')
        f.write('{"context": "i hate it"}\n')
    out, log, hwm = tmp_path / "out.jsonl", tmp_path / "stderr.txt", tmp_path / "vmhwm.txt"
    child = ("import atexit, runpy, sys\n"
             "def peak():\n"
             "    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]\n"
             f"    open({str(hwm)!r}, 'w').write(line.split()[1])\n"
             "atexit.register(peak)\n"
             "sys.argv = ['softprompt'] + sys.argv[1:]\n"
             "runpy.run_module('softprompt.cli', run_name='__main__')\n")
    with open(log, "wb") as err:
        p = subprocess.run([sys.executable, "-c", child, "score", str(byte_model),
                            "--backend", "torch", "-i", str(inp), "-o", str(out), "--no-progress"],
                           env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    assert p.returncode == 0, log.read_text()
    peak = int(hwm.read_text()) * 1024  # kB
    assert peak < 1.5 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3]
    assert "error" not in recs[0] and "error" not in recs[2]
    assert recs[1]["error"].startswith("input too long: context is 52428800 characters")


# ------------------------------------------------------ 3. unwritable outputs, full disk
@pytest.fixture(scope="module")
def job(tiny_llama_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    prompt = d / "p.npy"
    np.save(prompt, np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    rt.add_prompt("p", prompt)
    yield tiny_llama_bundle, prompt, rt
    rt.close()


def _rows(path: Path, n: int = 60, ids: bool = False) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({**({"id": f"r{i}"} if ids else {}), "prompt": "p" if i % 2 else None,
                                "context": [3 + i % 50, 4, 5 + i % 7]}) + "\n")
            if i % 9 == 4:
                f.write("\n")  # blank lines are not records
    return path


def _cli(bundle, prompt, inp, out, *extra):
    return main(["score", str(bundle), "--backend", "onnx", "--prompt", f"p={prompt}",
                 "-i", str(inp), "-o", str(out), "--no-progress", *extra])


def test_unwritable_output_and_missing_input_are_one_line(job, tmp_path, monkeypatch):
    bundle, prompt, rt = job
    inp = _rows(tmp_path / "in.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "dir.jsonl" / "keep").write_text("x")
    for out, msg in ((tmp_path / "missing" / "dir" / "out.jsonl", r"cannot write .*out.jsonl: "
                      r"directory .*missing/dir does not exist"),
                     (tmp_path / "dir.jsonl", r"cannot write .*dir.jsonl: it is a directory")):
        for extra in ((), ("--overwrite",), ("--resume",)):
            with pytest.raises(SystemExit, match=msg) as e:
                _cli(bundle, prompt, inp, out, *extra)
            assert "\n" not in str(e.value.code)
    assert (tmp_path / "dir.jsonl" / "keep").is_file()  # --overwrite never removes a directory
    with pytest.raises(SystemExit, match=r"cannot read .*nope.jsonl: no such file"):
        _cli(bundle, prompt, tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    import softprompt.jobs.checkpoint as checkpoint

    def denied(path, obj):  # a directory that refuses writes (the tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied", f"{path}.tmp")

    monkeypatch.setattr(checkpoint, "_write_json_atomic", denied)
    with pytest.raises(JobError, match=r"^cannot write .*out.jsonl.ckpt.json.tmp: Permission denied$"):
        score_file(rt, str(inp), str(tmp_path / "out.jsonl"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_full_disk_is_one_line_and_resume_finishes_the_job(job, tmp_path, monkeypatch, fmt):
    """ENOSPC from the third fsync on (a chunk's data or its checkpoint): score_file raises a
    one-line JobError naming the file and --resume; once space is back, the same job resumed
    gives the uninterrupted output byte for byte."""
    bundle, prompt, rt = job
    inp = _rows(tmp_path / "in.jsonl")
    ref = tmp_path / f"ref.{fmt}"
    score_file(rt, str(inp), str(ref), chunk_rows=7)
    out = tmp_path / f"out.{fmt}"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(JobError, match=r"no space left on the device writing .*out\.%s.* --resume"
                       % fmt) as e:
        score_file(rt, str(inp), str(out), chunk_rows=7)
    assert "\n" not in str(e.value)
    assert not out.exists()
    calls.clear()
    with pytest.raises(SystemExit, match="no space left on the device"):  # the CLI: one line too
        _cli(bundle, prompt, inp, out, "--chunk-rows", "7", "--resume")
    monkeypatch.setattr(os, "fsync", real_fsync)
    summary = score_file(rt, str(inp), str(out), chunk_rows=7, resume=True)
    assert summary["rows"] < 60 and not summary["already_done"]
    assert out.read_bytes() == ref.read_bytes()


def test_full_disk_on_a_sink_write(job, tmp_path, monkeypatch):
    _, _, rt = job
    inp = _rows(tmp_path / "in.jsonl")
    score_file(rt, str(inp), str(tmp_path / "ref.jsonl"), chunk_rows=5)
    real, n = formats.TextSink.write, []

    class Full:  # the file when the quota is reached: half a chunk gets to the disk
        def __init__(self, f):
            self.f, self.name = f, f.name

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        def __getattr__(self, k):
            return getattr(self.f, k)

    def write(self, data):
        n.append(1)
        if len(n) != 4:
            return real(self, data)
        f, self.f = self.f, Full(self.f)
        try:
            return real(self, data)
        finally:
            self.f = f

    monkeypatch.setattr(formats.TextSink, "write", write)
    with pytest.raises(JobError, match="no space left on the device writing .*out.jsonl.partial"):
        score_file(rt, str(inp), str(tmp_path / "out.jsonl"), chunk_rows=5)
    monkeypatch.setattr(formats.TextSink, "write", real)
    score_file(rt, str(inp), str(tmp_path / "out.jsonl"), chunk_rows=5, resume=True)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_finished_job_rerun_is_complete_and_exits_zero(job, tmp_path, capsys):
    bundle, prompt, _ = job
    inp, out = _rows(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert _cli(bundle, prompt, inp, out, "--chunk-rows", "20") == 0
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    capsys.readouterr()
    for extra in ((), ("--resume",)):
        assert _cli(bundle, prompt, inp, out, "--chunk-rows", "20", *extra) == 0
        err = capsys.readouterr().err
        assert "is complete already (60 rows, the same job)" in err and "--overwrite" in err
        assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(SystemExit, match="has a checkpoint from an earlier run"):  # another job
        _cli(bundle, prompt, inp, out, "--chunk-rows", "10")
    assert _cli(bundle, prompt, inp, out, "--chunk-rows", "20", "--overwrite") == 0
    assert out.stat().st_mtime_ns != before[1] and out.read_bytes() == before[0]
    ck = json.loads((tmp_path / "out.jsonl.ckpt.json").read_text())
    ck["version"] = 1  # a checkpoint of the old `line` meaning is another job
    (tmp_path / "out.jsonl.ckpt.json").write_text(json.dumps(ck))
    with pytest.raises(SystemExit, match=r"belongs to another job: version \(checkpoint 1, now 2\)"):
        _cli(bundle, prompt, inp, out, "--chunk-rows", "20", "--resume")


# --------------------------------------------- 4. record numbers and --keep-columns
def _read(path: Path) -> list[dict]:
    import csv

    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_line_is_the_record_number_and_keep_columns_carries_ids(job, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bundle, prompt, rt = job
    ids = [f"r{i}" for i in range(40)]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        f.write("id,prompt,context,weight\n")
        for i, x in enumerate(ids):
            ctx = f'"the movie\nwas {"good" if i % 2 else "bad"}"' if i % 3 == 0 else "the movie"
            f.write(f"{x},{'p' if i % 2 else ''},{ctx},{i / 2}\n")
            if i % 11 == 5:
                f.write("\n")
    pq.write_table(pa.table({"id": list(range(40)), "context": [[3 + i % 50, 4] for i in range(40)],
                             "tag": [{"k": i} for i in range(40)]}), tmp_path / "in.parquet",
                   row_group_size=16)
    _rows(tmp_path / "in.jsonl", 40, ids=True)
    want = {}
    for inp in ("in.csv", "in.parquet", "in.jsonl"):
        outs = ("out.jsonl",) if inp == "in.jsonl" else ("out.jsonl", "out.csv", "out.parquet")
        for out in outs:
            for keep in ((), ("--keep-columns",)):
                for p in tmp_path.glob(out + "*"):
                    p.unlink()
                assert _cli(bundle, prompt, tmp_path / inp, tmp_path / out, "--chunk-rows", "9",
                            *keep) == 0
                got = _read(tmp_path / out)
                assert [int(g["line"]) for g in got] == list(range(1, 41)), (inp, out)
                if inp == "in.jsonl" and not keep:  # a JSON row's unknown field is its error
                    assert all("unknown request fields ['id']" in g["error"] for g in got)
                    continue
                assert all(not g.get("error") for g in got), (inp, out, got[0])
                if not keep:
                    assert "id" not in got[0]
                    want[inp, out] = [g["logprob"] for g in got]
                    continue
                if (inp, out) in want:
                    assert [g["logprob"] for g in got] == want[inp, out]  # the same scores
                if inp == "in.csv":
                    assert [g["id"] for g in got] == ids and got[3]["weight"] == "1.5"
                    assert list(got[0])[:3] == ["line", "id", "weight"]
                elif inp == "in.parquet":
                    assert [int(g["id"]) for g in got] == list(range(40))
                    tag = got[5]["tag"]
                    assert (json.loads(tag) if isinstance(tag, str) else tag) == {"k": 5}
                    if out == "out.parquet":
                        schema = pq.read_schema(tmp_path / out)
                        assert schema.field("id").type == pa.int64()
                        assert schema.names[:3] == ["line", "id", "tag"]
                else:
                    assert [g["id"] for g in got] == [f"r{i}" for i in range(40)]
                    assert list(got[0])[:2] == ["line", "id"]
    with pytest.raises(SystemExit, match="--keep-columns with JSONL input needs JSONL output"):
        _cli(bundle, prompt, tmp_path / "in.jsonl", tmp_path / "x.csv", "--keep-columns")
    (tmp_path / "clash.csv").write_text("context,error\nthe movie,x\n")
    with pytest.raises(SystemExit, match="input column 'error' has the name of an output column"):
        _cli(bundle, prompt, tmp_path / "clash.csv", tmp_path / "x.jsonl", "--keep-columns")
    (tmp_path / "clash.jsonl").write_text('{"context": [4, 5], "line": 7}\n{"context": [4, 6]}\n')
    assert _cli(bundle, prompt, tmp_path / "clash.jsonl", tmp_path / "c.jsonl", "--keep-columns") == 0
    got = _read(tmp_path / "c.jsonl")
    assert "field 'line' has the name of an output column" in got[0]["error"]
    assert got[0]["line"] == 1 and "error" not in got[1]


def test_keep_columns_is_part_of_the_job_and_resumes_byte_identical(job, tmp_path):
    bundle, prompt, rt = job
    inp = _rows(tmp_path / "in.jsonl", 80, ids=True)
    ref = tmp_path / "ref.jsonl"
    score_file(rt, str(inp), str(ref), chunk_rows=9, keep_columns=True)
    out = tmp_path / "out.jsonl"

    def crash(state):
        if state["chunks_done"] == 3:
            raise KeyboardInterrupt  # as a kill after the third chunk is durable

    with pytest.raises(KeyboardInterrupt):
        score_file(rt, str(inp), str(out), chunk_rows=9, keep_columns=True, on_chunk=crash)
    with pytest.raises(JobError, match=r"belongs to another job: keep_columns \(checkpoint True, now False\)"):
        score_file(rt, str(inp), str(out), chunk_rows=9, resume=True)
    summary = score_file(rt, str(inp), str(out), chunk_rows=9, keep_columns=True, resume=True)
    assert summary["rows"] == 80 - 27
    assert out.read_bytes() == ref.read_bytes()
    assert [r["id"] for r in _read(out)] == [f"r{i}" for i in range(80)]
