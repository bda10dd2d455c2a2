"""Streaming, resumable batch scoring: the engine of ``softprompt score``.

Rows ``{prompt, context, continuation}`` are read from JSONL, CSV or Parquet in chunks of
``chunk_rows``; each chunk is scored with one ``Runtime.score(..., errors="return")`` call and its
records are written in input order before the next chunk is read, so memory holds one chunk
whatever the input size. Records (JSONL; the same columns in CSV and Parquet)::

    {"line": n, "logprob": float, "token_logprobs": [float], "tokens": [int]}
    {"line": n, "error": "what is wrong"}

``line`` is the line where the row starts in a JSONL or CSV file (CSV: the header is line 1) or
the 1-based row index in a Parquet file. A bad row (not JSON, not an object, a field of the
wrong type, an unknown prompt, too long...) gets an error record and never stops the job.

Resume (an output file ``out``, not stdout). Until the job ends, ``out`` does not exist; the
work in progress lives beside it:

- ``out.partial`` (JSONL, CSV): each complete chunk is appended, then fsynced;
  ``out.parts/`` (Parquet, which cannot be appended): one file per chunk, written under a
  temporary name, fsynced, then renamed;
- ``out.ckpt.json``: what the job is (input size and a hash of its first MiB, formats, chunk
  size, model name, backend and fingerprint, prompt digests, batch limits) and how far it got
  (rows, chunks, output bytes, input byte offset and line), replaced atomically (temporary file +
  ``os.replace``) after each chunk.

After a crash at any moment (``kill -9`` included), rerunning the same command with ``resume``
truncates ``out.partial`` to the checkpoint's byte count (or drops parts past its chunk count),
seeks the input to the checkpoint's offset and continues. Chunks are the same as in an
uninterrupted run, so every batch is the same and the output is byte-identical. At the end
``out.partial`` is renamed to ``out`` (Parquet: the parts are copied into ``out``, one row group
per chunk, then removed). The checkpoint stays, marked done, as the output's provenance: a
rerun of a finished job with ``resume`` does nothing, and a checkpoint that does not match the
input, model, prompts or options is refused with the fields that differ.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from softprompt.runtime.requests import ScoreResult

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
REQUEST_FIELDS = ("prompt", "context", "continuation")
OUTPUT_COLUMNS = ("line", "logprob", "token_logprobs", "tokens", "error")
CHECKPOINT_VERSION = 1
_HEAD_BYTES = 1 << 20  # the input's identity: its size and the sha256 of its first MiB


class JobError(ValueError):
    """A job that cannot start or resume; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------- rows in
def detect_format(path: str, given: str | None = None) -> str:
    """``given`` if set, else the format named by ``path``'s extension (``-`` is JSONL)."""
    if given:
        if given not in FORMATS:
            raise JobError(f"unknown format {given!r}; expected one of {FORMATS}")
        return given
    if path == "-":
        return "jsonl"
    fmt = _EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is None:
        raise JobError(f"cannot tell the format of {path!r} from its extension; expected "
                       f"{', '.join(sorted(_EXTENSIONS))} or --input-format/--output-format")
    return fmt


def _is_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def check_request(obj) -> dict | str:
    """``obj`` if it is a request whose fields have the right types, else an error message.

    prompt: a string or null; context: a string or a list of integer token ids; continuation:
    absent, null, a string or a list of token ids. Anything else the Runtime checks itself.
    """
    if not isinstance(obj, dict):
        return f"expected a JSON object {{prompt, context, continuation}}, got {type(obj).__name__}"
    p = obj.get("prompt")
    if p is not None and not isinstance(p, str):
        return f"prompt must be a string or null, got {type(p).__name__}"
    if "context" in obj and not (isinstance(obj["context"], str) or _is_ids(obj["context"])):
        return ("context must be a string or a list of integer token ids, got "
                f"{type(obj['context']).__name__}")
    c = obj.get("continuation")
    if c is not None and not (isinstance(c, str) or _is_ids(c)):
        return ("continuation must be a string, a list of integer token ids or null, got "
                f"{type(c).__name__}")
    return obj


class _Lines:
    """Lines of a binary file, decoded (invalid UTF-8 kept as surrogates), counting bytes and
    lines consumed so far, so a reader can checkpoint exactly where a row ends."""

    def __init__(self, f, offset: int = 0, line: int = 0):
        self.f, self.offset, self.line = f, offset, line

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.line += 1
        return raw.decode("utf-8", "surrogateescape")


# A reader yields (line, request dict or error message, position after the row); a position
# is (input byte offset, lines consumed) for text, (rows consumed, rows consumed) for Parquet.
Pos = tuple


def _read_jsonl(f, pos: Pos) -> Iterator[tuple[int, dict | str, Pos]]:
    offset, line = pos
    for raw in f:
        offset += len(raw)
        line += 1
        if not raw.strip():
            continue
        if line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            obj = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield line, f"not valid JSON ({e})", (offset, line)
            continue
        yield line, check_request(obj), (offset, line)


def _csv_header(f) -> tuple[list[str], Pos]:
    f.seek(0)
    lines = _Lines(f)
    header = next(csv.reader(lines), None)
    if not header:
        raise JobError("the CSV input is empty: expected a header with a 'context' column")
    if header[0].startswith("\ufeff"):
        header[0] = header[0][1:]
    if "context" not in header:
        raise JobError(f"the CSV header has no 'context' column: {header[:10]}; expected "
                       "columns context and optionally prompt, continuation")
    return header, (lines.offset, lines.line)


def _read_csv(f, pos: Pos, header: list[str]) -> Iterator[tuple[int, dict | str, Pos]]:
    """CSV cells are text: an empty prompt means no prompt, an empty continuation none (score
    the context). Columns other than prompt/context/continuation are ignored."""
    f.seek(pos[0])
    lines = _Lines(f, *pos)
    reader = csv.reader(lines)
    col = {name: header.index(name) for name in REQUEST_FIELDS if name in header}
    while True:
        start = lines.line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, f"not a valid CSV record ({e})", (lines.offset, lines.line)
            continue
        at = (lines.offset, lines.line)
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            yield start, f"CSV row has {len(row)} fields, the header has {len(header)}", at
            continue
        try:
            for cell in row:
                cell.encode("utf-8")
        except UnicodeEncodeError:
            yield start, "not valid UTF-8", at
            continue
        req = {k: row[i] for k, i in col.items()}
        for k in ("prompt", "continuation"):
            if req.get(k) == "":
                req[k] = None
        yield start, req, at


def _read_parquet(path: str, pos: Pos, batch_rows: int) -> Iterator[tuple[int, dict | str, Pos]]:
    """Parquet columns prompt (string), context (string or list of integers), continuation;
    other columns are ignored. Resuming skips whole row groups, then the rest row by row."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "context" not in names:
        raise JobError(f"the Parquet input has no 'context' column: {names[:10]}; expected "
                       "columns context and optionally prompt, continuation")
    done, group, first = pos[0], 0, 0  # first: index of the first row of row group `group`
    while group < pf.num_row_groups and first + pf.metadata.row_group(group).num_rows <= done:
        first += pf.metadata.row_group(group).num_rows
        group += 1
    if group == pf.num_row_groups:
        return
    cols = [c for c in REQUEST_FIELDS if c in names]
    n = first
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=range(group, pf.num_row_groups),
                                 columns=cols):
        for obj in batch.to_pylist():
            n += 1
            if n > done:
                yield n, check_request(obj), (n, n)


def parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ---------------------------------------------------------------------------- scoring
def score_chunk(rt, requests: Sequence[dict | str]) -> list[ScoreResult]:
    """Score one chunk; an error message in ``requests`` becomes that row's error. If the whole
    call raises unexpectedly, the rows are scored one by one so only the bad row fails."""
    good = [r for r in requests if isinstance(r, dict)]
    try:
        res = iter(rt.score(good, errors="return"))
    except Exception:  # noqa: BLE001 - any failure of one row must not fail its chunk
        res = iter([_score_one(rt, r) for r in good])
    return [ScoreResult(error=r) if isinstance(r, str) else next(res) for r in requests]


def _score_one(rt, request: dict) -> ScoreResult:
    try:
        return rt.score([request], errors="return")[0]
    except Exception as e:  # noqa: BLE001
        return ScoreResult(error=f"{type(e).__name__}: {e}")


def record(line: int, r: ScoreResult) -> dict:
    if r.error:
        return {"line": line, "error": r.error}
    return {"line": line, "logprob": r.logprob, "token_logprobs": r.token_logprobs,
            "tokens": r.tokens}


def runtime_identity(rt) -> dict:
    """What makes a Runtime's scores what they are: model, backend, weights, prompts, batching."""
    be = rt.backend
    return {"engine": "local", "model": rt.model_name, "backend": be.name,
            "fingerprint": be.fingerprint, "dtype": getattr(be, "dtype_name", None),
            "prompts": {n: p.digest for n, p in sorted(rt.prompts.items())},
            "max_batch": rt.max_batch, "max_batch_tokens": rt.max_batch_tokens}


# ------------------------------------------------------------------------------ rows out
class _TextSink:
    """JSONL or CSV records appended to a binary file, fsynced after each chunk."""

    def __init__(self, fmt: str, f, fsync: bool):
        self.fmt, self.f, self.fsync = fmt, f, fsync

    def header(self) -> bytes:
        if self.fmt != "csv":
            return b""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(OUTPUT_COLUMNS)
        return buf.getvalue().encode()

    def encode(self, records: list[dict]) -> bytes:
        if self.fmt == "jsonl":
            out = []
            for r in records:
                try:
                    out.append((json.dumps(r, ensure_ascii=False) + "\n").encode())
                except UnicodeEncodeError:  # a lone surrogate from the input: escape it
                    out.append((json.dumps(r) + "\n").encode())
            return b"".join(out)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in records:
            err = r.get("error")
            w.writerow([r["line"], "" if err else repr(r["logprob"]),
                        "" if err else json.dumps(r["token_logprobs"]),
                        "" if err else json.dumps(r["tokens"]), err or ""])
        return buf.getvalue().encode("utf-8", "backslashreplace")

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())
        return self.f.tell() if self.fsync else 0


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([("line", pa.int64()), ("logprob", pa.float64()),
                      ("token_logprobs", pa.list_(pa.float64())), ("tokens", pa.list_(pa.int64())),
                      ("error", pa.string())])


def _write_parquet_part(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: r.get(k) for k in OUTPUT_COLUMNS} for r in records]
    for r in rows:
        if r["error"] is not None:  # escape lone surrogates (invalid UTF-8 in the input)
            r["error"] = r["error"].encode("utf-8", "backslashreplace").decode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _input_identity(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
    return {"path": str(Path(path).resolve()), "size": os.path.getsize(path),
            "head_sha256": h.hexdigest()}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == "path" or a == b:  # the input may move; its size and content are its identity
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k} (checkpoint {str(a)[:40]}, now {str(b)[:40]})")
    return out


# ----------------------------------------------------------------------------------- job
def score_file(rt, input: str, output: str, *, chunk_rows: int = 1000, resume: bool = False,
               overwrite: bool = False, input_format: str | None = None,
               output_format: str | None = None, progress: bool = False,
               scorer: Callable[[list], list[ScoreResult]] | None = None,
               identity: dict | None = None, on_chunk: Callable[[dict], None] | None = None) -> dict:
    """Score ``input`` into ``output`` chunk by chunk (module docstring: formats, resume).

    Args:
        rt: a Runtime (its prompts registered), or None when ``scorer`` and ``identity`` are given.
        input / output: file paths; ``"-"`` is stdin / stdout (JSONL, no checkpoint, no resume).
        chunk_rows: rows per chunk: per score call, per fsync and checkpoint.
        resume: continue from ``output``'s checkpoint if there is one (else start).
        overwrite: discard an existing output and checkpoint instead of refusing.
        input_format / output_format: ``jsonl``, ``csv`` or ``parquet`` (default: by extension).
        progress: a tqdm bar on stderr (rows/s; ETA once the input's size is known).
        scorer: ``requests (dicts or error strings) -> ScoreResults`` (default: score_chunk on rt).
        identity: what the checkpoint records of the model (default: runtime_identity(rt)).
        on_chunk: called with the checkpoint state after each chunk is durable.
    Returns: {"rows", "errors", "chunks", "seconds"} for the rows this call scored.
    """
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise JobError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    fin, fout = detect_format(input, input_format), detect_format(output, output_format)
    if input == "-" and fin != "jsonl":
        raise JobError(f"stdin input must be JSONL, got --input-format {fin}")
    if output == "-" and fout == "parquet":
        raise JobError("Parquet cannot be written to stdout: give --output FILE.parquet")
    if scorer is None:
        scorer = lambda reqs: score_chunk(rt, reqs)  # noqa: E731
    if identity is None:
        identity = runtime_identity(rt)
    t0 = time.perf_counter()
    stats = {"rows": 0, "errors": 0, "chunks": 0}

    if output == "-" or input == "-":
        if resume:
            raise JobError("--resume needs an input file and an output file (not stdin/stdout)")
        if fout == "parquet":
            raise JobError("Parquet output needs an input file (not stdin)")
        if output != "-" and Path(output).exists() and not overwrite:
            raise JobError(f"{output} already exists: pass --overwrite to replace it")
        state = None
    else:
        job = {"version": CHECKPOINT_VERSION, "input": _input_identity(input),
               "input_format": fin, "output_format": fout, "chunk_rows": chunk_rows,
               "model": identity}
        state = _open_checkpoint(Path(output), job, resume, overwrite)
        if state["stage"] != "scoring":  # killed while finishing, or finished already
            _finish(Path(output), fout, state)
            return {**stats, "seconds": time.perf_counter() - t0}

    pos = (0, 0) if state is None else tuple(state["position"])
    total = None
    if fin == "parquet":
        total = parquet_rows(input)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=0 if state is None else state["rows_done"], unit="row",
               desc="scoring", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    out_path = Path(output)
    with _open_input(input) as f, _open_output(out_path, fout, state) as sink:
        if fin == "jsonl":
            if input != "-":
                f.seek(pos[0])
            rows = _read_jsonl(f, pos)
        elif fin == "csv":
            header, header_end = _csv_header(f)
            rows = _read_csv(f, max(pos, header_end), header)
        else:
            rows = _read_parquet(input, pos, min(chunk_rows, 65536))
        size = None if input == "-" or fin == "parquet" else os.path.getsize(input)
        if state is not None and fout != "parquet" and state["output_bytes"] == 0:
            state["output_bytes"] = sink.write(sink.header())
        elif state is None:
            sink.write(sink.header())
        while True:
            chunk = list(itertools.islice(rows, chunk_rows))
            if not chunk:
                break
            results = scorer([req for _, req, _ in chunk])
            records = [record(line, r) for (line, _, _), r in zip(chunk, results, strict=True)]
            stats["errors"] += sum("error" in r for r in records)
            if state is None:
                sink.write(sink.encode(records))
            elif fout == "parquet":
                _write_parquet_part(records, _parts_dir(out_path) / f"part-{state['chunks_done']:08d}.parquet")
            else:
                state["output_bytes"] = sink.write(sink.encode(records))
            stats["rows"] += len(chunk)
            stats["chunks"] += 1
            pos = chunk[-1][2]
            if state is not None:
                state.update(rows_done=state["rows_done"] + len(chunk),
                             chunks_done=state["chunks_done"] + 1, position=list(pos))
                _write_json_atomic(_ckpt_path(out_path), state)
                if on_chunk:
                    on_chunk(dict(state))
            bar.update(len(chunk))
            if size and pos[0]:  # rows so far x bytes in all / bytes so far
                bar.total = max(bar.n, round(bar.n * size / pos[0]))
                bar.refresh()
    bar.total = bar.n
    bar.close()
    if state is not None:
        state["stage"] = "finishing"
        _write_json_atomic(_ckpt_path(out_path), state)
        _finish(out_path, fout, state)
    return {**stats, "seconds": time.perf_counter() - t0}


def _ckpt_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt.json")


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _open_checkpoint(out: Path, job: dict, resume: bool, overwrite: bool) -> dict:
    """The state to continue from: a fresh one, or the checkpoint's after checking it matches."""
    ck, companions = _ckpt_path(out), (_partial_path(out), _parts_dir(out))
    if ck.exists() and resume and not overwrite:
        try:
            state = json.loads(ck.read_text(encoding="utf-8"))
            old = {k: state[k] for k in job}
        except (ValueError, KeyError) as e:
            raise JobError(f"checkpoint {ck} is unreadable ({e}); pass --overwrite to start "
                           "again") from None
        diff = _differences(old, job)
        if diff:
            raise JobError(f"checkpoint {ck} belongs to another job: {'; '.join(diff)}. Rerun "
                           "with the same input, model, prompts and options to resume, or pass "
                           "--overwrite to start again")
        if state["stage"] == "scoring":
            _truncate_to_checkpoint(out, job["output_format"], state)
        return state
    if ck.exists() and not overwrite:
        raise JobError(f"{out} has a checkpoint from an earlier run ({ck}): pass --resume to "
                       "continue it or --overwrite to start again")
    existing = [p for p in (out, *companions) if p.exists()]
    if existing and not overwrite:
        raise JobError(f"{existing[0]} already exists: pass --overwrite to replace it")
    for p in (ck, out, *companions):
        _remove(p)
    state = {**job, "stage": "scoring", "rows_done": 0, "chunks_done": 0, "output_bytes": 0,
             "position": [0, 0]}
    _write_json_atomic(ck, state)
    if job["output_format"] == "parquet":
        _parts_dir(out).mkdir()
    else:
        _partial_path(out).touch()
    return state


def _truncate_to_checkpoint(out: Path, fmt: str, state: dict) -> None:
    """Drop whatever the killed run wrote after its last checkpoint."""
    if fmt == "parquet":
        parts = _parts_dir(out)
        parts.mkdir(exist_ok=True)
        for p in parts.iterdir():
            if p.suffix != ".parquet" or int(p.stem.split("-")[1]) >= state["chunks_done"]:
                p.unlink()
        have = len(list(parts.iterdir()))
        if have != state["chunks_done"]:
            raise JobError(f"{parts} holds {have} parts but the checkpoint counts "
                           f"{state['chunks_done']}: the output was changed outside this job; "
                           "pass --overwrite to start again")
        return
    partial, n = _partial_path(out), state["output_bytes"]
    if not partial.exists() and n == 0:
        partial.touch()
    if not partial.exists() or partial.stat().st_size < n:
        raise JobError(f"{partial} is shorter than the {n} bytes its checkpoint recorded: the "
                       "output was changed outside this job; pass --overwrite to start again")
    with open(partial, "r+b") as f:
        f.truncate(n)
        os.fsync(f.fileno())


def _finish(out: Path, fmt: str, state: dict) -> None:
    """Make ``out`` complete (idempotent: a crash at any step is finished by the next run)."""
    if state["stage"] == "finishing":
        if fmt == "parquet":
            import pyarrow.parquet as pq

            tmp = out.with_name(out.name + ".tmp")
            with open(tmp, "wb") as f:
                with pq.ParquetWriter(f, _parquet_schema()) as w:
                    for part in sorted(_parts_dir(out).glob("part-*.parquet")):
                        w.write_table(pq.read_table(part))  # one row group per chunk
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        elif _partial_path(out).exists():
            os.replace(_partial_path(out), out)
        if not out.exists():
            raise JobError(f"{out} and its partial output are both missing; pass --overwrite "
                           "to start again")
        _fsync_dir(out.parent)
        state["stage"] = "done"
        _write_json_atomic(_ckpt_path(out), state)
    if not out.exists():
        raise JobError(f"{out} is missing although its checkpoint says the job finished; pass "
                       "--overwrite to score again")
    _remove(_parts_dir(out))


class _open_input:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.f = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        return self.f

    def __exit__(self, *exc):
        if self.path != "-":
            self.f.close()


class _open_output:
    """The sink of this run: stdout, ``out.partial`` opened for appending, or (Parquet) none."""

    def __init__(self, out: Path, fmt: str, state: dict | None):
        self.out, self.fmt, self.state = out, fmt, state

    def __enter__(self):
        if self.state is None:
            if str(self.out) == "-":
                self.f = sys.stdout.buffer
            else:
                self.f = open(self.out, "wb")
            return _TextSink(self.fmt, self.f, fsync=False)
        self.f = None if self.fmt == "parquet" else open(_partial_path(self.out), "ab")
        return _TextSink(self.fmt, self.f, fsync=True)

    def __exit__(self, *exc):
        if self.f is sys.stdout.buffer:
            self.f.flush()
        elif self.f is not None:
            self.f.close()
