"""Rows in and records out: the JSONL, CSV and Parquet formats of the batch-scoring job.

Readers yield ``(n, request dict or error message, position after the row, kept columns)``:
``n`` is the row's 1-based *record number* in every format (blank lines and a CSV header are
not records, a CSV record may span lines), so the n-th row a dataframe library reads from the
input is record n. A position (``Pos``) is (input byte offset, lines consumed, records
consumed) for text, (rows, rows, rows) for Parquet, so the job can checkpoint exactly where a
row ends and a reader can start there again, numbering on. Kept columns are the input's
columns other than prompt/context/continuation, read only with ``keep`` (``--keep-columns``).
Writers turn ``ScoreResult``s into records::

    {"line": n, "logprob": float, "token_logprobs": [float], "tokens": [int]}
    {"line": n, "error": "what is wrong"}

(JSONL; the same columns, ``OUTPUT_COLUMNS``, in CSV and Parquet), with kept columns after
``line``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from softprompt.jobs.errors import JobError
from softprompt.models.files import loads_json
from softprompt.runtime.requests import ScoreResult

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
REQUEST_FIELDS = ("prompt", "context", "continuation")
OUTPUT_COLUMNS = ("line", "logprob", "token_logprobs", "tokens", "error")

# A reader yields (record number, request dict or error message, position after the row, kept
# columns); a position is (input byte offset, lines consumed, records consumed) for text,
# (rows consumed,) * 3 for Parquet.
Pos = tuple


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


# ------------------------------------------------------------------------------- rows in
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


def _split_kept(obj: dict) -> tuple[dict | str, dict]:
    """(the request fields of a JSON row, its other fields) for ``keep``; a field named like an
    output column is the row's error (its value would be lost)."""
    kept = {k: v for k, v in obj.items() if k not in REQUEST_FIELDS}
    clash = sorted(set(kept) & set(OUTPUT_COLUMNS))
    if clash:
        return (f"field {clash[0]!r} has the name of an output column; rename it to keep it "
                "with --keep-columns"), {k: v for k, v in kept.items() if k not in OUTPUT_COLUMNS}
    return check_request({k: obj[k] for k in REQUEST_FIELDS if k in obj}), kept


def jsonl_rows(f, pos: Pos = (0, 0, 0), keep: bool = False
               ) -> Iterator[tuple[int, dict | str, Pos, dict]]:
    """Rows of the binary file ``f`` (positioned at ``pos``), one JSON object a line; blank
    lines are skipped, a line that is not a valid request yields its error message. With
    ``keep``, the fields other than the request's are the row's kept columns (else they stay
    in the request, which refuses them)."""
    offset, line, n = (*pos, 0)[:3] if len(pos) < 3 else pos
    for raw in f:
        offset += len(raw)
        line += 1
        if not raw.strip():
            continue
        n += 1
        if line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            obj = loads_json(raw)  # nesting bounded: a deep row is an error, not a RecursionError
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield n, f"not valid JSON ({e})", (offset, line, n), {}
            continue
        if keep and isinstance(obj, dict):
            req, kept = _split_kept(obj)
            yield n, req, (offset, line, n), kept
        else:
            yield n, check_request(obj), (offset, line, n), {}


def read_jsonl(f, pos: Pos = (0, 0, 0)) -> Iterator[tuple[int, dict | str, Pos]]:
    """``(record number, request or error message, position)`` of each row of ``f``
    (``jsonl_rows`` without kept columns)."""
    for n, req, at, _ in jsonl_rows(f, pos):
        yield n, req, at


def csv_header(f) -> tuple[list[str], Pos]:
    """The header of the binary CSV file ``f`` and the position after it."""
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
    return header, (lines.offset, lines.line, 0)


def kept_names(names: list[str]) -> list[str]:
    """The columns ``--keep-columns`` carries through: every input column but the request's,
    in input order; JobError if one has an output column's name or appears twice."""
    kept = [c for c in names if c not in REQUEST_FIELDS]
    clash = [c for c in kept if c in OUTPUT_COLUMNS]
    if clash:
        raise JobError(f"input column {clash[0]!r} has the name of an output column; rename it "
                       "to keep it with --keep-columns")
    twice = sorted({c for c in kept if kept.count(c) > 1})
    if twice:
        raise JobError(f"input column {twice[0]!r} appears twice; --keep-columns needs distinct "
                       "column names")
    return kept


def read_csv(f, pos: Pos, header: list[str], keep: bool = False
             ) -> Iterator[tuple[int, dict | str, Pos, dict]]:
    """CSV cells are text: an empty prompt means no prompt, an empty continuation none (score
    the context). Columns other than prompt/context/continuation are kept (as text) with
    ``keep``, else ignored."""
    f.seek(pos[0])
    lines = _Lines(f, pos[0], pos[1])
    n = pos[2]
    reader = csv.reader(lines)
    col = {name: header.index(name) for name in REQUEST_FIELDS if name in header}
    other = {name: header.index(name) for name in kept_names(header)} if keep else {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            n += 1
            yield n, f"not a valid CSV record ({e})", (lines.offset, lines.line, n), {}
            continue
        if not row:  # a blank line
            continue
        n += 1
        at = (lines.offset, lines.line, n)
        if len(row) != len(header):
            yield n, f"CSV row has {len(row)} fields, the header has {len(header)}", at, {}
            continue
        try:
            for cell in row:
                cell.encode("utf-8")
        except UnicodeEncodeError:
            yield n, "not valid UTF-8", at, {}
            continue
        req = {k: row[i] for k, i in col.items()}
        for k in ("prompt", "continuation"):
            if req.get(k) == "":
                req[k] = None
        yield n, req, at, {name: row[i] for name, i in other.items()}


def read_parquet(path: str, pos: Pos, batch_rows: int, keep: bool = False
                 ) -> Iterator[tuple[int, dict | str, Pos, dict]]:
    """Parquet columns prompt (string), context (string or list of integers), continuation;
    other columns are kept with ``keep``, else not read. Resuming skips whole row groups, then
    the rest row by row."""
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
    other = kept_names(names) if keep else []
    n = first
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=range(group, pf.num_row_groups),
                                 columns=cols + other):
        for obj in batch.to_pylist():
            n += 1
            if n > done:
                yield (n, check_request({c: obj[c] for c in cols}), (n, n, n),
                       {c: obj[c] for c in other})


def parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def read_rows(f, path: str, fmt: str, pos: Pos, batch_rows: int, keep: bool = False
              ) -> Iterator[tuple[int, dict | str, Pos, dict]]:
    """The rows of ``path`` (opened as ``f`` by ``open_input``) in format ``fmt`` from ``pos``
    on, with their kept columns if ``keep``. A CSV header is checked now; Parquet reads
    ``batch_rows`` rows at a time."""
    if fmt == "jsonl":
        if path != "-":
            f.seek(pos[0])
        return jsonl_rows(f, pos, keep)
    if fmt == "csv":
        header, header_end = csv_header(f)
        return read_csv(f, max(tuple(pos), header_end), header, keep)
    return read_parquet(path, pos, batch_rows, keep)


def kept_columns(f, path: str, fmt: str) -> list | None:
    """What ``--keep-columns`` adds to the output, known before the first row: ``[name]`` for
    CSV (text), ``[pyarrow.Field]`` for Parquet; None for JSONL (each row keeps its own)."""
    if fmt == "csv":
        header, _ = csv_header(f)
        return kept_names(header)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = pq.ParquetFile(path).schema_arrow
        return [schema.field(c) for c in kept_names(schema.names)]
    return None


class open_input:
    """``with open_input(path) as f``: the binary input file, or stdin for ``-`` (not closed)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.f = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        return self.f

    def __exit__(self, *exc):
        if self.path != "-":
            self.f.close()


# ------------------------------------------------------------------------------ rows out
def record(line: int, r: ScoreResult, kept: dict | None = None) -> dict:
    """The output record of record number ``line``, its kept columns after ``line``."""
    if r.error:
        return {"line": line, **(kept or {}), "error": r.error}
    return {"line": line, **(kept or {}), "logprob": r.logprob,
            "token_logprobs": r.token_logprobs, "tokens": r.tokens}


def output_columns(kept=()) -> list[str]:
    """The columns of CSV and Parquet output: ``line``, the kept columns, then the results."""
    return [OUTPUT_COLUMNS[0], *kept, *OUTPUT_COLUMNS[1:]]


def _cell(v) -> str:
    """A kept value as a CSV cell: text as is, null empty, anything else as JSON."""
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


class TextSink:
    """JSONL or CSV records appended to a binary file, fsynced after each write if ``fsync``;
    ``kept``: the kept columns' names (CSV)."""

    def __init__(self, fmt: str, f, fsync: bool, kept=()):
        self.fmt, self.f, self.fsync, self.kept = fmt, f, fsync, list(kept)

    def header(self) -> bytes:
        if self.fmt != "csv":
            return b""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(output_columns(self.kept))
        return buf.getvalue().encode()

    def encode(self, records: list[dict]) -> bytes:
        if self.fmt == "jsonl":
            out = []
            for r in records:
                try:
                    out.append((json.dumps(r, ensure_ascii=False, default=str) + "\n").encode())
                except UnicodeEncodeError:  # a lone surrogate from the input: escape it
                    out.append((json.dumps(r, default=str) + "\n").encode())
            return b"".join(out)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in records:
            err = r.get("error")
            w.writerow([r["line"], *(_cell(r.get(c)) for c in self.kept),
                        "" if err else repr(r["logprob"]),
                        "" if err else json.dumps(r["token_logprobs"]),
                        "" if err else json.dumps(r["tokens"]), err or ""])
        return buf.getvalue().encode("utf-8", "backslashreplace")

    def write(self, data: bytes) -> int:
        """Write ``data``; with ``fsync``, return the file's size after it (else 0). An OSError
        (a full disk) names the file."""
        try:
            self.f.write(data)
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())
        except OSError as e:
            if e.filename is None:
                e.filename = getattr(self.f, "name", None)
            raise
        return self.f.tell() if self.fsync else 0


class open_text_sink:
    """``with open_text_sink(path, fmt) as sink``: a ``TextSink`` on ``path`` (``-``: stdout,
    flushed, not closed), truncated, or with ``append`` appended to and fsynced after each write."""

    def __init__(self, path: str | Path, fmt: str, append: bool = False, kept=()):
        self.path, self.fmt, self.append, self.kept = str(path), fmt, append, list(kept)

    def __enter__(self) -> TextSink:
        if self.path == "-":
            self.f = sys.stdout.buffer
        else:
            self.f = open(self.path, "ab" if self.append else "wb")
        return TextSink(self.fmt, self.f, fsync=self.append, kept=self.kept)

    def __exit__(self, *exc):
        if self.f is sys.stdout.buffer:
            self.f.flush()
        else:
            self.f.close()


def parquet_schema(kept=()):
    """The pyarrow schema of Parquet output: ``line``, the kept columns (``pyarrow.Field``s, or
    names of text columns), then the results (``OUTPUT_COLUMNS``)."""
    import pyarrow as pa

    kept = [k if isinstance(k, pa.Field) else pa.field(k, pa.string()) for k in kept]
    return pa.schema([pa.field("line", pa.int64()), *kept, pa.field("logprob", pa.float64()),
                      pa.field("token_logprobs", pa.list_(pa.float64())),
                      pa.field("tokens", pa.list_(pa.int64())), pa.field("error", pa.string())])


def write_parquet_part(records: list[dict], path: Path, schema=None) -> None:
    """``records`` as one Parquet file at ``path`` (``schema``: ``parquet_schema()`` unless
    given): written under a temporary name, fsynced, then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema() if schema is None else schema
    rows = [{k: r.get(k) for k in schema.names} for r in records]
    for r in rows:
        if r["error"] is not None:  # escape lone surrogates (invalid UTF-8 in the input)
            r["error"] = r["error"].encode("utf-8", "backslashreplace").decode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_parquet_parts(parts: list[Path], out: Path) -> None:
    """Copy the Parquet files ``parts`` in order into ``out``, one row group per part, with the
    parts' schema (written under a temporary name, fsynced, then renamed)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(parts[0]) if parts else parquet_schema()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        with pq.ParquetWriter(f, schema) as w:
            for part in parts:
                w.write_table(pq.read_table(part))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
