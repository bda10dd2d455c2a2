"""The batch-scoring job driver: ``score_file`` reads a chunk, scores it, writes its records and
checkpoints, chunk after chunk (the ``softprompt.jobs`` docstring has the whole story)."""

from __future__ import annotations

import errno
import itertools
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

from softprompt.jobs.checkpoint import (finish, job_spec, open_checkpoint, partial_path, parts_dir,
                                        save_checkpoint)
from softprompt.jobs.errors import JobError
from softprompt.jobs.formats import (detect_format, kept_columns, open_input, open_text_sink,
                                     parquet_rows, parquet_schema, read_rows, record,
                                     write_parquet_part)
from softprompt.runtime.requests import ScoreResult


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


def runtime_identity(rt) -> dict:
    """What makes a Runtime's scores what they are: model, backend, weights, prompts, batching."""
    be = rt.backend
    return {"engine": "local", "model": rt.model_name, "backend": be.name,
            "fingerprint": be.fingerprint, "dtype": getattr(be, "dtype_name", None),
            "prompts": {n: p.digest for n, p in sorted(rt.prompts.items())},
            "max_batch": rt.max_batch, "max_batch_tokens": rt.max_batch_tokens}


def _os_error(e: OSError, input: str, output: str, resumable: bool) -> JobError:
    """One line for a failed read or write: which file, what the system said, what to do."""
    where = e.filename or (output if output != "-" else "stdout")  # write() names no file
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        then = ("every chunk written before is kept: free space, then rerun the same command "
                "with --resume to continue" if resumable else "free space, then run it again")
        return JobError(f"no space left on the device writing {where} ({e.strerror}); {then}")
    verb = "read" if str(where) == str(input) else "write"
    return JobError(f"cannot {verb} {where}: {e.strerror or e}")


def _check_paths(input: str, output: str) -> None:
    """JobError before any work for an input that cannot be read or an output that cannot be
    written (a missing or read-only directory, a directory in the output's place)."""
    if input != "-" and not Path(input).is_file():
        why = "it is a directory" if Path(input).is_dir() else "no such file"
        raise JobError(f"cannot read {input}: {why}")
    if output == "-":
        return
    out = Path(output)
    parent = out.parent
    if not parent.is_dir():
        raise JobError(f"cannot write {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JobError(f"cannot write {output}: directory {parent} is not writable")
    if out.is_dir():
        raise JobError(f"cannot write {output}: it is a directory")


def score_file(rt, input: str, output: str, *, chunk_rows: int = 1000, resume: bool = False,
               overwrite: bool = False, input_format: str | None = None,
               output_format: str | None = None, progress: bool = False,
               keep_columns: bool = False,
               scorer: Callable[[list], list[ScoreResult]] | None = None,
               identity: dict | None = None, on_chunk: Callable[[dict], None] | None = None) -> dict:
    """Score ``input`` into ``output`` chunk by chunk (``softprompt.jobs`` docstring: formats,
    resume).

    Args:
        rt: a Runtime (its prompts registered), or None when ``scorer`` and ``identity`` are given.
        input / output: file paths; ``"-"`` is stdin / stdout (JSONL, no checkpoint, no resume).
        chunk_rows: rows per chunk: per score call, per fsync and checkpoint.
        resume: continue from ``output``'s checkpoint if there is one (else start).
        overwrite: discard an existing output and checkpoint instead of refusing.
        input_format / output_format: ``jsonl``, ``csv`` or ``parquet`` (default: by extension).
        progress: a tqdm bar on stderr (rows/s; ETA once the input's size is known).
        keep_columns: carry the input's other columns (an id, ...) into each record, after
            ``line`` (JSONL input: each row's other fields; then the output must be JSONL).
        scorer: ``requests (dicts or error strings) -> ScoreResults`` (default: score_chunk on rt).
        identity: what the checkpoint records of the model (default: runtime_identity(rt)).
        on_chunk: called with the checkpoint state after each chunk is durable.
    Returns: {"rows", "errors", "chunks", "seconds"} for the rows this call scored, and
        "already_done": True (with "rows_done", the job's rows) when ``output`` was this job's,
        complete already: nothing is scored again.
    Raises JobError (one line) for anything that stops the job: bad options, a checkpoint of
    another job, an unreadable input, an unwritable output or a full disk (``resume`` then
    continues after the last chunk written).
    """
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise JobError(f"chunk_rows must be an integer >= 1, got {chunk_rows!r}")
    fin, fout = detect_format(input, input_format), detect_format(output, output_format)
    if input == "-" and fin != "jsonl":
        raise JobError(f"stdin input must be JSONL, got --input-format {fin}")
    if output == "-" and fout == "parquet":
        raise JobError("Parquet cannot be written to stdout: give --output FILE.parquet")
    if keep_columns and fin == "jsonl" and fout != "jsonl":
        raise JobError(f"--keep-columns with JSONL input needs JSONL output (each row keeps its "
                       f"own fields; {fout} needs its columns up front), got {fout}")
    _check_paths(input, output)
    if scorer is None:
        scorer = lambda reqs: score_chunk(rt, reqs)  # noqa: E731
    if identity is None:
        identity = runtime_identity(rt)
    resumable = output != "-" and input != "-"
    try:
        return _score_file(input, output, fin, fout, chunk_rows, resume, overwrite, progress,
                           keep_columns, scorer, identity, on_chunk)
    except OSError as e:
        raise _os_error(e, input, output, resumable) from None


def _score_file(input, output, fin, fout, chunk_rows, resume, overwrite, progress, keep_columns,
                scorer, identity, on_chunk) -> dict:
    t0 = time.perf_counter()
    stats = {"rows": 0, "errors": 0, "chunks": 0, "already_done": False}
    out_path = Path(output)

    if output == "-" or input == "-":
        if resume:
            raise JobError("--resume needs an input file and an output file (not stdin/stdout)")
        if fout == "parquet":
            raise JobError("Parquet output needs an input file (not stdin)")
        if output != "-" and out_path.exists() and not overwrite:
            raise JobError(f"{output} already exists: pass --overwrite to replace it")
        state = None
    else:
        job = job_spec(input, fin, fout, chunk_rows, identity, keep_columns)
        state = open_checkpoint(out_path, job, resume, overwrite)
        if state["stage"] != "scoring":  # killed while finishing, or finished already
            done = state["stage"] == "done"
            finish(out_path, fout, state)
            return {**stats, "already_done": done, "rows_done": state["rows_done"],
                    "seconds": time.perf_counter() - t0}

    pos = (0, 0, 0) if state is None else tuple(state["position"])
    total = None
    if fin == "parquet":
        total = parquet_rows(input)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=0 if state is None else state["rows_done"], unit="row",
               desc="scoring", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    kept: list = []
    if keep_columns and fin != "jsonl":
        with open_input(input) as f:
            kept = kept_columns(f, input, fin) or []
    names = [k if isinstance(k, str) else k.name for k in kept]
    schema = parquet_schema(kept) if fout == "parquet" else None
    if state is None:  # stdout or a file, no checkpoint
        sink_cm = open_text_sink(output, fout, kept=names)
    elif fout == "parquet":  # one part file per chunk
        sink_cm = nullcontext(None)
    else:
        sink_cm = open_text_sink(partial_path(out_path), fout, append=True, kept=names)
    with bar, open_input(input) as f, sink_cm as sink:
        rows = read_rows(f, input, fin, pos, min(chunk_rows, 65536), keep_columns)
        size = None if input == "-" or fin == "parquet" else os.path.getsize(input)
        if state is not None and fout != "parquet" and state["output_bytes"] == 0:
            state["output_bytes"] = sink.write(sink.header())
        elif state is None:
            sink.write(sink.header())
        while True:
            chunk = list(itertools.islice(rows, chunk_rows))
            if not chunk:
                break
            results = scorer([req for _, req, _, _ in chunk])
            records = [record(n, r, extra) for (n, _, _, extra), r in zip(chunk, results, strict=True)]
            stats["errors"] += sum("error" in r for r in records)
            if state is None:
                sink.write(sink.encode(records))
            elif fout == "parquet":
                write_parquet_part(records, parts_dir(out_path) / f"part-{state['chunks_done']:08d}.parquet",
                                   schema)
            else:
                state["output_bytes"] = sink.write(sink.encode(records))
            stats["rows"] += len(chunk)
            stats["chunks"] += 1
            pos = chunk[-1][2]
            if state is not None:
                state.update(rows_done=state["rows_done"] + len(chunk),
                             chunks_done=state["chunks_done"] + 1, position=list(pos))
                save_checkpoint(out_path, state)
                if on_chunk:
                    on_chunk(dict(state))
            bar.update(len(chunk))
            if size and pos[0]:  # rows so far x bytes in all / bytes so far
                bar.total = max(bar.n, round(bar.n * size / pos[0]))
                bar.refresh()
        bar.total = bar.n
    if state is not None:
        finish(out_path, fout, state)
    return {**stats, "seconds": time.perf_counter() - t0}
