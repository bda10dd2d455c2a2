"""Rows in and records out: the JSONL, CSV and Parquet formats of the batch-scoring job.

Readers yield ``(line, request dict or error message, position after the row)``; a position
(``Pos``) is (input byte offset, lines consumed) for text, (rows consumed, rows consumed) for
Parquet, so the job can checkpoint exactly where a row ends and a reader can start there again.
Writers turn ``ScoreResult``s into records::

    {"line": n, "logprob": float, "token_logprobs": [float], "tokens": [int]}
    {"line": n, "error": "what is wrong"}

(JSONL; the same columns, ``OUTPUT_COLUMNS``, in CSV and Parquet).
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
from softprompt.runtime.requests import ScoreResult

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
REQUEST_FIELDS = ("prompt", "context", "continuation")
OUTPUT_COLUMNS = ("line", "logprob", "token_logprobs", "tokens", "error")

# A reader yields (line, request dict or error message, position after the row); a position
# is (input byte offset, lines consumed) for text, (rows consumed, rows consumed) for Parquet.
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


def read_jsonl(f, pos: Pos = (0, 0)) -> Iterator[tuple[int, dict | str, Pos]]:
    """Rows of the binary file ``f`` (positioned at ``pos``), one JSON object a line; blank
    lines are skipped, a line that is not a valid request yields its error message."""
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
    return header, (lines.offset, lines.line)


def read_csv(f, pos: Pos, header: list[str]) -> Iterator[tuple[int, dict | str, Pos]]:
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


def read_parquet(path: str, pos: Pos, batch_rows: int) -> Iterator[tuple[int, dict | str, Pos]]:
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


def read_rows(f, path: str, fmt: str, pos: Pos,
              batch_rows: int) -> Iterator[tuple[int, dict | str, Pos]]:
    """The rows of ``path`` (opened as ``f`` by ``open_input``) in format ``fmt`` from ``pos``
    on. A CSV header is checked now; Parquet reads ``batch_rows`` rows at a time."""
    if fmt == "jsonl":
        if path != "-":
            f.seek(pos[0])
        return read_jsonl(f, pos)
    if fmt == "csv":
        header, header_end = csv_header(f)
        return read_csv(f, max(pos, header_end), header)
    return read_parquet(path, pos, batch_rows)


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
def record(line: int, r: ScoreResult) -> dict:
    """The output record of the row at ``line``."""
    if r.error:
        return {"line": line, "error": r.error}
    return {"line": line, "logprob": r.logprob, "token_logprobs": r.token_logprobs,
            "tokens": r.tokens}


class TextSink:
    """JSONL or CSV records appended to a binary file, fsynced after each write if ``fsync``."""

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
        """Write ``data``; with ``fsync``, return the file's size after it (else 0)."""
        self.f.write(data)
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())
        return self.f.tell() if self.fsync else 0


class open_text_sink:
    """``with open_text_sink(path, fmt) as sink``: a ``TextSink`` on ``path`` (``-``: stdout,
    flushed, not closed), truncated, or with ``append`` appended to and fsynced after each write."""

    def __init__(self, path: str | Path, fmt: str, append: bool = False):
        self.path, self.fmt, self.append = str(path), fmt, append

    def __enter__(self) -> TextSink:
        if self.path == "-":
            self.f = sys.stdout.buffer
        else:
            self.f = open(self.path, "ab" if self.append else "wb")
        return TextSink(self.fmt, self.f, fsync=self.append)

    def __exit__(self, *exc):
        if self.f is sys.stdout.buffer:
            self.f.flush()
        else:
            self.f.close()


def parquet_schema():
    """The pyarrow schema of Parquet output (``OUTPUT_COLUMNS``)."""
    import pyarrow as pa

    return pa.schema([("line", pa.int64()), ("logprob", pa.float64()),
                      ("token_logprobs", pa.list_(pa.float64())), ("tokens", pa.list_(pa.int64())),
                      ("error", pa.string())])


def write_parquet_part(records: list[dict], path: Path) -> None:
    """``records`` as one Parquet file at ``path``: written under a temporary name, fsynced,
    then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: r.get(k) for k in OUTPUT_COLUMNS} for r in records]
    for r in rows:
        if r["error"] is not None:  # escape lone surrogates (invalid UTF-8 in the input)
            r["error"] = r["error"].encode("utf-8", "backslashreplace").decode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_parquet_parts(parts: list[Path], out: Path) -> None:
    """Copy the Parquet files ``parts`` in order into ``out``, one row group per part (written
    under a temporary name, fsynced, then renamed)."""
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        with pq.ParquetWriter(f, parquet_schema()) as w:
            for part in parts:
                w.write_table(pq.read_table(part))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
