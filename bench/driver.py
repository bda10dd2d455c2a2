"""``softprompt bench``: batch-scoring throughput over prompt length P x batch B x request length L.

    softprompt bench --backends reference,copied,torch,onnx --P 0,1,5,20,100,150 --B 8 --L 32 \\
        --refcheck --out bench/out
    python -m softprompt.bench.driver --quick --refcheck        # same driver, a few seconds

What one point measures. A batch of B requests, each L random token ids (seeded, the same for
every backend), all under one soft prompt of P virtual tokens (rows of the model's embedding
table, seeded; P = 0 means no prompt, i.e. the plain base model, for every backend). The last
``--score-tokens`` ids of each request are its continuation and their log-probabilities are
returned: that is batch scoring as in log-likelihood evaluation / classification over one label
token. The wall time of one call that scores the whole batch is measured: ``Runtime.score`` for
the runtime backends (request validation and batching included), one ``model(...)`` call plus
the per-row prefix copy for ``copied``.

Methods (``--backends``):
  peft       the baseline users run today: ``peft.PeftModelForCausalLM`` loaded with
             ``PeftModel.from_pretrained(base, adapter_dir)`` from the same soft prompt saved as
             a PEFT PROMPT_TUNING adapter, one forward over the batch (P = 0: the base model),
             then log-softmax of its logits at the scored positions, as a user would. Every
             speedup column is measured against it.
  reference  Runtime(backend="reference"): PEFT semantics, the P virtual tokens are recomputed
             in every call and logits are computed at all P + L positions (as PEFT does); the
             correctness oracle of ``--refcheck``.
  copied     plain transformers with the prompt's K/V computed once and COPIED into every row
             as a ``DynamicCache`` (the "copied prefix cache" of the anchors), request tokens on
             top; logits only where a score needs them (``logits_to_keep``).
  torch      Runtime(backend="torch"): the cached prefix is shared, never copied per row
             (Triton kernels on CUDA, the PyTorch reference attention on CPU).
  onnx       Runtime(backend="onnx"): the float32 bundle under ONNX Runtime with the cached
             prefix (exported once into $SOFTPROMPT_HOME/bundles if needed, or ``--bundle``).
  onnx-int4  the same over the model's 4-bit weight bundle (``softprompt export --weights
             int4``; exported once next to the float32 bundle if needed, or ``--bundle-int4``).

The prefix of the cached methods is computed once per prompt before timing (amortised over all
requests of that prompt, which is the point of caching); it is not part of any timed call.

Timing: per point, each backend in turn runs ``--warmup`` untimed calls and then ``--repeats``
timed calls back to back (``--interleave`` instead alternates the backends call by call, so slow
drifts of machine load hit all alike; but ONNX Runtime's spinning worker threads then steal the
cores from the next torch call, so it is off by default). Reported: median and min/max/IQR of
wall ms per batch, sequences/s, request tokens/s, achieved GFLOP/s (see :func:`flops`), speedup
over ``reference`` (of medians; ``speedup_best`` of minima, robust to bursts of load from other
processes) and the ideal speedup (P + L) / L of not recomputing the prompt. The speedups are
over ``peft`` (empty when peft is not among the backends).

``--refcheck``: before timing, every backend's log-probs on the point's batch are compared with
the float32 ``reference`` backend on the same batch and device; tolerance = the project's SCORE
table (tests/tolerances.py) for the backend's dtype, and the ONNX table's for ``onnx`` (the
graph is compared to PyTorch within 1e-2; for ``onnx-int4`` the 4-bit bundle's score tolerance
``INT4_SCORE_ATOL``). A backend that fails is reported FAILED at that
point and is not timed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from softprompt import cpu_model  # noqa: F401 - also imported from here by other bench scripts

LESTER_P = (0, 1, 5, 20, 100, 150)  # prompt lengths studied by Lester et al. (2021)
ALL_BACKENDS = ("peft", "reference", "copied", "torch", "onnx", "onnx-int4")
BASELINE = "peft"  # every speedup column is over this backend
COLORS = {"peft": "tab:blue", "reference": "tab:gray", "copied": "tab:orange", "torch": "tab:green",
          "onnx": "tab:red", "onnx-int4": "tab:purple"}

# Copy of tests/tolerances.py (SCORE per dtype, ONNX for the onnx backend); _tolerances()
# reads the real table when the repository's tests/ folder is next to this package.
_SCORE_ATOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}
_ONNX_ATOL = {"float32": 1e-2, "float16": 5e-2}


def _tolerances() -> tuple[dict, dict]:
    path = Path(__file__).resolve().parents[1] / "tests" / "tolerances.py"
    if path.is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("_softprompt_test_tolerances", path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
            return ({k: v["atol"] for k, v in mod.SCORE.items()},
                    {k: v["atol"] for k, v in mod.ONNX.items()})
        except Exception:  # noqa: BLE001 - fall back to the copy above
            pass
    return dict(_SCORE_ATOL), dict(_ONNX_ATOL)


def tolerance(backend: str, dtype: str) -> float:
    """Max |log-prob - float32 reference| allowed for ``backend`` computing in ``dtype``."""
    score, onnx = _tolerances()
    if backend == "onnx-int4":
        from softprompt.export.quantize import INT4_SCORE_ATOL

        return INT4_SCORE_ATOL
    tol = score.get(dtype, 1e-1)
    if backend == "onnx":
        tol = max(tol, onnx.get(dtype, 5e-2))
    return tol


# ------------------------------------------------------------------------------ FLOP model
@dataclass(frozen=True)
class Dims:
    """What the FLOP formula needs from a model.

    linear_params: weights of every matmul inside the N layers (q/k/v/o projections, MLP),
    i.e. the non-embedding parameters that multiply activations (norm weights, embedding
    lookups and position tables do no matmul and are left out); lm_head: E x V.
    """

    num_layers: int  # N
    num_heads: int  # H
    head_dim: int  # D
    hidden_size: int  # E
    vocab_size: int  # V
    linear_params: int

    @classmethod
    def from_model(cls, model) -> "Dims":
        cfg = model.config
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        skip = {emb.data_ptr(), head.data_ptr()}
        linear = 0
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.data_ptr() not in skip and "embed" not in name and "wpe" not in name \
                    and "wte" not in name:
                linear += p.numel()
        H = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        E = int(emb.shape[1])
        D = int(getattr(cfg, "head_dim", None) or E // H)
        N = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
        return cls(N, H, D, E, int(head.shape[0]), linear)


def flops(d: Dims, method: str, B: int, P: int, L: int, n_score: int) -> float:
    """FLOPs one batch really computes (multiply-add = 2 FLOPs), by method:

        tokens T run through the layers: reference, peft T = P + L (prompt recomputed), else T = L
        linear  = 2 * linear_params * T
        attention (causal, only keys a query may see; QK^T and PV each 2*H*D per key):
            reference: 4 * N * H * D * sum_{i=1..P+L} i        = 4NHD * S(S+1)/2, S = P + L
            cached   : 4 * N * H * D * sum_{j=1..L} (P + j)    = 4NHD * (L*P + L(L+1)/2)
        lm_head = 2 * E * V * positions projected: reference and peft all P + L (PEFT returns
                  logits at every position), the cached methods only the n_score scored ones
        total   = B * (linear + attention + lm_head)

    The one-time prefix computation of the cached methods is not counted (not in the timed call).
    """
    attn = 4 * d.num_layers * d.num_heads * d.head_dim
    if method in ("reference", "peft"):
        S = P + L
        per_row = 2 * d.linear_params * S + attn * S * (S + 1) / 2 + 2 * d.hidden_size * d.vocab_size * S
    else:
        per_row = (2 * d.linear_params * L + attn * (L * P + L * (L + 1) / 2)
                   + 2 * d.hidden_size * d.vocab_size * n_score)
    return float(B * per_row)


# ----------------------------------------------------------------------- copied baseline

class CopiedPrefix:
    """transformers + the prompt's K/V computed once and copied into every row of a DynamicCache.

    This is what a user of plain transformers does to avoid recomputing a soft prompt: run the
    P virtual tokens once, keep their past key/values, and for each batch expand them to B rows
    (one copy per row, since the cache grows in place with the request's own K/V) and run the
    request tokens on top. Only ``DynamicCache()`` and ``DynamicCache.update`` are used, which
    exist with the same meaning in transformers 5.17 and 5.24.
    """

    name = "copied"

    def __init__(self, model):
        import torch

        from softprompt.runtime.models import cache_kwarg

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix: dict = {}  # key -> (per-layer [(k, v)] each [1, Hkv, P, D], P)
        self.cache_kw = cache_kwarg(model)

    def prepare(self, key, embeddings) -> None:
        """embeddings: [P, E] float32 numpy -> the prompt's per-layer K/V, computed once."""
        torch = self.torch
        from transformers import DynamicCache

        if embeddings is None or len(embeddings) == 0:
            self.prefix[key] = ([], 0)
            return
        emb = torch.as_tensor(embeddings, device=self.device).to(self.model.dtype)[None]  # [1, P, E]
        P = emb.shape[1]
        with torch.inference_mode():
            cache = DynamicCache()
            self.model(inputs_embeds=emb, position_ids=torch.arange(P, device=self.device)[None],
                       use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        self.prefix[key] = (kv, P)

    def logprobs(self, key, ids, n_score: int):
        """ids: [B, L] int64 tensor on the device -> [B, n_score] float32 numpy log-probs of the
        last n_score ids (each predicted by the position before it)."""
        torch = self.torch
        from transformers import DynamicCache

        kv, P = self.prefix[key]
        B, L = ids.shape
        with torch.inference_mode():
            cache = None
            if P:
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):  # k, v: [1, Hkv, P, D] -> [B, Hkv, P, D], copied
                    cache.update(k.expand(B, -1, -1, -1).contiguous(),
                                 v.expand(B, -1, -1, -1).contiguous(), i)
            pos = (P + torch.arange(L, device=self.device)).expand(B, L)
            mask = torch.ones(B, P + L, dtype=torch.long, device=self.device)
            keep = torch.arange(L - n_score - 1, L - 1, device=self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=cache is not None, logits_to_keep=keep,
                             **{self.cache_kw: cache})
            lp = out.logits.float().log_softmax(-1)  # [B, n_score, V]
            tgt = ids[:, L - n_score:]
            return lp.gather(-1, tgt[..., None])[..., 0].cpu().numpy()


class PeftBaseline:
    """The real ``peft.PeftModelForCausalLM`` forward: what users of prompt tuning run today.

    Each soft prompt is saved as a PEFT PROMPT_TUNING adapter (``SoftPrompt.save_peft``) and
    loaded the way a user loads one, ``PeftModel.from_pretrained(base, dir, adapter_name=key)``
    (later prompts with ``load_adapter``); a batch under one prompt is one PEFT forward over
    ``[v_1 .. v_P, t_1 .. t_L]`` whose logits [B, P + L, V] are log-softmaxed at the scored
    positions only. P = 0 runs the base model itself (PEFT with no prompt).
    """

    name = "peft"

    def __init__(self, model, workdir: Path):
        import torch

        self.torch, self.base, self.workdir = torch, model, workdir
        self.peft = None
        self.device = next(model.parameters()).device
        self.num_virtual: dict = {}

    def prepare(self, key, prompt) -> None:
        """prompt: a SoftPrompt (saved as a PEFT adapter and loaded by PEFT) or None (P = 0)."""
        from peft import PeftModel

        if prompt is None:
            self.num_virtual[key] = 0
            return
        path = prompt.save_peft(self.workdir / str(key))
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=key).eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=key)
        self.num_virtual[key] = prompt.num_virtual_tokens

    def requests(self, key, ids: np.ndarray, n_score: int):
        return key, self.torch.as_tensor(ids, device=self.device), n_score

    def run(self, batch) -> np.ndarray:
        """-> [B, n_score] float64 log-probs of each row's last n_score ids."""
        torch = self.torch
        key, ids, n_score = batch
        with torch.inference_mode():
            if self.num_virtual[key]:
                self.peft.set_adapter(key)
                logits = self.peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            else:
                logits = self.base(input_ids=ids).logits  # [B, P + L, V]
            lp = logits[:, -n_score - 1:-1].float().log_softmax(-1)  # [B, n_score, V]
            tgt = ids[:, -n_score:]
            return lp.gather(-1, tgt[..., None])[..., 0].cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------ backends
class _RuntimeMethod:
    """One Runtime backend behind the driver's uniform interface."""

    def __init__(self, name: str, rt):
        self.name, self.rt = name, rt

    def prepare(self, key, prompt) -> None:
        if prompt is not None:
            self.rt.add_prompt(key, prompt)

    def requests(self, key, ids: np.ndarray, n_score: int) -> list[dict]:
        return [{"prompt": key if key is not None else None,
                 "context": row[:-n_score].tolist(), "continuation": row[-n_score:].tolist()}
                for row in ids]

    def run(self, batch) -> np.ndarray:
        return np.array([r.token_logprobs for r in self.rt.score(batch)], dtype=np.float64)


class _CopiedMethod:
    def __init__(self, impl: CopiedPrefix):
        self.name, self.impl = "copied", impl

    def prepare(self, key, prompt) -> None:
        self.impl.prepare(key, None if prompt is None else prompt.embeddings)

    def requests(self, key, ids: np.ndarray, n_score: int):
        import torch

        return key, torch.as_tensor(ids, device=self.impl.device), n_score

    def run(self, batch) -> np.ndarray:
        return self.impl.logprobs(*batch).astype(np.float64)


def load_methods(names, model: str, device: str, dtype: str, max_batch: int,
                 max_batch_tokens: int, bundle_dir: str | None = None, log=print,
                 bundle_int4: str | None = None):
    """{name: method or error string}; a backend that cannot load is reported, not fatal."""
    import tempfile

    from softprompt.runtime.api import Runtime

    out = {}
    shared = None  # the reference backend's LoadedModel also serves `copied` (both plain SDPA)
    for name in names:
        t0 = time.perf_counter()
        try:
            if name == "copied":
                if shared is None:
                    from softprompt.runtime.models import load_model

                    shared = load_model(model, dtype=dtype, device=device)
                out[name] = _CopiedMethod(CopiedPrefix(shared.model))
            elif name == "peft":  # its own copy of the model: PEFT wraps the module it is given
                from softprompt.runtime.models import load_model

                work = tempfile.TemporaryDirectory(prefix="softprompt-bench-peft-")
                out[name] = PeftBaseline(load_model(model, dtype=dtype, device=device).model,
                                         Path(work.name))
                out[name].tmp = work  # removed with the method
            elif name == "onnx-int4":
                from softprompt.runtime.onnx_backend import bundle_for

                path = bundle_int4 or bundle_for(model, dtype="fp32", weights="int4")
                rt = Runtime.load(str(path), backend="onnx", max_batch=max_batch,
                                  max_batch_tokens=max_batch_tokens)
                out[name] = _RuntimeMethod(name, rt)
            else:
                kw = dict(max_batch=max_batch, max_batch_tokens=max_batch_tokens)
                if name == "onnx":
                    rt = Runtime.load(model, backend="onnx", bundle_dir=bundle_dir,
                                      dtype=dtype if dtype in ("float32", "float16") else "float32",
                                      providers=["CUDAExecutionProvider"] if device.startswith("cuda")
                                      else None, **kw)
                else:
                    rt = Runtime.load(model, backend=name, device=device, dtype=dtype, **kw)
                if name == "reference" and shared is None:
                    shared = rt.backend.lm
                out[name] = _RuntimeMethod(name, rt)
            log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001 - the report says which backend and why
            out[name] = f"{type(e).__name__}: {e}"
            log(f"could not load {name}: {out[name]}")
    return out


# --------------------------------------------------------------------------------- points
@dataclass
class Result:
    backend: str
    B: int
    L: int
    P: int
    n_score: int
    dtype: str
    device: str
    status: str = "ok"  # ok | FAILED (refcheck) | ERROR: ... | UNAVAILABLE: ...
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    seq_per_s: float | None = None
    tok_per_s: float | None = None
    gflop: float | None = None
    gflop_per_s: float | None = None
    speedup_vs_peft: float | None = None  # of medians
    speedup_best: float | None = None  # of minima, over peft
    ideal_speedup: float | None = None
    max_abs_diff: float | None = None
    tol: float | None = None
    times_ms: list = field(default_factory=list)


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def make_prompt(P: int, table: np.ndarray, seed: int):
    """P rows of the embedding table (seeded): a realistic soft-prompt initialisation."""
    from softprompt.runtime.prompts import SoftPrompt

    if P == 0:
        return None
    rng = np.random.default_rng(seed + 1000 * P)
    return SoftPrompt(table[rng.integers(0, table.shape[0], P)].astype(np.float32), name=f"p{P}",
                      init="bench")


def make_ids(B: int, L: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, B, L]).integers(0, vocab, size=(B, L), dtype=np.int64)


def run_benchmark(args, log=print) -> tuple[list[Result], dict]:
    """Load every backend, then for each (B, L, P): refcheck (optional), warm up, time."""
    import torch
    from tqdm import tqdm

    from softprompt.runtime.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    env = environment(device, dtype)
    max_b = max(args.B)
    max_tokens = max(args.B) * max(args.L)
    methods = load_methods(args.backends, args.model, device, dtype, max_b, max_tokens,
                           args.bundle, log, bundle_int4=args.bundle_int4)
    # The refcheck oracle is the float32 reference backend; the FLOP model and the prompts read
    # the torch model (the oracle's, else any torch-based backend's, else a fresh CPU load).
    check_rt = None
    if args.refcheck:
        ref = methods.get("reference")
        if isinstance(ref, _RuntimeMethod) and dtype == "float32":
            check_rt = ref
        else:
            from softprompt.runtime.api import Runtime

            check_rt = _RuntimeMethod("reference", Runtime.load(
                args.model, backend="reference", device=device, dtype="float32",
                max_batch=max_b, max_batch_tokens=max_tokens))
    lm = check_rt.rt.backend.lm if check_rt else next(
        (m.rt.backend.lm for m in methods.values()
         if isinstance(m, _RuntimeMethod) and hasattr(m.rt.backend, "lm")), None)
    if lm is None:  # only copied/onnx: the loader is fast once the model is converted
        lm = load_model(args.model, device="cpu")
    dims = Dims.from_model(lm.model)
    table = lm.model.get_input_embeddings().weight.detach().float().cpu().numpy()
    env["model"] = {"name": args.model, **asdict(dims)}

    prompts = {P: make_prompt(P, table, args.seed) for P in args.P}
    everyone = list(methods.values()) + ([check_rt] if check_rt else [])
    for i, m in enumerate(everyone):
        if isinstance(m, str) or any(m is o for o in everyone[:i]):
            continue
        for P, sp in prompts.items():
            m.prepare(None if sp is None else sp.name, sp)

    results: list[Result] = []
    grid = [(B, L, P) for B in args.B for L in args.L for P in args.P]
    bar = tqdm(total=len(grid) * len(methods), desc="bench", unit="pt", disable=args.no_progress)
    for B, L, P in grid:
        n = args.score_tokens
        key = None if P == 0 else f"p{P}"
        ids = make_ids(B, L, dims.vocab_size, args.seed)
        want = check_rt.run(check_rt.requests(key, ids, n)) if check_rt else None
        live, res = {}, {}
        for name, m in methods.items():
            r = Result(name, B, L, P, n,
                       "float32" if name.startswith("onnx") and dtype == "bfloat16" else dtype,
                       device, ideal_speedup=(P + L) / L,
                       gflop=flops(dims, name, B, P, L, n) / 1e9)
            res[name] = r
            results.append(r)
            if isinstance(m, str):
                r.status = f"UNAVAILABLE: {m}"
                continue
            batch = m.requests(key, ids, n)
            try:
                got = m.run(batch)
            except Exception as e:  # noqa: BLE001
                r.status = f"ERROR: {type(e).__name__}: {e}"
                log(f"{name} B={B} L={L} P={P}: {r.status}")
                continue
            if want is not None:
                r.tol = tolerance(name, r.dtype)
                r.max_abs_diff = float(np.max(np.abs(got - want)))
                if not r.max_abs_diff <= r.tol:
                    r.status = "FAILED"
                    log(f"{name} B={B} L={L} P={P}: refcheck FAILED, max |diff| "
                        f"{r.max_abs_diff:.3g} > {r.tol:g}")
                    continue
            live[name] = (m, batch)

        def timed(name):
            m, batch = live[name]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.run(batch)  # returns host numpy: the device work is finished
            res[name].times_ms.append((time.perf_counter() - t0) * 1e3)

        if args.interleave:
            for name, (m, batch) in live.items():
                for _ in range(args.warmup):
                    m.run(batch)
            for _ in range(args.repeats):
                for name in live:
                    timed(name)
        else:
            for name, (m, batch) in live.items():
                for _ in range(args.warmup):
                    m.run(batch)
                for _ in range(args.repeats):
                    timed(name)
        for name, r in res.items():
            bar.update(1)
            if not r.times_ms:
                continue
            t = sorted(r.times_ms)
            r.median_ms = statistics.median(t)
            r.min_ms, r.max_ms = t[0], t[-1]
            r.q1_ms, r.q3_ms = _quartiles(t)
            sec = r.median_ms / 1e3
            r.seq_per_s = B / sec
            r.tok_per_s = B * L / sec
            r.gflop_per_s = r.gflop / sec
        base = res.get(BASELINE)
        for r in res.values():
            if base is not None and base.median_ms and r.median_ms:
                r.speedup_vs_peft = base.median_ms / r.median_ms
                r.speedup_best = base.min_ms / r.min_ms
        bar.set_postfix_str(f"B={B} L={L} P={P}")
    bar.close()
    return results, env


# ------------------------------------------------------------------------------- reporting
def environment(device: str, dtype: str) -> dict:
    import torch

    from softprompt import package_versions

    versions = package_versions()
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    else:
        dev = cpu_model()
    return {"device": device, "device_name": dev, "dtype": dtype, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "versions": versions, "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def command_line(args) -> str:
    """The exact command that reproduces this run (every option spelled out)."""
    parts = ["softprompt", "bench", "--model", args.model, "--backends", ",".join(args.backends),
             "--P", ",".join(map(str, args.P)), "--B", ",".join(map(str, args.B)),
             "--L", ",".join(map(str, args.L)), "--score-tokens", str(args.score_tokens),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.device:
        parts += ["--device", args.device]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.bundle:
        parts += ["--bundle", args.bundle]
    if args.bundle_int4:
        parts += ["--bundle-int4", args.bundle_int4]
    if args.refcheck:
        parts.append("--refcheck")
    if args.interleave:
        parts.append("--interleave")
    parts += ["--out", args.out]
    env = f"SOFTPROMPT_HOME={shlex.quote(os.environ['SOFTPROMPT_HOME'])} " \
        if "SOFTPROMPT_HOME" in os.environ else ""
    return env + shlex.join(parts)


def table(results: list[Result]) -> str:
    head = ("| backend | B | L | P | status | median ms | min-max ms | seq/s | tok/s | GFLOP/s "
            "| speedup vs peft (median) | speedup vs peft (min) | ideal | max abs diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"
        lines.append(
            f"| {r.backend} | {r.B} | {r.L} | {r.P} | {r.status.split(':')[0]} | "
            f"{f(r.median_ms, '.1f')} | {f(r.min_ms, '.1f')}-{f(r.max_ms, '.1f')} | "
            f"{f(r.seq_per_s, '.1f')} | {f(r.tok_per_s, '.0f')} | {f(r.gflop_per_s, '.1f')} | "
            f"{f(r.speedup_vs_peft, '.2f')} | {f(r.speedup_best, '.2f')} | "
            f"{f(r.ideal_speedup, '.2f')} | "
            f"{f(r.max_abs_diff, '.2g')} |")
    return "\n".join(lines)


def write_outputs(results: list[Result], env: dict, cmd: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    cols = [k for k in Result.__dataclass_fields__ if k != "times_ms"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in results:
            w.writerow({k: getattr(r, k) for k in cols})
    (out / "results.json").write_text(json.dumps(
        {"command": cmd, "env": env, "results": [asdict(r) for r in results]}, indent=1))
    (out / "results.md").write_text(f"`{cmd}`\n\n{table(results)}\n")
    return [out / "results.csv", out / "results.json", out / "results.md", *plot(results, env, out)]


def plot(results: list[Result], env: dict, out: Path) -> list[Path]:
    """throughput.png (seq/s vs P) and speedup.png (vs peft, with the ideal (P+L)/L)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r.B, r.L) for r in results})
    backends = list(dict.fromkeys(r.backend for r in results))
    name = env["model"]["name"]
    name = "SmolLM2-135M-Instruct" if name == "default" else Path(name).name
    title = f"{name} · {env['dtype']} · {env['device_name']} · batch scoring, 1 scored token/row"
    if len(title) > 55 * len(combos):  # one line per panel width
        title = title.replace(" · batch scoring", "\nbatch scoring")
    paths = []
    for what, ylabel in (("throughput", "sequences / s"), ("speedup", "speedup over PEFT")):
        fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.2), squeeze=False,
                                 dpi=100)
        for ax, (B, L) in zip(axes[0], combos):
            rows = [r for r in results if r.B == B and r.L == L]
            Ps = sorted({r.P for r in rows})
            x = {P: i for i, P in enumerate(Ps)}  # evenly spaced: the grid is 0, 1, 5, 20, 100, 150
            if what == "speedup":
                ax.plot(range(len(Ps)), [(P + L) / L for P in Ps], "k--", lw=1,
                        label="ideal (P+L)/L")
                ax.axhline(1.0, color=COLORS[BASELINE], lw=0.8, ls=":")
            for be in backends:
                pts = [(r.P, r.seq_per_s if what == "throughput" else r.speedup_vs_peft)
                       for r in rows if r.backend == be]
                pts = [(p, y) for p, y in pts if y is not None]
                if pts and not (what == "speedup" and be == BASELINE):
                    ax.plot([x[p] for p, _ in pts], [y for _, y in pts], "o-", ms=3.5, lw=1.4,
                            label=be, color=COLORS.get(be))
            ax.set_xticks(range(len(Ps)))
            ax.set_xticklabels([str(p) for p in Ps], fontsize=8)
            ax.set_xlabel("virtual tokens P")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.set_title(f"B={B}, L={L}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out / f"{what}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ CLI
def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {s!r}")
    return vals


def _backends(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in ALL_BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from {ALL_BACKENDS}")
    return names


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory or a "
                        ".gguf file (default: %(default)s)")
    p.add_argument("--backends", type=_backends, default=list(ALL_BACKENDS),
                   help="comma-separated among peft, reference, copied, torch, onnx, onnx-int4 "
                        "(default: all)")
    p.add_argument("--P", type=_ints, default=list(LESTER_P),
                   help="virtual-token counts; 0 = no prompt (default: Lester et al.'s grid "
                        "0,1,5,20,100,150)")
    p.add_argument("--B", type=_ints, default=[8], help="batch sizes (default: 8)")
    p.add_argument("--L", type=_ints, default=[32], help="request lengths in tokens (default: 32)")
    p.add_argument("--score-tokens", type=int, default=1,
                   help="trailing tokens of each request scored as its continuation (default: 1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype of the torch backends (default: float32 on CPU, bfloat16 "
                        "on CUDA); onnx uses an fp32 bundle unless float16 is asked")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per point (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per backend and point "
                   "(default: 2)")
    p.add_argument("--interleave", action="store_true",
                   help="alternate backends call by call instead of timing each in a block")
    p.add_argument("--refcheck", action="store_true",
                   help="check log-probs against the float32 reference before timing; a backend "
                        "that fails is reported FAILED and not timed")
    p.add_argument("--out", default="bench/out", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of token ids and prompts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                   "torch's choice)")
    p.add_argument("--bundle", default=None, help="ONNX bundle directory for backend onnx "
                   "(default: exported once under $SOFTPROMPT_HOME/bundles)")
    p.add_argument("--bundle-int4", default=None, help="4-bit bundle directory for backend "
                   "onnx-int4 (default: exported once next to the float32 bundle)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: P 0,5,20, B 2, L 8, 2 repeats, 1 warm-up (overrides those)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: combine earlier results.json files into --out (a later "
                        "file replaces the points it contains)")
    p.set_defaults(func=run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` verb to the ``softprompt`` command."""
    p = subparsers.add_parser("bench", help="benchmark backends over prompt length x batch x "
                              "request length (CSV, JSON, plots)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return configure(p)


def merge(paths: list[str], out: Path) -> int:
    """Combine results.json files into one report (CSV, JSON, table, plots) in ``out``.

    Points are keyed by (B, L, P); a later file replaces every row of a point it contains, so
    each point's speedups still come from one run (use it to re-measure points that a burst of
    load from other processes spoiled, or to append a second L)."""
    points: dict = {}
    commands, envs = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        commands.append(data["command"])
        envs.append(data["env"])
        rows: dict = {}
        for r in data["results"]:
            r = {k: v for k, v in r.items() if k in Result.__dataclass_fields__}  # older files
            rows.setdefault((r["B"], r["L"], r["P"]), []).append(Result(**r))
        points.update(rows)
    results = [r for key in sorted(points) for r in points[key]]
    env = dict(envs[-1], merged_from=[str(p) for p in paths],
               load_average=[e.get("load_average") for e in envs])
    cmd = " ; ".join(commands)
    print(table(results))
    files = write_outputs(results, env, cmd, out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def run(args) -> int:
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.quick:
        args.P, args.B, args.L, args.repeats, args.warmup = [0, 5, 20], [2], [8], 2, 1
    if args.score_tokens < 1 or any(L <= args.score_tokens for L in args.L):
        raise SystemExit("softprompt bench: need 1 <= --score-tokens < every L")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("softprompt bench: --repeats must be >= 1 and --warmup >= 0")
    cmd = command_line(args)

    def log(msg):
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    print(f"command: {cmd}", flush=True)
    results, env = run_benchmark(args, log)
    print(f"device: {env['device']} ({env['device_name']}), dtype {env['dtype']}, torch threads "
          f"{env['torch_threads']}, load average {env['load_average']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    print(table(results))
    files = write_outputs(results, env, cmd, Path(args.out))
    print("wrote " + ", ".join(str(f) for f in files))
    bad = [r for r in results if r.status != "ok"]
    for r in bad:
        print(f"not timed: {r.backend} B={r.B} L={r.L} P={r.P}: {r.status}")
    return 1 if any(r.status == "FAILED" for r in results) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softprompt.bench.driver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    args = configure(p).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
