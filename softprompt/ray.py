"""Score on a Ray cluster: Ray Data ``map_batches`` over a pool of actors, one Runtime each.

    import ray, softprompt.ray
    ds = ray.data.read_parquet("s3://bucket/rows/")          # rows {prompt, context, continuation}
    out = softprompt.ray.score_dataset(ds, "bundle/", {"sentiment": "/shared/prompts/sentiment"},
                                       num_actors=8, num_gpus_per_actor=0)
    out.write_parquet("s3://bucket/scored/")                 # the same rows + logprob, error

The model is resolved once, on the driver: a model that is not a bundle is exported there
(backend ``onnx``) and every actor loads the same bundle directory, so actors never export.
Each actor loads its Runtime and prompts once, in ``__init__``, and scores the batches it is
given. ``score_file`` (``softprompt score --ray``) keeps one pool of such actors for a whole
streaming job. The bundle and prompt paths must be readable from every node (a shared filesystem, or
the same path on each machine). Ray is imported lazily: ``pip install "softprompt-runtime[ray]"``.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Mapping

from softprompt.jobs import REQUEST_FIELDS, JobError, check_request, score_chunk
from softprompt.jobs import score_file as _score_file
from softprompt.runtime.requests import ScoreResult


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError('softprompt.ray needs Ray Data: pip install "softprompt-runtime[ray]"') from None
    return ray


def resolve_model(model, backend: str = "auto", num_gpus_per_actor: float = 0) -> tuple[str, str]:
    """(model path the actors load, backend), exporting a non-bundle model once here for onnx.

    ``auto`` is torch when actors get GPUs and the model is not a bundle, else onnx."""
    is_bundle = (Path(str(model)) / "bundle.json").is_file()
    if backend == "auto":
        backend = "torch" if num_gpus_per_actor and not is_bundle else "onnx"
    if backend == "onnx" and not is_bundle:
        from softprompt.export import bundle_for

        model = bundle_for(model)
    p = Path(str(model))
    return (str(p.resolve()) if p.exists() else str(model)), backend


class RuntimeScorer:
    """The callable class Ray Data runs in each actor: one Runtime, loaded in ``__init__``.

    ``__call__`` takes a pyarrow batch with columns prompt (optional), context, continuation
    (optional) and returns it with ``logprob`` (float64, null on error) and ``error`` (string)
    added, plus ``token_logprobs`` and ``tokens`` with ``details``. Other columns pass through.
    """

    def __init__(self, model: str, backend: str, prompts: Mapping[str, object],
                 runtime_kwargs: Mapping | None = None, details: bool = False):
        from softprompt.runtime.api import Runtime

        self.rt = Runtime.load(model, backend=backend, **dict(runtime_kwargs or {}))
        for name, source in prompts.items():
            self.rt.add_prompt(name, source)
        self.details = details

    def score_rows(self, rows: list) -> list:
        """Request dicts (or error strings) -> one ScoreResult each (the ``score_file`` job's
        actor call; Ray serialises both ways)."""
        return score_chunk(self.rt, [check_request(r) for r in rows])

    def __call__(self, batch):
        import pyarrow as pa

        cols = [c for c in REQUEST_FIELDS if c in batch.column_names]
        results = self.score_rows(batch.select(cols).to_pylist())
        new = {"logprob": pa.array([None if r.error else r.logprob for r in results], pa.float64()),
               "error": pa.array([r.error for r in results], pa.string())}
        if self.details:
            new["token_logprobs"] = pa.array([None if r.error else r.token_logprobs for r in results],
                                             pa.list_(pa.float64()))
            new["tokens"] = pa.array([None if r.error else r.tokens for r in results],
                                     pa.list_(pa.int64()))
        batch = batch.drop_columns([c for c in new if c in batch.column_names])
        for name, col in new.items():
            batch = batch.append_column(name, col)
        return batch


def _check_scorer_cls(scorer_cls) -> None:
    if not (isinstance(scorer_cls, type) and issubclass(scorer_cls, RuntimeScorer)):
        raise TypeError(f"scorer_cls must be RuntimeScorer or a subclass of it, got {scorer_cls!r}")


def score_dataset(ds, model, prompts: Mapping[str, object], *, backend: str = "auto",
                  batch_size: int | None = 256, num_actors=2, num_gpus_per_actor: float = 0,
                  details: bool = False, runtime_kwargs: Mapping | None = None,
                  max_restarts: int = 4, max_task_retries: int = 4,
                  scorer_cls: type[RuntimeScorer] = RuntimeScorer, **ray_remote_args):
    """Rows ``{prompt, context, continuation}`` of ``ds`` -> the same rows + ``logprob``, ``error``.

    Args:
        ds: a ``ray.data.Dataset``; context is text or a list of token ids, prompt a registered
            name or null, continuation text, ids or null. Other columns are kept.
        model: a bundle directory, or any model ``Runtime.load`` takes (exported here, once, for
            backend onnx). Its path must be readable on every node.
        prompts: ``{name: adapter dir / .safetensors / .npy / array}`` loaded in every actor.
        backend: ``onnx``, ``torch``, ``reference`` or ``auto`` (torch with GPUs, else onnx).
        batch_size: rows per actor call (None: one call per block).
        num_actors: pool size, or a ``ray.data.ActorPoolStrategy`` (e.g. autoscaling bounds).
        num_gpus_per_actor: GPUs each actor reserves (torch backend on CUDA; ORT's CUDA
            provider through ``runtime_kwargs={"providers": [...]}``).
        details: also return ``token_logprobs`` and ``tokens``.
        runtime_kwargs: extra ``Runtime.load`` arguments (max_batch, dtype, ...).
        max_restarts / max_task_retries: an actor that dies is restarted and its batch retried,
            so no row is lost or repeated.
        scorer_cls: the actor class: ``RuntimeScorer`` or a subclass of it (e.g. one that
            changes ``score_rows``), constructed with ``RuntimeScorer``'s arguments.
        ray_remote_args: passed to ``map_batches`` (num_cpus, memory, runtime_env, ...).
    Returns the lazy mapped ``ray.data.Dataset`` (row order follows Ray's ``preserve_order``).
    """
    ray = _ray()
    _check_scorer_cls(scorer_cls)
    model, backend = resolve_model(model, backend, num_gpus_per_actor)
    if isinstance(num_actors, int):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1 or an ActorPoolStrategy, got {num_actors}")
        compute = ray.data.ActorPoolStrategy(size=num_actors)
    else:
        compute = num_actors
    return ds.map_batches(
        scorer_cls, batch_format="pyarrow", batch_size=batch_size, compute=compute,
        fn_constructor_kwargs=dict(model=model, backend=backend, prompts=dict(prompts),
                                   runtime_kwargs=dict(runtime_kwargs or {}), details=details),
        num_gpus=num_gpus_per_actor or None, max_restarts=max_restarts,
        max_task_retries=max_task_retries, **ray_remote_args)


def prompt_identity(source) -> str:
    """What a prompt source stands for, in a job's identity (a resumed job must score with the
    same prompts): its content digest; a composed prompt's parts in order (text by its text), a
    multitask adapter's every task."""
    from softprompt.runtime.adapters import load_adapter
    from softprompt.runtime.prompts import SoftPrompt

    if isinstance(source, (list, tuple)):
        return "composed[" + ",".join(f"text:{p!r}" if isinstance(p, str) else prompt_identity(p)
                                      for p in source) + "]"
    if isinstance(source, (str, PathLike)) and Path(source).is_dir():
        return ",".join(p.digest for p in load_adapter(Path(source), "prompt"))
    return SoftPrompt.load(source).digest


def score_file(input: str, output: str, model, prompts: Mapping[str, object], *,
               address: str | None = None, backend: str = "auto", num_actors: int = 2,
               num_gpus_per_actor: float = 0, batch_size: int = 256,
               runtime_kwargs: Mapping | None = None, max_restarts: int = 4,
               max_task_retries: int = 4, actor_options: Mapping | None = None,
               scorer_cls: type[RuntimeScorer] = RuntimeScorer, **job) -> dict:
    """``softprompt score --ray``: the streaming, resumable job of softprompt.jobs with each
    chunk scored by a pool of ``num_actors`` Ray actors (``RuntimeScorer``), started once, at
    the first chunk with a valid row, and kept for the whole job, so every actor loads its
    Runtime and prompts once. The driver reads and writes the files (so the input need not be
    on the cluster) and keeps one chunk in memory; each chunk is cut into calls of
    ``batch_size`` rows, handed to the actors in order, so a resumed chunk is batched as it was
    first. An actor that dies is restarted and its call retried (``max_restarts``,
    ``max_task_retries``), so no row is lost or repeated. actor_options: more
    ``ActorClass.options`` (num_cpus, memory, runtime_env, ...). scorer_cls: the actor class,
    ``RuntimeScorer`` or a subclass of it (its ``score_rows`` is called; a subclass is recorded
    in the checkpoint, so a job is resumed only with the same class)."""
    ray = _ray()
    _check_scorer_cls(scorer_cls)
    if not ray.is_initialized():
        ray.init(address=address)
    from ray.util import ActorPool

    from softprompt.runtime.requests import RequestError, as_request

    if not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be an integer >= 1, got {num_actors!r}")
    model, backend = resolve_model(model, backend, num_gpus_per_actor)
    fingerprint = None
    if (Path(model) / "bundle.json").is_file():
        from softprompt.models import loads_json

        fingerprint = loads_json((Path(model) / "bundle.json").read_text()).get("fingerprint")
    identity = {"engine": "ray", "model": model, "backend": backend, "fingerprint": fingerprint,
                "prompts": {n: prompt_identity(s) for n, s in sorted(prompts.items())},
                "batch_size": batch_size, "runtime_kwargs": dict(runtime_kwargs or {})}
    if scorer_cls is not RuntimeScorer:
        identity["scorer"] = f"{scorer_cls.__module__}.{scorer_cls.__qualname__}"
    actors: list = []

    def pool() -> ActorPool:
        if not actors:
            remote = ray.remote(scorer_cls).options(
                num_gpus=num_gpus_per_actor or None, max_restarts=max_restarts,
                max_task_retries=max_task_retries, **dict(actor_options or {}))
            actors.extend(remote.remote(model=model, backend=backend, prompts=dict(prompts),
                                        runtime_kwargs=dict(runtime_kwargs or {}))
                          for _ in range(num_actors))
        return ActorPool(actors)

    def scorer(requests):
        results: list = [None] * len(requests)
        valid = []
        for i, r in enumerate(requests):
            if isinstance(r, str):  # the job's own error for an unreadable row
                results[i] = ScoreResult(error=r)
                continue
            try:
                as_request(r)  # unknown fields fail here, as they would in Runtime.score
            except RequestError as e:
                results[i] = ScoreResult(error=str(e))
                continue
            valid.append(i)
        calls = [valid[j:j + batch_size] for j in range(0, len(valid), batch_size)]
        if calls:
            scored = pool().map(lambda actor, idx: actor.score_rows.remote(
                [{k: requests[i].get(k) for k in REQUEST_FIELDS} for i in idx]), calls)
            for idx, res in zip(calls, scored):
                if len(res) != len(idx):
                    raise JobError(f"a Ray actor returned {len(res)} results for {len(idx)} rows")
                for i, r in zip(idx, res):
                    results[i] = r
        return results

    try:
        return _score_file(None, input, output, scorer=scorer, identity=identity, **job)
    finally:
        for actor in actors:
            ray.kill(actor)
