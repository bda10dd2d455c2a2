"""``softprompt <verb>``: info, demo, score, generate, serve, export, bench, eval, train, inspect."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT_SYNTAX = (
    "PART is a PEFT adapter directory of any prompt-learning type (prompt tuning, P-tuning, CPT, "
    "prefix tuning, cartridges; a multitask adapter registers NAME/0 .. NAME/T-1, and PATH#T takes "
    "its task T alone), a .safetensors or .npy file or a hub id; or text:TEXT, a text part "
    "(backslash escapes \\n, \\t and \\\\ are read; ./text:... is a path). Repeating a NAME "
    "composes: its parts, in command-line order, are one prefix, e.g. --prompt qa=adapters/squad "
    "--prompt 'qa=text:Answer briefly.\\n'")
TEXT_PART = "text:"  # a part that starts with it is text; write ./text:... for such a path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory, a "
                        ".gguf file, or an exported bundle directory (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch", "reference"],
                   help="auto = torch+Triton on CUDA, ONNX Runtime on CPU (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for torch/reference (default: "
                   "cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, exact; bfloat16 on CUDA). "
                        "bfloat16 on CPU uses its matrix units (onnx: OpenVINO, torch: bfloat16 "
                        "weights); auto = bfloat16 on CUDA and on CPUs with AMX, else float32")
    _add_prompt_arg(p)
    p.add_argument("--max-batch", type=int, default=64, help="rows per forward (default: 64)")


def _add_prompt_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=PART",
                   help="register a prompt (repeatable). " + PROMPT_SYNTAX.replace("%", "%%"))


def _runtime(args):
    from softprompt.runtime.api import Runtime

    sources = prompt_sources(args.prompt)  # a bad spec or file fails before the model loads
    rt = Runtime.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                      max_batch=args.max_batch)
    for name, source in sources.items():
        rt.add_prompt(name, source)
    return rt


# ------------------------------------------------------------------------- prompt specs
@dataclass(frozen=True)
class PromptPart:
    """One part of a ``--prompt`` spec: ``text`` (a text part), or ``source`` (an adapter
    directory, a file or a hub id) with ``task`` (a multitask adapter's task, ``PATH#T``)."""

    text: str | None = None
    source: str | None = None
    task: int | None = None


def _unescape(s: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` read as a newline, a tab and a backslash; any other
    backslash stays as it is."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], s)


def parse_part(value: str, what: str = "--prompt") -> PromptPart:
    """A part as written on the command line: ``text:TEXT``, ``PATH#T`` or a source."""
    if value.startswith(TEXT_PART):
        text = _unescape(value[len(TEXT_PART):])
        if not text:
            raise SystemExit(f"softprompt: {what}: empty text part {value!r}; expected text:TEXT")
        return PromptPart(text=text)
    if not value:
        raise SystemExit(f"softprompt: {what}: empty part; expected a path, a hub id or text:TEXT")
    m = re.fullmatch(r"(.+)#(\d+)", value)
    if m and not Path(value).exists():
        return PromptPart(source=m.group(1), task=int(m.group(2)))
    return PromptPart(source=value)


def parse_prompt_specs(specs) -> dict[str, list[PromptPart]]:
    """``NAME=PART`` specs -> ``{NAME: [parts]}``, names in order of first appearance, parts in
    command-line order (a repeated NAME composes its parts)."""
    out: dict[str, list[PromptPart]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"softprompt: --prompt expects NAME=PART, got {spec!r}")
        out.setdefault(name, []).append(parse_part(value, f"--prompt {name}"))
    return out


def peft_type(source: str) -> str | None:
    """The ``peft_type`` of the adapter directory ``source`` (None when it is not one)."""
    cfg = Path(source) / "adapter_config.json"
    if not cfg.is_file():
        return None
    from softprompt.models import read_json_object
    from softprompt.runtime.prompts import SoftPromptError

    return read_json_object(cfg, 1 << 20, SoftPromptError, "an adapter config").get("peft_type")


def load_part(part: PromptPart, name: str | None = None, what: str = "--prompt"):
    """A source part loaded (``SoftPrompt.load``: a prompt of any kind; ``task`` for one task of
    a multitask adapter), or a text part as its ``str``; a one-line SystemExit on failure."""
    from softprompt.runtime.prompts import SoftPrompt, SoftPromptError

    if part.text is not None:
        return part.text
    try:
        if part.task is None and peft_type(part.source) == "MULTITASK_PROMPT_TUNING":
            raise SoftPromptError(f"{part.source} is a multitask adapter; pick one task as "
                                  f"{part.source}#T")
        if name is None and part.task is not None:  # named as the runtime names its tasks
            name = f"{Path(part.source).name}/{part.task}"
        return SoftPrompt.load(part.source, name=name, task=part.task)
    except SoftPromptError as e:
        raise SystemExit(f"softprompt: {what}: {e}") from None


def part_source(parts: list[PromptPart], name: str | None = None, what: str = "--prompt"):
    """What ``Runtime.add_prompt`` takes for one prompt's parts: a lone source part as written
    (a path or hub id: the runtime loads it, registering every task of a multitask adapter), a
    lone ``PATH#T`` as the loaded task, else the list of parts (text as ``str``, sources loaded)."""
    if len(parts) == 1 and parts[0].source is not None:
        return parts[0].source if parts[0].task is None else load_part(parts[0], name, what)
    return [load_part(p, what=what) for p in parts]


def prompt_sources(specs) -> dict[str, object]:
    """``--prompt`` specs -> ``{NAME: source for rt.add_prompt(NAME, source)}``."""
    return {name: part_source(parts, name, f"--prompt {name}")
            for name, parts in parse_prompt_specs(specs).items()}


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

            prompts = prompt_sources(args.prompt)  # each actor loads them (ray.prompt_identity)
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
    from softprompt.machine import cpu_model, matrix_units, package_versions

    versions = package_versions()
    print(f"softprompt-runtime {versions.pop('softprompt-runtime')} on Python "
          f"{platform.python_version()} ({platform.machine()})")
    print(f"  cpu           {cpu_model()}: {matrix_units()}")
    print(f"  cpu path      {cpu_path()}")
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
        if b:
            print(f"  bfloat16      {_bf16_record((m.get('validation') or {}).get('bfloat16'))}")
    sources = prompt_sources(args.prompt)  # a bad spec or prompt file fails before the model
    info = tokenizer = None  # what --prompt is checked against, and reads text parts with
    if args.model and (args.model != "default" or sources):
        from softprompt.runtime.requests import ModelInfo, Tokenizer

        p = Path(args.model)
        if (p / "bundle.json").is_file():
            m = loads_json((p / "bundle.json").read_text())
            keys = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "hidden_size", "vocab_size", "dtype", "quantization", "opset", "fingerprint")
            print("bundle", p, {k: m.get(k) for k in keys})
            info = ModelInfo(str(p), "onnx", m["hidden_size"], m["vocab_size"],
                             m.get("max_position_embeddings") or 1 << 30, m.get("fingerprint"),
                             m.get("dtype"), m["num_layers"], m["num_kv_heads"], m["head_dim"])
            tokenizer = lambda: _bundle_tokenizer(p)  # noqa: E731
        else:
            lm = models.load_model(args.model)
            c = lm.config
            print(f"model {args.model}: {c.model_type}, {c.num_hidden_layers} layers, hidden "
                  f"{lm.hidden_size}, vocab {c.vocab_size}, fingerprint {lm.fingerprint[:16]}")
            spec = models.ModelSpec.from_model(lm.model)
            info = ModelInfo(args.model, "torch", spec.hidden_size, spec.vocab_size,
                             spec.max_position_embeddings or 1 << 30, lm.fingerprint, "float32",
                             spec.num_layers, spec.num_kv_heads, spec.head_dim)
            tokenizer = lambda: Tokenizer.for_model(lm)  # noqa: E731
    if sources:
        print("prompts")
        for prompt in resolve_prompts(sources, tokenizer or (lambda: _default_tokenizer(d))):
            for line in describe_prompt(prompt, info):
                print("  " + line)
    return 0


def _bf16_record(v: dict | None) -> str:
    """The bundle's recorded bfloat16 validation (``validation.bfloat16``) in one line."""
    if not v:
        return ("drift not recorded (exported without OpenVINO or on a CPU without bfloat16 "
                "units; re-export to record it)")
    if not v.get("passed"):
        return f"failed its validation on {v.get('cpu')}: {v.get('error')}"
    uses = ("prefix", "request", "decode")
    projection = v.get("vocabulary_projection", "bfloat16")  # not recorded before it was float32
    return (f"mean |dlogprob| {max(v.get(f'mean_abs_{u}', 0) for u in uses)}, max "
            f"{max(v.get(f'max_abs_{u}', 0) for u in uses)} vs PyTorch float32 (top-1 token, "
            f"validation cases, vocabulary projection in {projection}, measured on {v.get('cpu')})")


def cpu_path() -> str:
    """One line: what the CPU serves by default and with ``--dtype auto`` / ``bfloat16``."""
    from softprompt.machine import cpu_flags
    from softprompt.runtime.factory import auto_dtype, openvino_available

    flags = cpu_flags()
    engine = ("onnx under OpenVINO" if openvino_available() else
              "torch (OpenVINO not installed: pip install 'softprompt-runtime[openvino]')")
    if auto_dtype("cpu", flags) == "bfloat16":
        return (f"float32 by default (exact); --dtype auto serves bfloat16 on AMX via {engine} "
                "(SCORE_CPU_BF16 drift)")
    if "avx512_bf16" in flags:
        return (f"float32 (no AMX: --dtype auto falls back to float32; --dtype bfloat16 uses "
                f"AVX-512 BF16 dot products via {engine})")
    return "float32 (no AMX, no AVX-512 BF16: --dtype auto falls back to float32; no bfloat16 path)"


def _bundle_tokenizer(path: Path):
    from softprompt.runtime.requests import Tokenizer

    f = path / "tokenizer.json"
    if not f.is_file():
        return Tokenizer(None, source=str(path))
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_file(str(f)), source=str(path))


def _default_tokenizer(default_dir: Path):
    """The default model's tokenizer (without converting it: text parts of ``info --prompt``
    need a converted default model, or a MODEL argument)."""
    from softprompt.models.loading import load_tokenizer
    from softprompt.runtime.requests import Tokenizer

    if not (default_dir / "config.json").is_file():
        raise SystemExit("softprompt info: a text part needs the model's tokenizer: pass MODEL "
                         "(the default model is not converted yet)")
    t = load_tokenizer(default_dir)
    return Tokenizer(None if t is None else t.backend_tokenizer, source="default")


def resolve_prompts(sources: dict, tokenizer) -> list:
    """The prompts ``sources`` (``prompt_sources``) register, as ``Runtime.add_prompt`` makes
    them, without a runtime: a multitask adapter as NAME/0 .., a list of parts composed with
    ``tokenizer()`` (called only when there is a text part)."""
    from softprompt.runtime.adapters import load_adapter
    from softprompt.runtime.prompt_kinds import compose
    from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
    from softprompt.runtime.requests import RequestError

    out: list = []
    for name, src in sources.items():
        try:
            if isinstance(src, list):
                tok = tokenizer() if any(isinstance(p, str) for p in src) else None
                out.append(compose(src, tok, name))
            elif isinstance(src, str) and Path(src).is_dir():
                out += load_adapter(Path(src), name)
            else:
                out.append(SoftPrompt.load(src, name=name))
        except (SoftPromptError, RequestError) as e:
            raise SystemExit(f"softprompt: --prompt {name}: {e}") from None
    return out


def _geometry(p) -> str:
    from softprompt.runtime.prompt_kinds import KVPrompt
    from softprompt.runtime.prompts import SoftPrompt

    if isinstance(p, KVPrompt):
        N, H, D = p.geometry
        return f", K/V {N} layers x {H} K/V heads x head size {D}"
    if isinstance(p, SoftPrompt):
        return f", E={p.hidden_size}"
    return ""


def describe_prompt(prompt, info=None) -> list[str]:
    """``softprompt info``'s lines for one prompt: its name, kind, P and geometry (E, or the
    K/V layers x heads x head size), whether it predicts the request's first token, its parts
    (a composed prompt, ``ComposedPrompt.describe``), and, given ``info`` (a ``ModelInfo``),
    whether it fits that model."""
    from softprompt.runtime.prompt_kinds import ComposedPrompt, check_prompt
    from softprompt.runtime.prompts import SoftPromptError

    lines = [f"{prompt.name}: {prompt.kind}, P={prompt.num_virtual_tokens}{_geometry(prompt)}, "
             f"predicts the first token: {'yes' if prompt.scores_first else 'no (ends in K/V)'}"]
    if isinstance(prompt, ComposedPrompt):
        for i, (d, part) in enumerate(zip(prompt.describe(), prompt.parts)):
            lines.append(f"  part {i}: text {d['text']!r} ({d['tokens']} tokens)" if "text" in d
                         else f"  part {i}: {d['kind']} {d['name']!r}, "
                              f"P={d['num_virtual_tokens']}{_geometry(part)}")
    if info is not None:
        try:
            check_prompt(prompt, info)
            lines.append(f"  fits {info.name}")
        except SoftPromptError as e:
            lines.append(f"  does not fit {info.name}: {e}")
    return lines


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
    parse_prompt_specs(args.prompt)  # the syntax now; the files load with the model
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
                     **({} if args.max_inline_bytes is None else
                        {"max_inline_bytes": args.max_inline_bytes}),
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
    prompt = None
    if args.prompt:
        parts = [parse_part(v, "--prompt") for v in args.prompt]
        if len(parts) == 1 and parts[0].source is not None and parts[0].task is None \
                and peft_type(parts[0].source) == "MULTITASK_PROMPT_TUNING":
            raise SystemExit(f"softprompt eval: --prompt {parts[0].source} is a multitask adapter; "
                             f"evaluate one task: --prompt {parts[0].source}#T")
        prompt = part_source(parts, what="--prompt")
    results = evaluate(args.model, prompt, [t for t in args.tasks.split(",") if t],
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
    p.add_argument("--prompt", action="append", default=[], metavar="PART",
                   help="the prompt (default: none, the bare model): a PART as in score's --prompt "
                        "NAME=PART, without the name (a multitask adapter needs PATH#T); repeat "
                        "it to compose parts in order, e.g. --prompt adapters/squad --prompt "
                        "'text:Answer briefly.\\n'")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
    p.add_argument("--backend", default=None, choices=["auto", "onnx", "torch", "reference"])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
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
    "inspect": ("softprompt.train.inspect_prompt", "a prompt of any kind: virtual tokens against "
                "the vocabulary (nearest tokens, norms, init distance, --compare); K/V norms and "
                "prefix attention per layer; --plot"),
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

    p = sub.add_parser("info", help="versions, device, default model and bundle/model facts; "
                       "each --prompt's kind, P, geometry and parts")
    p.add_argument("model", nargs="?", default=None, help="a model or bundle to describe (and "
                   "to check --prompt against; its tokenizer reads text parts)")
    _add_prompt_arg(p)
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
    p.add_argument("--max-inline-bytes", type=int, default=None, metavar="N",
                   help="an inline prompt (soft_prompt / prompt_embeds) larger than N decoded "
                        "bytes gets 413 (default: 64 MiB; --max-body-bytes applies first)")
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
