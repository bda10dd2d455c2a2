"""``softprompt <verb>``: info, demo, score, generate, serve, export, bench, eval, train, inspect."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory, a "
                        ".gguf file, or an exported bundle directory (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch", "reference"],
                   help="auto = torch+Triton on CUDA, ONNX Runtime on CPU (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for torch/reference (default: "
                   "cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=SOURCE",
                   help="register a soft prompt: a PEFT adapter dir, .safetensors or .npy "
                        "(repeatable)")
    p.add_argument("--max-batch", type=int, default=64, help="rows per forward (default: 64)")


def _runtime(args):
    from softprompt.runtime.api import Runtime

    rt = Runtime.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                      max_batch=args.max_batch)
    for spec in args.prompt:
        rt.add_prompt(*_prompt_spec(spec))
    return rt


def _prompt_spec(spec: str) -> tuple[str, str]:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise SystemExit(f"softprompt: --prompt expects NAME=SOURCE, got {spec!r}")
    return name, source


def _read_jsonl(path: str):
    """Yield (line number, request dict or an error string), blank lines skipped."""
    from softprompt.jobs import read_jsonl

    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    with f:
        for n, obj, _ in read_jsonl(f):
            yield n, obj if isinstance(obj, dict) else f"line {n}: {obj}"


def _write(out, obj) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")


def cmd_score(args) -> int:
    """Rows {prompt, context, continuation} in (JSONL, CSV or Parquet), score records out, chunk
    by chunk with a checkpoint beside the output (softprompt/jobs/). A bad row gets
    {"line": n, "error": ...}; the others are still scored. A job whose output is complete
    already says so and exits 0; anything that stops a job is one line and exit status 1."""
    from softprompt.jobs import JobError, score_file

    opts = dict(chunk_rows=args.chunk_rows, resume=args.resume, overwrite=args.overwrite,
                input_format=args.input_format, output_format=args.output_format,
                progress=not args.no_progress, keep_columns=args.keep_columns)
    try:
        if args.ray:
            from softprompt import ray as sp_ray

            prompts = dict(_prompt_spec(s) for s in args.prompt)
            summary = sp_ray.score_file(args.input, args.output, args.model, prompts,
                                        address=None if args.ray == "local" else args.ray,
                                        backend=args.backend, num_actors=args.ray_actors,
                                        num_gpus_per_actor=args.ray_gpus_per_actor,
                                        batch_size=args.ray_batch_size,
                                        runtime_kwargs=dict(max_batch=args.max_batch), **opts)
        else:
            summary = score_file(_runtime(args), args.input, args.output, **opts)
    except JobError as e:
        raise SystemExit(f"softprompt score: {e}") from None
    if summary.get("already_done"):
        print(f"softprompt score: {args.output} is complete already ({summary['rows_done']} rows, "
              "the same job); nothing to do (--overwrite scores it again)", file=sys.stderr)
    elif not args.no_progress:
        print(f"softprompt score: {summary['rows']} rows ({summary['errors']} errors) in "
              f"{summary['seconds']:.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    """Contexts from --context (repeatable) or JSONL {prompt, context}; JSONL results out."""
    rt = _runtime(args)
    if args.input:
        items = [(n, o) for n, o in _read_jsonl(args.input)]
    else:
        items = [(i + 1, {"prompt": args.use, "context": c}) for i, c in enumerate(args.context)]
    if not items:
        raise SystemExit("softprompt generate: give --context TEXT or --input FILE")
    good = [(n, o) for n, o in items if isinstance(o, dict)]
    res = rt.generate([o.get("prompt") for _, o in good], [o.get("context", "") for _, o in good],
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, stop=args.stop, errors="return")
    by_line = dict(zip((n for n, _ in good), res))
    for n, o in items:
        r = by_line.get(n)
        if r is None or r.error:
            _write(sys.stdout, {"line": n, "error": o if r is None else r.error})
        else:
            _write(sys.stdout, {"line": n, "text": r.text, "finish_reason": r.finish_reason,
                                "token_ids": r.token_ids})
    return 0


def cmd_info(args) -> int:
    import platform

    from softprompt import models
    from softprompt.machine import package_versions

    versions = package_versions()
    print(f"softprompt-runtime {versions.pop('softprompt-runtime')} on Python "
          f"{platform.python_version()} ({platform.machine()})")
    for pkg, version in versions.items():
        print(f"  {pkg:13s} {version or 'not installed'}")
    try:
        import torch

        print(f"  cuda          {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    except ImportError:
        pass
    from softprompt.models import loads_json

    home = models.softprompt_home()
    print(f"SOFTPROMPT_HOME {home}")
    d = models.default_model_dir(convert=False)
    print(f"default model   {models.DEFAULT_MODEL_NAME}: "
          f"{'converted at ' + str(d) if d.exists() else 'not converted yet (first use converts it)'}")
    if d.exists():  # the bundle Runtime.load("default") serves on CPU: the fastest within tolerance
        from softprompt.export import bundle_for

        b = bundle_for("default", create=False)
        m = loads_json((b / "bundle.json").read_text()) if b else {}
        s = (m.get("validation") or {}).get("scores") or {}
        ms = (m.get("weights") or {}).get("request_ms") or {}
        what = (f"int4 weights, mean |dlogprob| {s.get('mean_abs_dlogprob')} vs float32 "
                f"(tolerance {s.get('atol')}), scoring batch {ms.get('int4')} ms vs "
                f"{ms.get('float32')} ms float32" if m.get("quantization") == "int4"
                else f"{m.get('dtype')}; a 4-bit bundle is served only when within the score "
                     "tolerance and faster")
        print(f"default bundle  {f'{b} ({what})' if b else 'not exported yet (first CPU use exports it)'}")
    if args.model and args.model != "default":
        from pathlib import Path

        p = Path(args.model)
        if (p / "bundle.json").is_file():
            m = loads_json((p / "bundle.json").read_text())
            keys = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "hidden_size", "vocab_size", "dtype", "quantization", "opset", "fingerprint")
            print("bundle", p, {k: m.get(k) for k in keys})
        else:
            lm = models.load_model(args.model)
            c = lm.config
            print(f"model {args.model}: {c.model_type}, {c.num_hidden_layers} layers, hidden "
                  f"{lm.hidden_size}, vocab {c.vocab_size}, fingerprint {lm.fingerprint[:16]}")
    return 0


def cmd_demo(args) -> int:
    """Classify a few inputs under the two shipped demo prompts, in one mixed batch."""
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.demo import PROMPTS_DIR, TASKS

    t0 = time.perf_counter()
    rt = Runtime.load("default", backend=args.backend)
    for name in TASKS:
        rt.add_prompt(name, PROMPTS_DIR / name)
    load_s = time.perf_counter() - t0
    inputs = [
        ("sentiment", "The battery died after two days and support never answered."),
        ("topic", "The goalkeeper saved two penalties to win the cup final."),
        ("sentiment", "Friendly staff, fresh bread and the best soup in town."),
        ("topic", "Parliament voted to lower the voting age to sixteen."),
        ("sentiment", "The sequel is dull, too long and the jokes fall flat."),
        ("topic", "The new phone ships with a faster chip and a brighter screen."),
        ("topic", "Slow-cooked lamb with rosemary and garlic makes a perfect Sunday dinner."),
        ("sentiment", "I would happily buy this blender again."),
    ]
    # One score call: every (input, label) pair of both prompts is a row of the same batches.
    reqs = [{"prompt": t, "context": TASKS[t].format(x), "continuation": lab}
            for t, x in inputs for lab in TASKS[t].labels]
    t1 = time.perf_counter()
    scores = rt.score(reqs)
    run_s = time.perf_counter() - t1
    print(f"softprompt demo: {rt.backend.name} backend, {rt.model_name}, prompts "
          f"{', '.join(f'{n} (P={p.num_virtual_tokens})' for n, p in rt.prompts.items())}")
    print(f"{'prompt':10s} {'label':11s} {'p':>5s}  input")
    at = 0
    import numpy as np

    for t, x in inputs:
        labels = TASKS[t].labels
        lp = np.array([s.logprob for s in scores[at: at + len(labels)]])
        at += len(labels)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        best = int(np.argmax(p))
        print(f"{t:10s} {labels[best].strip():11s} {p[best]:5.2f}  {x}")
    s = rt.stats()
    print(f"{len(reqs)} rows in {run_s * 1000:.0f} ms ({s.get('batches', '?')} batches, "
          f"{s['tokens_computed']} request tokens computed, prefix cache hits {s.get('hits', 0)} / "
          f"misses {s.get('misses', 0)}); load + prompts {load_s:.1f} s")
    return 0


def cmd_serve(args) -> int:
    """The HTTP API (softprompt/server): loads the model in the background (GET /ready turns
    200 once it is loaded and warmed up), serves until SIGTERM, then drains and exits 0."""
    import os

    try:
        from softprompt.server import create_app, prompt_dir_sources, serve
    except ImportError as e:
        raise SystemExit(f"softprompt serve needs the [serve] extra ({e.name} is missing): "
                         "pip install 'softprompt-runtime[serve]'") from None
    for spec in args.prompt:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"softprompt: --prompt expects NAME=SOURCE, got {spec!r}")
    dir_prompts = prompt_dir_sources(args.prompt_dir) if args.prompt_dir else []
    if args.watch:  # served from the start, then kept in step with the directory
        os.makedirs(args.watch, exist_ok=True)
        dir_prompts += prompt_dir_sources(args.watch)
    api_keys = args.api_key or [k for k in os.environ.get("SOFTPROMPT_API_KEY", "").split(",") if k]
    admin_key = args.admin_key or os.environ.get("SOFTPROMPT_ADMIN_KEY")

    def load():
        rt = _runtime(args)
        for name, source in dir_prompts:
            rt.add_prompt(name, source)
        return rt

    app = create_app(loader=load, api_keys=api_keys, admin_keys=[admin_key] if admin_key else [],
                     max_queue=args.max_queue, request_timeout=args.request_timeout,
                     max_body_bytes=args.max_body_bytes,
                     served_model_name=args.served_model_name, warmup=not args.no_warmup,
                     watch_dir=args.watch, watch_interval=args.watch_interval)
    return serve(app, args.host, args.port, log_level=args.log_level,
                 access_log=args.access_log, graceful_timeout=args.request_timeout + 5)


def cmd_eval(args) -> int:
    """EleutherAI lm-evaluation-harness tasks on MODEL under the soft prompt --prompt."""
    try:
        from softprompt.lm_eval import evaluate
    except ImportError as e:
        raise SystemExit(f"softprompt eval needs the [eval] extra ({e.name} is missing): "
                         "pip install 'softprompt-runtime[eval]'") from None
    from lm_eval.utils import make_table

    model_args = {k: v for k, v in dict(backend=args.backend, device=args.device, dtype=args.dtype,
                                        max_length=args.max_length,
                                        batch_size=args.batch_size).items() if v is not None}
    results = evaluate(args.model, args.prompt, [t for t in args.tasks.split(",") if t],
                       include_path=args.include_path, num_fewshot=args.num_fewshot,
                       limit=args.limit, **model_args)
    print(make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=1,
                      default=str)
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks under a soft prompt")
    p.add_argument("model", nargs="?", default="default",
                   help="'default', a Hugging Face directory or hub id, a .gguf file, or an "
                        "exported bundle directory (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="the soft prompt: a PEFT adapter directory "
                   "or hub id, .safetensors or .npy (default: none, the bare model)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
    p.add_argument("--backend", default=None, choices=["auto", "onnx", "torch", "reference"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-length", type=int, default=None,
                   help="request tokens per forward and rolling-window length")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward (default 64)")
    p.add_argument("--output", "-o", default=None, help="write lm-eval's results as JSON here")
    p.set_defaults(func=cmd_eval)


# Building the parser imports no model code (``softprompt --help`` stays fast): every verb
# imports what it needs when it runs. These verbs' parsers are added by their own modules, an
# import too heavy for every command (onnxruntime, the bench driver), so they are listed by their
# help line alone unless they are the verb being run: (module with add_parser(sub), help line).
LAZY_VERBS = {
    "export": ("softprompt.export.cli",
               "export a causal LM to an ONNX bundle (soft prompts as graph input)"),
    "bench": ("softprompt.bench.driver",
              "benchmark backends over prompt length x batch x request length (CSV, JSON, plots)"),
    "train": ("softprompt.train.cli", "train a soft prompt with PEFT, evaluated on the runtime "
              "every epoch (resumable; --serve-url uploads it)"),
    "inspect": ("softprompt.train.inspect_prompt", "a soft prompt's virtual tokens against the "
                "vocabulary: nearest tokens, norms, init distance, --compare, --plot"),
}


def _add_lazy_parser(sub, verb: str, selected: str | None) -> None:
    """The verb's own parser if it is the one being run, else its help line for the listing."""
    module, help = LAZY_VERBS[verb]
    if verb == selected:
        import importlib

        importlib.import_module(module).add_parser(sub)
    else:
        sub.add_parser(verb, help=help)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``softprompt`` parser; ``verb`` (the first argument) is the verb about to run, the only
    one of ``LAZY_VERBS`` whose module is imported for its full parser."""
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("info", help="versions, device, default model and bundle/model facts")
    p.add_argument("model", nargs="?", default=None, help="a model or bundle to describe")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="classify inputs under the two demo prompts in one batch")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch", "reference"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("score", help="score rows {prompt, context, continuation} (JSONL, CSV, "
                       "Parquet), streaming and resumable, locally or on Ray")
    _add_model_args(p)
    p.add_argument("--input", "-i", default="-", help="JSONL, CSV or Parquet file, by extension "
                   "(default: JSONL on stdin)")
    p.add_argument("--output", "-o", default="-", help="JSONL, CSV or Parquet file, by extension "
                   "(default: JSONL on stdout, without checkpoint)")
    p.add_argument("--input-format", choices=["jsonl", "csv", "parquet"], default=None,
                   help="override the input's extension")
    p.add_argument("--output-format", choices=["jsonl", "csv", "parquet"], default=None,
                   help="override the output's extension")
    p.add_argument("--chunk-rows", type=int, default=1000, help="rows per chunk: per score call, "
                   "output write and checkpoint (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue after the last complete "
                   "chunk of an interrupted run of the same job (starts if there is none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output and its checkpoint")
    p.add_argument("--keep-columns", action="store_true",
                   help="carry the input's other columns (an id...) into each output record, "
                        "after 'line' (the record number); JSONL input needs JSONL output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="score each chunk on a Ray cluster (ADDRESS, e.g. ray://head:10001 or "
                        "auto; without one a local Ray)")
    p.add_argument("--ray-actors", type=int, default=2, help="actors, each holding one runtime "
                   "(default: %(default)s)")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0,
                   help="GPUs per actor (default: %(default)s)")
    p.add_argument("--ray-batch-size", type=int, default=256,
                   help="rows per actor call (default: %(default)s)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="generate continuations under a soft prompt")
    _add_model_args(p)
    p.add_argument("--use", default=None, help="prompt name for --context inputs")
    p.add_argument("--context", action="append", default=[], help="input text (repeatable)")
    p.add_argument("--input", "-i", default=None, help="JSONL {prompt, context} instead")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="HTTP API: OpenAI completions, score, classify, metrics")
    _add_model_args(p)
    p.add_argument("--prompt-dir", default=None, metavar="DIR",
                   help="register every PEFT adapter subdirectory and .safetensors/.npy file "
                        "in DIR, named after it")
    p.add_argument("--watch", default=None, metavar="DIR",
                   help="as --prompt-dir, then keep serving DIR as it changes: new and changed "
                        "prompts are validated and swapped in, removed ones removed")
    p.add_argument("--watch-interval", type=float, default=2.0, metavar="S",
                   help="seconds between two scans of --watch DIR (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="bearer key required on /v1/* (repeatable; default: the comma-separated "
                        "$SOFTPROMPT_API_KEY; none: no key needed)")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="key that may also add and remove prompts (default: "
                        "$SOFTPROMPT_ADMIN_KEY; with keys set, only this key may)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="accepted requests in flight at most; more get 429 (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds per request; a completion past it is cancelled (default: "
                        "%(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N",
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's id in /v1/models (default: the model's name)")
    p.add_argument("--no-warmup", action="store_true", help="skip Runtime.warmup() at start")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    _add_lazy_parser(sub, "export", verb)
    _add_lazy_parser(sub, "bench", verb)
    _add_lazy_parser(sub, "train", verb)
    _add_lazy_parser(sub, "inspect", verb)
    _add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
