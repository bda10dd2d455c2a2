"""Long K/V prompts (PEFT prefix tuning, cartridges): ``softprompt bench --kv-prompt``, and where
the onnx path's time goes (``python -m softprompt.bench.long_kv``).

    softprompt bench --kv-prompt --P 20,512,2048 --B 1,8 --L 32 --repeats 3 --warmup 1 \\
        --refcheck --out bench/out/kv-prompt
    python -m softprompt.bench.long_kv --B 8 --P 2048 --L 32 --repeats 5 --calibrate \\
        --out bench/out/kv-profile

A K/V prompt puts P key/value vectors per layer in front of every request (no forward, no
position of its own to compute). At P = 2048 the prefix dwarfs a request of L = 32 tokens, so
what matters is whether it is read in place or copied per row. Methods, side by side in one
process, every point a batch of B rows of L random ids (seeded) whose last ``--score-tokens``
ids are scored (the same ids for every method):

  peft-prefix  PEFT's own forward: a ``PrefixTuningConfig`` adapter of P virtual tokens made with
               ``peft.get_peft_model`` on the model (PEFT's random K/V init, seeded), float32,
               ``torch.inference_mode``, one ``PeftModelForCausalLM`` forward over the batch (PEFT
               expands the prefix to every row itself), log-softmax at the scored positions.
  torch-kv     ``Runtime(backend="torch")`` with that adapter registered
               (``add_prompt(name, adapter_dir)``): the cached prefix read in place.
  onnx-kv      ``Runtime(backend="onnx")``, the same adapter (the past assembled per row, see
               runtime/onnx_backend.py).
  plain-text   what people do without cartridges: an equally long text (P tokens) put in the
               context, one plain transformers forward over P + L tokens per row, logits only at
               the scored positions (``logits_to_keep``: the cheapest plain forward).
  torch-text   the torch runtime with that text as a composed prompt (``add_prompt(name,
               [text])``), its K/V cached once.
  onnx-text    the onnx runtime with the same composed prompt.

peft-prefix and plain-text share one model (PEFT wraps it without changing its modules); the
torch methods share one Runtime, and so do the onnx methods. When the torch runtime is loaded,
PEFT's and the plain forwards (and the adapters' creation) run on its engine thread
(``Engine.call``): PyTorch's CPU wheels keep one GNU OpenMP thread team per calling thread and
throttle them once the process has more OpenMP threads than cores, so torch work on a second
thread would slow the torch runtime down for the rest of the process (bench/RESULTS.md: 1.5x).
``--refcheck`` compares each *-kv method with peft-prefix and each *-text method with plain-text
on the point's batch, each log-prob within twice SCORE_DEFAULT_MODEL (both sides are float32
forwards of the 30-layer model, each within it of the exact value, and rounding grows with a
log-prob's magnitude: random ids under PEFT's N(0, 1) prefix score near -25), at least ONNX's
for onnx (reported: the difference nearest its bound, and that bound); a failing method is
reported FAILED and not timed. Ratios: ``peft-prefix`` median / the method's median,
``plain-text`` median / the method's median, measured at the same point in the same process.

The profile (``main`` below) measures the onnx path at one (B, P, L): end-to-end score calls
with the code as it is and with the code before this change (``legacy_run_plan``, the previous
``OnnxBackend._run_plan`` kept verbatim), on a repeated batch (the old single-batch reuse hits)
and on batches whose prompt changes every call (a scoring job's different prompt mixes), a mixed
batch (one long prompt beside short ones), the pieces (past assembly, the graph call with and
without fetching its ``present.*`` outputs, ONNX Runtime's time per operator type, ``Concat``
being the graph's own copy of the past), page faults, peak memory and the machine's copy
bandwidth; what the torch backend allocates at B = 1 and B = 8
(``torch_memory``); and with ``--calibrate`` the fit behind the onnx backend's cost model
(``calibrate``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KV_METHODS = ("peft-prefix", "torch-kv", "onnx-kv", "plain-text", "torch-text", "onnx-text")
KV_P = (20, 512, 2048)
KV_B = (1, 8)
WORDS = ("the", "of", "and", "to", "a", "in", "is", "that", "it", "was", "for", "this", "not",
         "very", "good", "model", "market", "game", "team", "price", "vote", "world")


# ----------------------------------------------------------------------------------- inputs
def make_text(tokenizer, P: int, vocab_size: int, seed: int):
    """A text of exactly ``P`` tokens (``tokenizer``: the runtime's ``Tokenizer``), seeded words
    of ``WORDS`` that the tokenizer knows; returns the ``str`` when it tokenises alone to P ids,
    else a ``Text`` part holding the ids (so the composed prompt has P tokens either way)."""
    from softprompt.runtime.prompt_kinds import Text

    rng = np.random.default_rng([seed, P])
    known = [w for w in WORDS if all(i < vocab_size for i in tokenizer.encode(" " + w, False))]
    words = list(rng.choice(known, P))
    text = " ".join(words)
    for _ in range(4 * P):  # most words are one token; adjust the count to exactly P
        n = len(tokenizer.encode(text, False))
        if n == P:
            return text, tuple(tokenizer.encode(text, False))
        words = words[:-1] if n > P else words + [str(rng.choice(known))]
        text = " ".join(words)
    ids = tuple(tokenizer.encode(text, False))[:P]
    return Text(text, ids), ids


class PeftPrefix:
    """``peft-prefix``: PREFIX_TUNING adapters made with ``get_peft_model`` on ``model`` (one per
    P, as named adapters of one PeftModel), saved for the runtimes, and PEFT's forward timed."""

    name = "peft-prefix"

    def __init__(self, model, workdir: Path, seed: int, call=None):
        import torch

        self.torch, self.base, self.workdir, self.seed = torch, model, workdir, seed
        self.call = call or (lambda fn: fn())  # the thread torch work runs on
        self.peft = None
        self.device = next(model.parameters()).device

    def make(self, key: str, P: int) -> Path:
        """A PREFIX_TUNING adapter of ``P`` virtual tokens (PEFT's init, seeded by P), saved
        under the work directory; returns the adapter directory."""
        return self.call(lambda: self._make(key, P))

    def _make(self, key: str, P: int) -> Path:
        from peft import PrefixTuningConfig, get_peft_model

        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        self.torch.manual_seed(self.seed * 100003 + P)
        if self.peft is None:
            self.peft = get_peft_model(self.base, config, adapter_name=key).eval()
        else:
            self.peft.add_adapter(key, config)
        self.peft.set_adapter(key)
        out = self.workdir / key
        self.peft.save_pretrained(str(out), selected_adapters=[key])
        found = [p.parent for p in out.rglob("adapter_config.json")]
        if len(found) != 1:
            raise RuntimeError(f"PEFT saved {len(found)} adapter configs under {out}")
        return found[0]

    def prepare(self, key, prompt) -> None:
        pass  # made by make()

    def requests(self, key, ids: np.ndarray, n_score: int):
        return key, self.torch.as_tensor(ids, device=self.device), n_score

    def run(self, batch) -> np.ndarray:
        return self.call(lambda: self._run(batch))

    def _run(self, batch) -> np.ndarray:
        torch = self.torch
        key, ids, n = batch
        with torch.inference_mode():
            self.peft.set_adapter(key)
            logits = self.peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # [B, L, V]
            lp = logits[:, -n - 1:-1].float().log_softmax(-1)
            return lp.gather(-1, ids[:, -n:, None])[..., 0].cpu().numpy().astype(np.float64)


class PlainText:
    """``plain-text``: the text's ids in front of every request, one plain forward over P + L
    tokens per row, logits only at the positions predicting the scored ids."""

    name = "plain-text"

    def __init__(self, model, call=None):
        import torch

        self.torch, self.model = torch, model
        self.call = call or (lambda fn: fn())
        self.device = next(model.parameters()).device
        self.text: dict = {}

    def prepare(self, key, ids) -> None:
        self.text[key] = self.torch.tensor(list(ids), dtype=self.torch.long, device=self.device)

    def requests(self, key, ids: np.ndarray, n_score: int):
        torch = self.torch
        req = torch.as_tensor(ids, device=self.device)
        full = torch.cat([self.text[key].expand(len(ids), -1), req], 1)  # [B, P + L]
        return full, n_score

    def run(self, batch) -> np.ndarray:
        return self.call(lambda: self._run(batch))

    def _run(self, batch) -> np.ndarray:
        torch = self.torch
        full, n = batch
        T = full.shape[1]
        with torch.inference_mode():
            keep = torch.arange(T - n - 1, T - 1, device=self.device)
            logits = self.model(input_ids=full, logits_to_keep=keep).logits  # [B, n, V]
            lp = logits.float().log_softmax(-1)
            return lp.gather(-1, full[:, -n:, None])[..., 0].cpu().numpy().astype(np.float64)


class RuntimeScore:
    """A Runtime scoring the batch under one registered prompt (``add_prompt(key, source)``)."""

    def __init__(self, name: str, rt):
        self.name, self.rt = name, rt

    def prepare(self, key, source) -> None:
        self.rt.add_prompt(key, source)

    def requests(self, key, ids: np.ndarray, n_score: int) -> list[dict]:
        return [{"prompt": key, "context": row[:-n_score].tolist(),
                 "continuation": row[-n_score:].tolist()} for row in ids]

    def run(self, batch) -> np.ndarray:
        return np.array([r.token_logprobs for r in self.rt.score(batch)], dtype=np.float64)


def baseline_of(method: str) -> str:
    return "plain-text" if method.endswith("-text") else "peft-prefix"


def kv_tolerance(method: str, want: np.ndarray) -> np.ndarray:
    """The refcheck bound of each log-prob ``want`` of the baseline: twice SCORE_DEFAULT_MODEL
    (two float32 forwards, each within it of the exact value), at least ONNX's for onnx."""
    from softprompt.tolerances import ONNX, SCORE_DEFAULT_MODEL

    t = SCORE_DEFAULT_MODEL["float32"]
    tol = 2 * (t["atol"] + t["rtol"] * np.abs(want))
    return np.maximum(tol, ONNX["float32"]["atol"]) if method.startswith("onnx") else tol


# ------------------------------------------------------------------------------------ sweep
def run_kv_benchmark(args, log=print):
    """``softprompt bench --kv-prompt``: every method in ``args.kv_methods`` at each (B, L, P);
    returns (driver ``Result`` rows, environment record)."""
    import torch

    from softprompt.bench.driver import Result, _quartiles, environment
    from softprompt.models import load_model
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.requests import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or "cpu"
    if device != "cpu":
        raise SystemExit("softprompt bench --kv-prompt: CPU only (float32), pass --device cpu")
    methods = list(args.kv_methods)
    env = environment(device, "float32")
    work = tempfile.TemporaryDirectory(prefix="softprompt-bench-kv-")
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32", device=device)
    tok = Tokenizer.for_model(lm)
    vocab = int(lm.model.config.vocab_size)
    kw = dict(max_batch=max(args.B), max_batch_tokens=max(args.B) * max(args.L))
    rts = {}
    if any(m.startswith("torch") for m in methods):
        rts["torch"] = Runtime.load(args.model, backend="torch", device="cpu", dtype="float32", **kw)
    if any(m.startswith("onnx") for m in methods):
        rts["onnx"] = Runtime.load(args.model, backend="onnx", bundle_dir=args.bundle, **kw)
    call = rts["torch"].engine.call if "torch" in rts else None  # one thread for torch work
    peft = PeftPrefix(lm.model, Path(work.name), args.seed, call)
    plain = PlainText(lm.model, call)
    log(f"loaded the model, {', '.join(rts)} runtimes in {time.perf_counter() - t0:.1f} s")
    impl = {"peft-prefix": peft, "plain-text": plain}
    for m in methods:
        if m not in impl:
            impl[m] = RuntimeScore(m, rts[m.split("-")[0]])
    lengths = {}
    for P in args.P:  # prompts made and registered (prefixes computed) before any timing
        kv_dir = peft.make(f"kv{P}", P)
        text, ids = make_text(tok, P, vocab, args.seed)
        lengths[P] = len(ids)
        plain.prepare(f"text{P}", ids)
        for m in methods:
            if m.endswith("-kv"):
                impl[m].prepare(f"kv{P}", str(kv_dir))
            elif m.endswith("-text") and m != "plain-text":
                impl[m].prepare(f"text{P}", [text])
                got = tuple(impl[m].rt.prompts[f"text{P}"].parts[0].ids)
                if got != tuple(ids):
                    raise RuntimeError(f"{m}: the composed text prompt has {len(got)} tokens, "
                                       f"the plain-text baseline {len(ids)}")
    env["model"] = {"name": args.model, "num_layers": lm.model.config.num_hidden_layers}
    env["text_tokens"] = lengths
    results = []
    for B in args.B:
        for L in args.L:
            for P in args.P:
                n = args.score_tokens
                ids = np.random.default_rng([args.seed, B, L]).integers(0, vocab, (B, L), dtype=np.int64)
                batches, res, ref = {}, {}, {}
                for m in methods:
                    key = f"text{P}" if m.endswith("-text") else f"kv{P}"
                    r = Result(m, B, L, P, n, "float32", env["device_name"])
                    res[m] = r
                    results.append(r)
                    batch = impl[m].requests(key, ids, n)
                    try:
                        got = impl[m].run(batch)
                    except Exception as e:  # noqa: BLE001 - reported per point
                        r.status = f"ERROR: {type(e).__name__}: {e}"
                        log(f"{m} B={B} L={L} P={P}: {r.status}")
                        continue
                    ref[m] = got
                    batches[m] = batch
                for m in methods:  # refcheck against the baseline of the method's kind
                    base = baseline_of(m)
                    if m == base or m not in ref or base not in ref:
                        continue
                    r = res[m]
                    diff, tol = np.abs(ref[m] - ref[base]), kv_tolerance(m, ref[base])
                    worst = np.unravel_index(np.argmax(diff / tol), diff.shape)
                    r.max_abs_diff, r.tol = float(diff[worst]), float(tol[worst])  # nearest its bound
                    if args.refcheck and not np.all(diff <= tol):
                        r.status = "FAILED"
                        log(f"{m} B={B} L={L} P={P}: refcheck FAILED, max |diff| vs {base} "
                            f"{r.max_abs_diff:.3g} > {r.tol:g}")
                        del batches[m]
                live = list(batches)

                def timed(m):
                    t = time.perf_counter()
                    impl[m].run(batches[m])
                    res[m].times_ms.append((time.perf_counter() - t) * 1e3)

                for m in live:
                    for _ in range(args.warmup):
                        impl[m].run(batches[m])
                    if not args.interleave:
                        for _ in range(args.repeats):
                            timed(m)
                if args.interleave:
                    for _ in range(args.repeats):
                        for m in live:
                            timed(m)
                for m in live:
                    r, t = res[m], sorted(res[m].times_ms)
                    r.median_ms, r.min_ms, r.max_ms = statistics.median(t), t[0], t[-1]
                    r.q1_ms, r.q3_ms = _quartiles(t)
                    r.seq_per_s, r.tok_per_s = B / r.median_ms * 1e3, B * L / r.median_ms * 1e3
                for m in live:
                    r = res[m]
                    for attr, base in (("speedup_vs_peft", "peft-prefix"), ("speedup_vs_text", "plain-text")):
                        b = res.get(base)
                        if b is not None and b.median_ms:
                            setattr(r, attr, b.median_ms / r.median_ms)
                    b = res.get("peft-prefix")
                    if b is not None and b.min_ms:
                        r.speedup_best = b.min_ms / r.min_ms
                log(f"B={B} L={L} P={P}: " + ", ".join(
                    f"{m} {res[m].median_ms:.0f} ms" for m in live))
    for rt in rts.values():
        rt.close()
    work.cleanup()
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results, env


def kv_table(results) -> str:
    head = ("| method | B | L | P | status | median ms | min-max ms | vs peft-prefix (its median / "
            "median) | vs plain-text (its median / median) | abs diff vs baseline (bound) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for r in results:
        lines.append(f"| {r.backend} | {r.B} | {r.L} | {r.P} | {r.status.split(':')[0]} | "
                     f"{f(r.median_ms, '.1f')} | {f(r.min_ms, '.1f')}-{f(r.max_ms, '.1f')} | "
                     f"{f(r.speedup_vs_peft, '.2f')} | {f(r.speedup_vs_text, '.2f')} | "
                     f"{f(r.max_abs_diff, '.2g')} ({f(r.tol, '.2g')}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- profile
def legacy_run_plan(be, plan, index, rows=None, entries=None):
    """``OnnxBackend._run_plan`` before this change (commit 857db0f), kept verbatim for the
    profile's before/after: a fresh zero past per batch with one copy of the prefix per row
    (the last batch's past reused when its rows and prompts are identical). ``rows`` and
    ``entries`` are ignored (that code ran all rows in one call; ``legacy`` also turns off the
    grouping)."""
    b = be.bundle
    entries = [be.entry(p) for p in plan.prompts] + [be._empty]  # the empty slot last
    rows = [entries[i] for i in plan.prompt_idx]
    B, L = plan.B, plan.L_max
    p_max = max(e.num_tokens for e in rows)
    key = (tuple(e.num_tokens for e in rows), tuple(
        p.digest for p in plan.prompts), tuple(plan.prompt_idx.tolist()))
    last = getattr(be, "_last_past", (None, None))
    if last[0] == key:
        past = last[1]
    else:
        past = []
        for layer in range(b.num_layers):
            k = np.zeros((B, b.num_kv_heads, p_max, b.head_dim), b.np_dtype)
            v = np.zeros_like(k)
            for i, e in enumerate(rows):
                k[i, :, : e.num_tokens] = e.keys[layer]
                v[i, :, : e.num_tokens] = e.values[layer]
            past.append((k, v))
        fits = be.cache.bytes + sum(k.nbytes + v.nbytes for k, v in past) <= be.cache.max_bytes
        be._last_past = (key, past) if fits else (None, None)
    mask = np.zeros((B, p_max + L), np.int64)
    for i, e in enumerate(rows):
        mask[i, : e.num_tokens] = 1
    mask[:, p_max:] = np.arange(L)[None] < plan.q_lens[:, None]
    emb = b.embeddings[plan.ids].astype(b.np_dtype, copy=False)  # [B, L, E]
    be.tokens_computed += plan.tokens
    be.batches += 1
    logits, out = b.run(emb, mask, plan.positions, past, index)
    return logits, out, mask, entries


@contextlib.contextmanager
def legacy(be):
    """The onnx backend ``be`` runs its batches as before this change (``legacy_run_plan``, no
    grouping) inside the block."""
    from softprompt.runtime import onnx_backend

    group_rows = onnx_backend.group_rows
    be._run_plan = lambda *a, **k: legacy_run_plan(be, *a, **k)
    onnx_backend.group_rows = lambda prefix_lens, q_lens, max_positions=None: [np.arange(len(q_lens))]
    try:
        yield
    finally:
        del be._run_plan
        be._last_past = (None, None)
        onnx_backend.group_rows = group_rows


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn, repeats: int, setup=None) -> dict:
    """min / median / max wall ms of ``fn()`` over ``repeats`` calls (``setup()`` before each,
    untimed), minor page faults per call (median) and the peak RSS above the RSS before the call
    (MiB, the largest over the calls; None where the peak cannot be reset)."""
    times, faults, peaks = [], [], []
    for _ in range(repeats):
        if setup is not None:
            setup()
        reset = _reset_peak()
        rss, f0, t0 = _rss_kb("VmRSS"), _faults(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(_faults() - f0)
        if reset:
            peaks.append((_rss_kb("VmHWM") - rss) / 1024)
    return {"min_ms": min(times), "median_ms": statistics.median(times), "max_ms": max(times),
            "faults": int(statistics.median(faults)), "peak_mib": max(peaks) if peaks else None}


def random_kv(N: int, H: int, P: int, D: int, seed: int, name: str):
    from softprompt.runtime.prompt_kinds import KVPrompt

    rng = np.random.default_rng(seed)
    return KVPrompt(rng.standard_normal((N, H, P, D), dtype=np.float32),
                    rng.standard_normal((N, H, P, D), dtype=np.float32), name=name)


def profile_onnx(B: int, P: int, L: int, repeats: int, model: str = "default", bundle=None,
                 log=print) -> dict:
    """Where an onnx score call over B rows under a P-token K/V prompt spends its time, before
    (``legacy``) and after this change; see the module docstring."""
    from softprompt.bench import cpu_floor
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.plan import BatchPlan

    rt = Runtime.load(model, backend="onnx", bundle_dir=bundle, max_batch=B, max_batch_tokens=B * L)
    be = rt.backend
    N, H, D = be.num_layers, be.num_kv_heads, be.head_dim
    for name, seed, n in (("a", 1, P), ("b", 2, P), ("short", 3, 20)):
        rt.add_prompt(name, random_kv(N, H, n, D, seed, name))
    ids = np.random.default_rng([0, B, L]).integers(0, be.vocab_size, (B, L))

    def reqs(prompts):
        return [{"prompt": p, "context": r[:-1].tolist(), "continuation": r[-1:].tolist()}
                for p, r in zip(prompts, ids)]

    same = reqs(["a"] * B)
    flip = [reqs(["a"] * B), reqs(["b"] * B)]  # every row's prompt changes every call
    mixed = reqs(["a"] + ["short"] * (B - 1))
    state = {"i": 0}

    def alternate():
        state["i"] += 1
        rt.score(flip[state["i"] % 2])

    out: dict = {"B": B, "P": P, "L": L, "repeats": repeats}
    past_bytes = B * 2 * N * H * P * D * 4
    out["past_mib"] = past_bytes / 2**20
    out["presents_mib"] = B * 2 * N * H * (P + L) * D * 4 / 2**20
    for label, ctx in (("before", lambda: legacy(be)), ("after", contextlib.nullcontext)):
        with ctx():
            for case, fn in (("same batch", lambda: rt.score(same)), ("prompt changes", alternate),
                             ("mixed P", lambda: rt.score(mixed))):
                fn()
                fn()  # warm: the kept pasts exist, ORT's arena has grown
                out[f"{label}: {case}"] = measure(fn, repeats)
                log(f"{label}: {case}: {out[f'{label}: {case}']}")
    # the pieces, at this (B, P, L), one prompt for all rows
    plan = BatchPlan.build([rt.check(r) for r in same])
    entries = be._entries(plan)
    e = entries[0]

    def fresh_past():
        past = []
        for layer in range(N):
            k = np.zeros((B, H, P, D), np.float32)
            v = np.zeros_like(k)
            for i in range(B):
                k[i] = e.keys[layer]
                v[i] = e.values[layer]
            past.append((k, v))
        return past

    kept = fresh_past()

    def copy_into_kept():
        for layer, (k, v) in enumerate(kept):
            for i in range(B):
                k[i] = e.keys[layer]
                v[i] = e.values[layer]

    out["assemble: fresh zeros + per-row copy (before)"] = measure(fresh_past, repeats)
    out["assemble: per-row copy into a kept buffer (after, every row changed)"] = measure(
        copy_into_kept, repeats)
    src = [np.copy(k) for k, _ in kept]  # as large as the past's keys: no cache holds it

    def bandwidth():
        for s, (k, _) in zip(src, kept):
            np.copyto(k, s)

    bw = measure(bandwidth, repeats)
    out["memcpy GB/s (past-sized keys, out of cache)"] = past_bytes / 2 / (bw["min_ms"] / 1e3) / 1e9
    b = be.bundle
    mask = np.ones((B, P + L), np.int64)
    emb = b.embeddings[plan.ids].astype(np.float32)
    index = plan.target_cols.reshape(B, 1)
    feed = {"inputs_embeds": emb, "attention_mask": mask, "position_ids": plan.positions,
            "logits_index": index}
    for i, (k, v) in enumerate(kept):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    out["graph call (Bundle.run: every output fetched)"] = measure(
        lambda: b.run(emb, mask, plan.positions, kept, index), repeats)
    out["graph call, logits only (ORT never hands back the presents; tried, not kept)"] = measure(
        lambda: b.session.run(b.output_names[:1], feed), repeats)
    rt.close()
    kept.clear()  # free them before the profiler run
    be._pasts.clear()
    src.clear()
    ops = cpu_floor.profile(be.bundle.path, B=B, P=P, L=L, repeats=max(2, repeats // 2))
    out["ORT profiler: kernel ms by op"] = ops["top_ops"]
    out["ORT profiler: graph median ms"] = ops["median_ms"]
    return out


def torch_memory(P: int, L: int, batches=(1, 8), model: str = "default", log=print) -> dict:
    """The torch backend under a P-token K/V prompt: what one score call allocates at each B,
    from PyTorch's profiler (``profile_memory``: every CPU allocation and free, the call run on
    this thread through ``TorchBackend.score``): the peak of bytes allocated above the start, the
    bytes allocated over the call, the largest single allocation and how many allocations have
    the size of one layer's keys copied per row (``[B, Hkv, P, D]``); beside the stacked prefix
    it reads (``stack_bytes``: ``[Np, Hkv, P, D]`` per layer) and what a per-row copy would take."""
    import torch

    from softprompt.runtime.api import Runtime
    from softprompt.runtime.plan import BatchPlan

    B_max = max(batches)
    rt = Runtime.load(model, backend="torch", device="cpu", dtype="float32", max_batch=B_max,
                      max_batch_tokens=B_max * L)
    be = rt.backend
    N, H, D = be.num_layers, be.num_kv_heads, be.head_dim
    rt.add_prompt("a", random_kv(N, H, P, D, 1, "a"))
    out: dict = {"P": P, "L": L, "prefix_mib": 2 * N * H * P * D * 4 / 2**20}
    for B in batches:
        ids = np.random.default_rng([0, B, L]).integers(0, be.vocab_size, (B, L))
        plan = BatchPlan.build([rt.check({"prompt": "a", "context": r[:-1].tolist(),
                                          "continuation": r[-1:].tolist()}) for r in ids])
        be.score(plan)  # warm: the prefix stack is planned
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            be.score(plan)
        trace = Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(trace))
        mem = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
               if e.get("name") == "[memory]"]
        trace.unlink()
        total = [m["Total Allocated"] for m in mem] or [0]
        sizes = [m["Bytes"] for m in mem if m["Bytes"] > 0]
        row_copy = B * H * P * D * 4
        out[f"B={B}"] = {"peak_alloc_mib": (max(total) - total[0]) / 2**20,
                         "allocated_mib": sum(sizes) / 2**20,
                         "largest_alloc_mib": max(sizes, default=0) / 2**20,
                         "allocs_of_per_row_layer_size": sum(x == row_copy for x in sizes),
                         "stack_mib": rt.stats()["stack_bytes"] / 2**20,
                         "per_row_copy_mib": B * out["prefix_mib"]}
        log(f"torch B={B}: {out[f'B={B}']}")
    rt.close()
    return out


CALIBRATION_GRID = ((1, 1, 0), (1, 8, 0), (1, 32, 0), (4, 32, 0), (8, 32, 0), (8, 8, 0),
                    (1, 32, 512), (1, 32, 2048), (8, 32, 20), (8, 32, 512), (8, 32, 2048),
                    (8, 8, 2048), (4, 32, 2048), (2, 32, 1024), (8, 8, 512))


def calibrate(model: str = "default", bundle=None, repeats: int = 5, grid=CALIBRATION_GRID,
              log=print) -> dict:
    """The cost model of runtime/onnx_backend.py (``call_cost``): the bare graph call over
    (B, L, P) on ``grid`` (fastest of ``repeats``, random past), and the least-squares fit
    ``ms = call + tok * B*L + past * B*P + attn * B*P*L``, also in request-token units (each
    term / tok), which ``CALL_TOKENS``, ``PAST_TOKENS`` and ``ATTN_TOKENS`` hold."""
    from softprompt.export import bundle_for
    from softprompt.export.bundle import load_bundle

    b = load_bundle(bundle or bundle_for(model, dtype="fp32"))
    N, H, D = b.num_layers, b.num_kv_heads, b.head_dim
    rng = np.random.default_rng(0)
    points = []
    for B, L, P in grid:
        past = [(rng.standard_normal((B, H, P, D), dtype=np.float32),
                 rng.standard_normal((B, H, P, D), dtype=np.float32)) for _ in range(N)]
        args = (b.embeddings[rng.integers(0, b.vocab_size, (B, L))].astype(np.float32),
                np.ones((B, P + L), np.int64), np.tile(np.arange(P, P + L), (B, 1)), past,
                np.full((B, 1), L - 1, np.int64))
        b.run(*args)
        m = measure(lambda: b.run(*args), repeats)
        points.append({"B": B, "L": L, "P": P, "min_ms": m["min_ms"], "median_ms": m["median_ms"]})
        log(f"graph B={B} L={L} P={P}: {m['min_ms']:.1f} ms")
    A = np.array([[1, p["B"] * p["L"], p["B"] * p["P"], p["B"] * p["P"] * p["L"]] for p in points], float)
    y = np.array([p["min_ms"] for p in points])
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    for p, fit in zip(points, A @ coef):
        p["fit_ms"] = float(fit)
    names = ("call", "tok", "past", "attn")
    return {"points": points, "fit_ms": dict(zip(names, map(float, coef))),
            "fit_tokens": {n: float(c / coef[1]) for n, c in zip(names, coef)},
            "max_rel_error": float(np.max(np.abs(A @ coef - y) / y))}


def main(argv=None) -> int:
    from softprompt.bench.driver import environment

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.long_kv",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--bundle", default=None, help="ONNX bundle directory (default: the model's)")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--P", type=int, default=2048)
    p.add_argument("--L", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the torch memory check")
    p.add_argument("--calibrate", action="store_true",
                   help="also fit the onnx backend's cost model (CALL/PAST/ATTN_TOKENS) on bare "
                        "graph calls over B 1..8, L 1..32, P 0..2048")
    p.add_argument("--out", default="bench/out/kv-profile")
    args = p.parse_args(argv)
    cmd = "python -m softprompt.bench.long_kv " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {cmd}", flush=True)
    env = environment("cpu", "float32")
    res = {"command": cmd, "env": env,
           "onnx": profile_onnx(args.B, args.P, args.L, args.repeats, args.model, args.bundle)}
    if not args.no_torch:
        res["torch"] = torch_memory(args.P, args.L, (1, args.B), args.model)
    if args.calibrate:
        res["calibration"] = calibrate(args.model, args.bundle, args.repeats)
    res["env"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
