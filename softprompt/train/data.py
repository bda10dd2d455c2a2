"""Training rows: read from JSONL, CSV or Parquet and turned into (context, continuation) pairs.

Two row shapes:

- ``{context, continuation}``: the prompt is trained to make ``continuation`` likely after
  ``context`` (a missing or empty continuation trains on every context token, the first one
  predicted by the last virtual token, as ``Runtime.score`` scores a context alone);
- ``{text, label}`` with a label set (``--labels``): the context is ``template`` with ``{text}``
  replaced, the continuation is ``label_prefix + label`` (``" positive"``), and evaluation is
  classification over the label set (``Runtime.classify``).

JSONL goes through the batch job's reader (``softprompt.jobs.read_jsonl``: line numbers, BOM,
one-line errors); CSV and Parquet are read whole here, because the job's readers keep only the
scoring columns (prompt, context, continuation) and a ``{text, label}`` file has none of them.
Every problem is a ``TrainError`` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from softprompt.jobs import JobError, detect_format, read_jsonl


class TrainError(ValueError):
    """A training run that cannot start or resume; the message says what is wrong."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation row: ``context`` then ``continuation`` (None: score the
    context itself); ``label`` is the index into the label set, or None without one."""

    context: str
    continuation: str | None
    label: int | None = None


@dataclass(frozen=True)
class Task:
    """How rows become examples.

    labels: the label names (``None``: rows are ``{context, continuation}``; an empty tuple:
        take them from the training rows, in order of first appearance).
    template: the context of a ``{text, label}`` row, ``{text}`` standing for the text.
    label_prefix: put before each label to make its continuation (a space by default, so the
        label is its own word after the context).
    """

    labels: tuple[str, ...] | None = None
    template: str = "{text}"
    label_prefix: str = " "

    @property
    def classify(self) -> bool:
        return self.labels is not None

    def continuations(self) -> list[str]:
        """The label continuations ``Runtime.classify`` scores, in label order."""
        return [self.label_prefix + lab for lab in self.labels or ()]


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line, row) of every row of a JSONL, CSV or Parquet file (by extension); CSV cells are
    text, and line numbers count the header (line 1) as the batch job's do."""
    path = str(path)
    try:
        fmt = detect_format(path)
    except JobError as e:
        raise TrainError(str(e)) from None
    if not Path(path).is_file():
        raise TrainError(f"data file not found: {path}")
    if fmt == "jsonl":
        rows = []
        with open(path, "rb") as f:
            for line, obj, _ in read_jsonl(f):
                if isinstance(obj, str):
                    raise TrainError(f"{path}: line {line}: {obj}")
                rows.append((line, obj))
        return rows
    if fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, dict(row)) for row in reader]
    import pyarrow.parquet as pq

    return list(enumerate(pq.read_table(path).to_pylist(), start=1))


def examples(path: str | Path, task: Task) -> tuple[list[Example], Task]:
    """The examples of ``path`` under ``task``, and the task with its label set filled in (from
    these rows, when ``task.labels`` is empty)."""
    rows = read_rows(path)
    if not rows:
        raise TrainError(f"{path}: no rows")
    if task.classify:
        if not task.labels:
            seen: dict[str, None] = {}
            for line, row in rows:
                seen.setdefault(_field(path, line, row, "label"), None)
            task = Task(tuple(seen), task.template, task.label_prefix)
        if len(task.labels) < 2 or len(set(task.labels)) != len(task.labels):
            raise TrainError(f"--labels needs at least 2 distinct labels, got {list(task.labels)}")
        out = []
        for line, row in rows:
            text, label = _field(path, line, row, "text"), _field(path, line, row, "label")
            if label not in task.labels:
                raise TrainError(f"{path}: line {line}: label {label!r} is not one of "
                                 f"{list(task.labels)}")
            try:
                context = task.template.format(text=text)
            except (KeyError, IndexError, ValueError) as e:
                raise TrainError(f"--template {task.template!r} cannot be formatted with {{text}} "
                                 f"alone ({type(e).__name__}: {e})") from None
            i = task.labels.index(label)
            out.append(Example(context, task.continuations()[i], i))
        return out, task
    out = []
    for line, row in rows:
        if "context" not in row and "text" in row:
            raise TrainError(f"{path}: line {line}: a {{text, label}} row: pass --labels (and "
                             "--template) to train a classifier, or give {context, continuation}")
        context = _field(path, line, row, "context")
        cont = row.get("continuation")
        if cont is not None and not isinstance(cont, str):
            raise TrainError(f"{path}: line {line}: continuation must be a string, got "
                             f"{type(cont).__name__}")
        out.append(Example(context, cont or None))
    return out, task


def _field(path, line: int, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise TrainError(f"{path}: line {line}: {key!r} must be a non-empty string, got "
                         f"{'nothing' if value is None else repr(value)[:60]}")
    return value


def file_digest(path: str | Path) -> str:
    """sha256 of a data file (a resumed run must train on the same data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
