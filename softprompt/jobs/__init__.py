"""Streaming, resumable batch scoring: the engine of ``softprompt score``.

    from softprompt.jobs import score_file
    summary = score_file(rt, "rows.parquet", "scores.parquet", chunk_rows=5000, resume=True)

Rows ``{prompt, context, continuation}`` are read from JSONL, CSV or Parquet in chunks of
``chunk_rows``; each chunk is scored with one ``Runtime.score(..., errors="return")`` call and its
records are written in input order before the next chunk is read, so memory holds one chunk
whatever the input size. Records (JSONL; the same columns in CSV and Parquet)::

    {"line": n, "logprob": float, "token_logprobs": [float], "tokens": [int]}
    {"line": n, "error": "what is wrong"}

``line`` is the row's 1-based record number in every format: blank lines and the CSV header
are not records, and a CSV record whose cells hold newlines is still one record, so record n
is the n-th row a dataframe library reads from the input. With ``keep_columns``
(``--keep-columns``) the input's other columns (an id...) follow ``line`` in each record, as
``softprompt.ray.score_dataset`` keeps them. A bad row (not JSON, not an object, a field of the
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
rerun of a finished job, with or without ``resume``, says it is complete (``already_done`` in
the summary) and scores nothing (``overwrite`` scores it again), and a checkpoint that does not
match the input, model, prompts or options is refused with the fields that differ. A failed
read or write (a missing directory, a full disk) is a one-line ``JobError``; after a full disk,
``resume`` continues from the last chunk written.

Modules, one concern each: ``formats`` (readers and writers of JSONL, CSV, Parquet),
``checkpoint`` (the checkpoint, resume and finishing), ``run`` (the job driver).
"""

from softprompt.jobs.errors import JobError
from softprompt.jobs.formats import (FORMATS, OUTPUT_COLUMNS, REQUEST_FIELDS, check_request,
                                     detect_format, jsonl_rows, read_jsonl, record)
from softprompt.jobs.run import runtime_identity, score_chunk, score_file

__all__ = ["FORMATS", "OUTPUT_COLUMNS", "REQUEST_FIELDS", "JobError", "check_request",
           "detect_format", "jsonl_rows", "read_jsonl", "record", "runtime_identity",
           "score_chunk", "score_file"]
