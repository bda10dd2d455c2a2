"""Checkpoints of the batch-scoring job: what lives beside an output file ``out`` until the job
ends, how a rerun resumes from it, and how the job finishes.

- ``out.partial`` (JSONL, CSV): each complete chunk is appended, then fsynced;
  ``out.parts/`` (Parquet, which cannot be appended): one file per chunk;
- ``out.ckpt.json``: what the job is (``job_spec``) and how far it got (rows, chunks, output
  bytes, input position), replaced atomically after each chunk (``save_checkpoint``).

``open_checkpoint`` starts a job or, resuming, checks the checkpoint matches the job and drops
whatever a killed run wrote after it; a job found complete (the same job, scored to the end) is
returned as is, with or without resume; ``finish`` makes ``out`` and marks the checkpoint done
(idempotent, so a crash while finishing is finished by the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from softprompt.jobs.errors import JobError
from softprompt.jobs.formats import merge_parquet_parts
from softprompt.models.files import loads_json

# 2: ``line`` is the record number in every format (was the physical line in JSONL and CSV),
# positions carry the records consumed, and the job records ``keep_columns``.
CHECKPOINT_VERSION = 2
MAX_CHECKPOINT_BYTES = 16 << 20
_HEAD_BYTES = 1 << 20  # the input's identity: its size and the sha256 of its first MiB


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt.json")


def partial_path(out: Path) -> Path:
    """Where JSONL and CSV output grows until the job ends."""
    return out.with_name(out.name + ".partial")


def parts_dir(out: Path) -> Path:
    """Where Parquet output grows, one file per chunk, until the job ends."""
    return out.with_name(out.name + ".parts")


def input_identity(path: str) -> dict:
    """The input as a checkpoint knows it: its size and the sha256 of its first MiB (its path
    is recorded but may change)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
    return {"path": str(Path(path).resolve()), "size": os.path.getsize(path),
            "head_sha256": h.hexdigest()}


def job_spec(input: str, input_format: str, output_format: str, chunk_rows: int,
             model: dict, keep_columns: bool = False) -> dict:
    """What makes a job the same job: a resumed run must match every field."""
    return {"version": CHECKPOINT_VERSION, "input": input_identity(input),
            "input_format": input_format, "output_format": output_format,
            "chunk_rows": chunk_rows, "keep_columns": keep_columns, "model": model}


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


def save_checkpoint(out: Path, state: dict) -> None:
    """Replace ``out``'s checkpoint by ``state`` atomically (temporary file + ``os.replace``)."""
    _write_json_atomic(checkpoint_path(out), state)


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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _read_checkpoint(ck: Path, job: dict) -> tuple[dict, dict]:
    """(the checkpoint's state, its job fields); JobError if it is unreadable."""
    try:
        if ck.stat().st_size > MAX_CHECKPOINT_BYTES:
            raise ValueError(f"{ck.stat().st_size} bytes, above {MAX_CHECKPOINT_BYTES}")
        state = loads_json(ck.read_bytes().decode("utf-8"))  # bounded nesting
        old = {k: state[k] for k in job}
        if state.get("stage") not in ("scoring", "finishing", "done"):
            raise ValueError(f"unknown stage {state.get('stage')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise JobError(f"checkpoint {ck} is unreadable ({e}); pass --overwrite to start "
                       "again") from None
    return state, old


def complete(out: Path, job: dict) -> dict | None:
    """The checkpoint's state if ``out`` is this very job, scored to its end (``finishing`` or
    ``done``), else None: rerunning a finished job is not an error, it is already done."""
    ck = checkpoint_path(out)
    if not ck.exists():
        return None
    try:
        state, old = _read_checkpoint(ck, job)
    except JobError:
        return None
    if _differences(old, job) or state["stage"] == "scoring":
        return None
    if state["stage"] == "done" and not out.exists():
        return None
    return state


def open_checkpoint(out: Path, job: dict, resume: bool, overwrite: bool) -> dict:
    """The state to continue from: a fresh one, or the checkpoint's after checking it matches;
    the checkpoint's state, ``finishing`` or ``done``, for a job already scored to its end."""
    ck, companions = checkpoint_path(out), (partial_path(out), parts_dir(out))
    if not overwrite and (state := complete(out, job)) is not None:
        return state
    if ck.exists() and resume and not overwrite:
        state, old = _read_checkpoint(ck, job)
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
        parts_dir(out).mkdir()
    else:
        partial_path(out).touch()
    return state


def _truncate_to_checkpoint(out: Path, fmt: str, state: dict) -> None:
    """Drop whatever the killed run wrote after its last checkpoint."""
    if fmt == "parquet":
        parts = parts_dir(out)
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
    partial, n = partial_path(out), state["output_bytes"]
    if not partial.exists() and n == 0:
        partial.touch()
    if not partial.exists() or partial.stat().st_size < n:
        raise JobError(f"{partial} is shorter than the {n} bytes its checkpoint recorded: the "
                       "output was changed outside this job; pass --overwrite to start again")
    with open(partial, "r+b") as f:
        f.truncate(n)
        os.fsync(f.fileno())


def finish(out: Path, fmt: str, state: dict) -> None:
    """Make ``out`` complete and mark the checkpoint done (idempotent: a crash at any step is
    finished by the next run). A job still ``scoring`` is first checkpointed as ``finishing``."""
    if state["stage"] == "scoring":
        state["stage"] = "finishing"
        save_checkpoint(out, state)
    if state["stage"] == "finishing":
        if fmt == "parquet":  # one row group per chunk
            merge_parquet_parts(sorted(parts_dir(out).glob("part-*.parquet")), out)
        elif partial_path(out).exists():
            os.replace(partial_path(out), out)
        if not out.exists():
            raise JobError(f"{out} and its partial output are both missing; pass --overwrite "
                           "to start again")
        _fsync_dir(out.parent)
        state["stage"] = "done"
        save_checkpoint(out, state)
    if not out.exists():
        raise JobError(f"{out} is missing although its checkpoint says the job finished; pass "
                       "--overwrite to score again")
    _remove(parts_dir(out))
