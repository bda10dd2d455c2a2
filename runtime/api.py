"""``Runtime``: the one entry point. Prompts in, requests in, batches out to a backend.

    rt = Runtime.load("default", backend="auto")      # onnx on CPU, torch + Triton on CUDA
    rt.add_prompt("sentiment", "path/to/peft_adapter")
    rt.score([{"prompt": "sentiment", "context": "Review: great!\\nSentiment:",
               "continuation": " positive"}])
    rt.classify("sentiment", ["Review: awful.\\nSentiment:"], [" positive", " negative"])
    rt.generate("sentiment", ["Write a review:"], max_new_tokens=20)

Backends implement five calls on prepared ``Row``s: ``prepare(prompt)`` (cache its prefix),
``forget(prompt)``, ``logprobs(rows)``, and for generation ``start(rows, max_new_tokens,
greedy)``, ``step(state, next_ids, greedy)`` (each returns the next-token logits ``[B, V]``, or
with ``greedy`` only their argmax ids ``[B]``, so a GPU sends B integers to the host instead of
B x V floats), ``select(state, keep)``. Everything else (validation, tokenising,
batching, sampling, stop strings, threads) lives here, once, for all of them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .prompts import DEFAULT_MAX_VIRTUAL_TOKENS, SoftPrompt, SoftPromptError
from .requests import (ClassifyResult, GenerateParams, GenerateResult, RequestError, Row,
                       ScoreRequest, ScoreResult, Tokenizer, as_request, log_softmax, to_ids)

BACKENDS = ("auto", "onnx", "torch", "reference")


class Runtime:
    """Serve soft prompts over one frozen causal LM.

    Build it with :meth:`Runtime.load`. Thread-safe: calls from many threads are serialised
    around the backend (which itself uses every core); use :meth:`submit` to have concurrent
    single requests gathered into batches.
    """

    def __init__(self, backend, tokenizer: Tokenizer, *, model_name: str | None = None,
                 max_batch_tokens: int = 4096, max_batch: int = 64,
                 max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS, strict: bool = False):
        for arg, val in (("max_batch_tokens", max_batch_tokens), ("max_batch", max_batch),
                         ("max_virtual_tokens", max_virtual_tokens)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {val!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch = max_batch
        self.max_virtual_tokens = max_virtual_tokens
        self.strict = strict
        self.prompts: dict[str, SoftPrompt] = {}
        self._lock = threading.RLock()  # one backend call at a time
        self._gen_lock = threading.Lock()  # one generation at a time (its steps take _lock each)
        self._batcher = None
        self.requests_served = 0

    # ------------------------------------------------------------------------------ load
    @classmethod
    def load(cls, model="default", backend: str = "auto", *, device: str | None = None,
             dtype: str | None = None, max_batch_tokens: int = 4096, max_batch: int = 64,
             prefix_cache_bytes: int = 1 << 30, max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
             strict: bool = False, providers: Sequence[str] | None = None,
             bundle_dir: str | Path | None = None, cuda_graphs: bool | None = None) -> "Runtime":
        """Load a model and a backend.

        Args:
            model: ``"default"`` (SmolLM2-135M-Instruct), a Hugging Face model directory, a
                ``.gguf`` file, an exported bundle directory (``bundle.json``; onnx only), or
                a ``LoadedModel``.
            backend: ``"onnx"`` (ONNX Runtime over an exported bundle; a model that is not a
                bundle is exported once into ``$SOFTPROMPT_HOME/bundles``), ``"torch"``
                (transformers + cached prefix; Triton attention on CUDA), ``"reference"``
                (PEFT semantics, prompt recomputed every call) or ``"auto"`` (torch on a CUDA
                device, onnx on CPU).
            device: torch device for the torch backends (default: cuda if available, else cpu).
            dtype: ``float32`` (default on CPU), ``float16`` or ``bfloat16`` (default on CUDA).
            max_batch_tokens: cap on B x L_max per forward; larger calls are split.
            max_batch: cap on rows per forward.
            prefix_cache_bytes: byte budget of the prefix cache (LRU beyond it).
            max_virtual_tokens: largest P accepted by :meth:`add_prompt`.
            strict: raise instead of warning when a prompt was made for another base model.
            providers: ONNX Runtime execution providers (default CPU; CUDA uses IOBinding).
            bundle_dir: where backend="onnx" exports a non-bundle model (default under
                ``$SOFTPROMPT_HOME/bundles``).
            cuda_graphs: torch backend: replay forwards and decode steps as CUDA graphs, one
                per padded shape (default: on CUDA; see runtime/graphs.py).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        is_bundle = isinstance(model, (str, Path)) and (Path(model) / "bundle.json").is_file()
        if backend == "auto":
            backend = "torch" if _cuda_available() and not is_bundle else "onnx"
        if cuda_graphs is not None and backend != "torch":
            raise ValueError(f"cuda_graphs applies to backend='torch' only, got backend={backend!r}")
        kw = dict(max_batch_tokens=max_batch_tokens, max_batch=max_batch,
                  max_virtual_tokens=max_virtual_tokens, strict=strict)
        if backend == "onnx":
            from .onnx_backend import OnnxBackend, bundle_for

            path = Path(model) if is_bundle else bundle_for(model, dtype=dtype, out_dir=bundle_dir)
            be = OnnxBackend(path, providers=providers, prefix_cache_bytes=prefix_cache_bytes)
            return cls(be, be.tokenizer, model_name=be.model_name, **kw)
        if is_bundle:
            raise ValueError(f"{model} is an ONNX bundle: it serves only backend='onnx' "
                             "(the torch backends need the Hugging Face model)")
        from .models import display_name, eos_token_ids, load_model

        if device is None:
            device = "cuda" if _cuda_available() else "cpu"
        if dtype is None:
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        lm = load_model(model, dtype=dtype, device=device)
        if backend == "torch":
            from .torch_backend import TorchBackend

            be = TorchBackend(lm, prefix_cache_bytes=prefix_cache_bytes, cuda_graphs=cuda_graphs)
        else:
            from .reference import ReferenceBackend

            be = ReferenceBackend(lm)
        tok = Tokenizer.for_model(lm)
        return cls(be, tok, model_name=display_name(lm.source), **kw)

    # --------------------------------------------------------------------------- prompts
    def add_prompt(self, name: str, source, *, allow_pickle: bool = False) -> SoftPrompt:
        """Register (or replace) soft prompt ``name`` and compute its prefix now.

        source: a PEFT adapter directory, a ``.safetensors``/``.npy`` file (``.bin``/``.pt``
        with ``allow_pickle=True``), a SoftPrompt, or a ``[P, E]`` tensor/array.
        Replacing a prompt invalidates exactly the old prompt's cache entry.
        """
        if not isinstance(name, str) or not name:
            raise SoftPromptError(f"prompt name must be a non-empty string, got {name!r}")
        sp = SoftPrompt.load(source, name=name, allow_pickle=allow_pickle)
        sp.name = name
        sp.validate(self.backend.hidden_size, self.max_virtual_tokens)
        if sp.num_virtual_tokens >= self.backend.max_positions:
            raise SoftPromptError(f"soft prompt {name!r} has {sp.num_virtual_tokens} virtual "
                                  f"tokens but the model has only {self.backend.max_positions} positions")
        sp.check_base_model(self.backend.fingerprint, self.model_name, strict=self.strict)
        with self._lock:
            old = self.prompts.get(name)
            self.prompts[name] = sp
            if old is not None and old.digest != sp.digest:
                self._forget_if_unused(old)
            self.backend.prepare(sp)
        return sp

    def remove_prompt(self, name: str) -> None:
        """Unregister ``name`` and drop its cached prefix."""
        with self._lock:
            sp = self.prompts.pop(name, None)
            if sp is None:
                raise KeyError(f"unknown prompt {name!r}; known: {sorted(self.prompts)}")
            self._forget_if_unused(sp)

    def _forget_if_unused(self, sp: SoftPrompt) -> None:
        if all(p.digest != sp.digest for p in self.prompts.values()):
            self.backend.forget(sp)

    # -------------------------------------------------------------------------- requests
    def _row(self, request, extra_positions: int = 0) -> Row:
        r = as_request(request)
        prompt = None
        if r.prompt is not None:
            prompt = self.prompts.get(r.prompt)
            if prompt is None:
                raise RequestError(f"unknown prompt {r.prompt!r}; known: {sorted(self.prompts)}")
        V = self.backend.vocab_size
        ctx = to_ids(r.context, self.tokenizer, True, "context", V)
        if not ctx:
            raise RequestError("empty context: expected at least one token")
        cont = None
        if r.continuation is not None:
            cont = to_ids(r.continuation, self.tokenizer, False, "continuation", V)
            if not cont:
                raise RequestError("empty continuation: expected at least one token (or None "
                                   "to score the context)")
        P = 0 if prompt is None else prompt.num_virtual_tokens
        if cont is None and P == 0 and len(ctx) < 2:
            raise RequestError("without a prompt or continuation there is nothing to score: "
                               "expected a context of at least 2 tokens")
        ids = ctx + (cont or [])
        total = P + len(ids) + extra_positions
        if total > self.backend.max_positions:
            raise RequestError(f"input too long: {P} virtual + {len(ids)} request tokens"
                               + (f" + {extra_positions} new" if extra_positions else "")
                               + f" = {total} positions, the model has {self.backend.max_positions}")
        start = len(ctx) if cont is not None else (0 if P else 1)
        return Row(prompt, ids, start)

    def _prepare(self, requests, errors: str, extra_positions: int = 0):
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        rows, failed = [], {}
        for i, req in enumerate(requests):
            try:
                rows.append(self._row(req, extra_positions))
            except (RequestError, SoftPromptError) as e:
                if errors == "raise":
                    raise RequestError(f"request {i}: {e}") from None
                rows.append(None)
                failed[i] = str(e)
        return rows, failed

    def _batches(self, rows: list[Row | None]) -> Iterable[list[int]]:
        """Indices of valid rows grouped into forwards: longest first, B <= max_batch and
        B x L_max <= max_batch_tokens (a row longer than that runs alone)."""
        order = sorted((i for i, r in enumerate(rows) if r is not None),
                       key=lambda i: -len(rows[i].ids))
        batch: list[int] = []
        for i in order:
            l_max = len(rows[batch[0]].ids) if batch else len(rows[i].ids)
            if batch and (len(batch) >= self.max_batch or
                          (len(batch) + 1) * l_max > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def score(self, requests: Sequence, *, errors: str = "raise",
              progress: bool = False) -> list[ScoreResult]:
        """Log-probability of each request's continuation (or its context without one).

        requests: dicts ``{"prompt", "context", "continuation"}`` or ScoreRequest.
        errors: ``"raise"`` (a bad request raises RequestError naming its index before any
            work) or ``"return"`` (its result carries ``.error``; the others are scored).
        progress: show a tqdm bar over the batches (for large offline scoring jobs).
        Returns one ScoreResult per request, in order.
        """
        rows, failed = self._prepare(requests, errors)
        return self._score_rows(rows, failed, progress)

    def _score_rows(self, rows, failed: dict, progress: bool = False) -> list[ScoreResult]:
        results = [ScoreResult(error=failed[i]) if i in failed else None for i in range(len(rows))]
        batches = list(self._batches(rows))
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="scoring", unit="batch")
        for idx in batches:
            with self._lock:
                lps = self.backend.logprobs([rows[i] for i in idx])
            for i, lp in zip(idx, lps):
                r = rows[i]
                results[i] = ScoreResult(float(np.sum(lp, dtype=np.float64)),
                                         [float(x) for x in lp], r.ids[r.target_start:])
        self.requests_served += len(rows) - len(failed)
        return results

    def classify(self, prompt: str | None, contexts: Sequence, labels: Sequence[str], *,
                 errors: str = "raise") -> list[ClassifyResult]:
        """Probabilities of each label as the continuation of each context (softmax over the
        labels' summed log-probabilities). Returns one ClassifyResult per context."""
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise RequestError(f"labels must be at least 2 distinct strings, got {labels!r}")
        if isinstance(contexts, str):
            contexts = [contexts]
        reqs = [ScoreRequest(prompt, c, lab) for c in contexts for lab in labels]
        scores = self.score(reqs, errors=errors)
        out = []
        for c in range(len(contexts)):
            group = scores[c * len(labels):(c + 1) * len(labels)]
            err = next((s.error for s in group if s.error), None)
            if err:
                out.append(ClassifyResult(None, {}, {}, error=err))
                continue
            lp = np.array([s.logprob for s in group])
            probs = np.exp(log_softmax(lp))
            out.append(ClassifyResult(labels[int(np.argmax(lp))],
                                      dict(zip(labels, probs.tolist())),
                                      dict(zip(labels, lp.tolist()))))
        return out

    # ------------------------------------------------------------------------ generation
    def generate(self, prompt: str | None | Sequence[str | None], contexts: Sequence, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop: Sequence[str] = (),
                 stop_at_eos: bool = True, errors: str = "raise") -> list[GenerateResult]:
        """Continue each context under its soft prompt.

        prompt: one prompt name for all contexts, or a list with one name per context (rows
            of different prompts share batches). contexts: strings or token-id lists.
        Greedy when temperature == 0; otherwise sampling, each row with its own generator
        seeded by ``seed`` (a row samples the same tokens alone or in a batch). Each row stops
        at EOS (stop_at_eos), at a stop string (the text is cut before it), or after
        max_new_tokens; finished rows leave the batch. Generations run one at a time; scores
        (direct or micro-batched) are served between a generation's decode steps.
        """
        params = GenerateParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop),
                                stop_at_eos)
        if isinstance(contexts, str):
            contexts = [contexts]
        names = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(contexts)
        if len(names) != len(contexts):
            raise RequestError(f"got {len(names)} prompt names for {len(contexts)} contexts")
        reqs = [ScoreRequest(p, c) for p, c in zip(names, contexts)]
        rows, failed = self._prepare(reqs, errors, extra_positions=max_new_tokens)
        results = [GenerateResult("", [], "error", error=failed[i]) if i in failed else None
                   for i in range(len(rows))]
        valid = [i for i, r in enumerate(rows) if r is not None]
        for at in range(0, len(valid), self.max_batch):
            idx = valid[at: at + self.max_batch]
            with self._gen_lock:  # scores still run between this generation's steps
                for i, res in zip(idx, self._generate_rows([rows[i] for i in idx], params)):
                    results[i] = res
        self.requests_served += len(valid)
        return results

    def _generate_rows(self, rows: list[Row], p: GenerateParams) -> list[GenerateResult]:
        greedy = p.temperature == 0
        with self._lock:  # logits: [B, V], or the argmax ids [B] when greedy
            state, logits = self.backend.start(rows, p.max_new_tokens, greedy=greedy)
        rngs = [np.random.default_rng(p.seed) for _ in rows]
        out = [[] for _ in rows]
        done: list[GenerateResult | None] = [None] * len(rows)
        active = list(range(len(rows)))
        for step in range(p.max_new_tokens):
            nxt = []
            for k, i in enumerate(active):
                t = int(logits[k]) if greedy else _choose(logits[k], p, rngs[i])
                nxt.append(t)
                if p.stop_at_eos and t in self.tokenizer.eos_token_ids:
                    done[i] = GenerateResult(self.tokenizer.decode(out[i]), out[i], "eos")
                    continue
                out[i].append(t)
                text = self.tokenizer.decode(out[i])
                cut = min((text.find(s) for s in p.stop if s in text), default=-1)
                if cut >= 0:
                    done[i] = GenerateResult(text[:cut], out[i], "stop")
                elif step == p.max_new_tokens - 1:
                    done[i] = GenerateResult(text, out[i], "length")
            keep = [k for k, i in enumerate(active) if done[i] is None]
            if not keep:
                break
            with self._lock:
                if len(keep) < len(active):
                    state = self.backend.select(state, keep)
                    active = [active[k] for k in keep]
                    nxt = [nxt[k] for k in keep]
                logits = self.backend.step(state, np.array(nxt, dtype=np.int64), greedy=greedy)
        return done

    # --------------------------------------------------------------------------- services
    def submit(self, request):
        """Queue one score request; returns a ``concurrent.futures.Future[ScoreResult]``.

        Concurrent submissions are gathered into batches by a MicroBatcher (started on first
        use with max_batch and max_wait_ms=5; see :meth:`batcher` to configure it).
        """
        return self.batcher().submit(request)

    async def submit_async(self, request) -> ScoreResult:
        """``await rt.submit_async(request)``: the asyncio form of :meth:`submit`."""
        return await self.batcher().submit_async(request)

    def batcher(self, max_batch: int | None = None, max_wait_ms: float = 5.0):
        """The runtime's MicroBatcher, created on first call with these settings."""
        from .batcher import MicroBatcher

        with self._lock:
            if self._batcher is None or self._batcher.closed:
                self._batcher = MicroBatcher(self, max_batch or self.max_batch, max_wait_ms)
            return self._batcher

    def close(self, drain: bool = True) -> None:
        """Stop the micro-batcher (finishing queued requests when ``drain``, else cancelling)."""
        if self._batcher is not None:
            self._batcher.close(drain=drain)

    def warmup(self, batch_sizes: Sequence[int] = (1, 8), lengths: Sequence[int] = (32,),
               prompts: Sequence[str | None] | None = None, new_tokens: int = 0) -> float:
        """Run one dummy batch per (prompt, batch size, length) now, so that the first real
        requests of those shapes skip the one-time work: Triton compilation and CUDA graph
        capture (torch backend on CUDA), ONNX Runtime's first-run allocations. Shapes are
        bucketed (runtime/graphs.py), so B=8 also covers 5..8 rows and L=32 covers 17..32
        tokens. With ``new_tokens``, each shape also generates that many greedy tokens (the
        decode graphs, whose shapes also depend on the bucket of L + new_tokens, the per-row
        decode capacity). prompts: names (None: no prompt; default: every registered prompt, or
        None when there is none). Returns the seconds spent; not counted in requests_served.
        """
        if prompts is None:
            prompts = list(self.prompts) or [None]
        for name, vals in (("batch_sizes", batch_sizes), ("lengths", lengths)):
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {vals!r}")
        if not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"new_tokens must be an integer >= 0, got {new_tokens!r}")
        t0, served = time.perf_counter(), self.requests_served
        token = min(self.tokenizer.eos_token_ids or [0])  # any valid id: the values do not matter
        for name in prompts:
            for L in lengths:
                if name is None and L < 2:
                    continue  # nothing to score without a prompt
                for B in batch_sizes:
                    self.score([{"prompt": name, "context": [token] * L}] * B)
                    if new_tokens:
                        self.generate([name] * B, [[token] * L] * B, max_new_tokens=new_tokens,
                                      stop_at_eos=False)
        self.requests_served = served
        return time.perf_counter() - t0

    def stats(self) -> dict:
        """Counters: prefix-cache hits/misses/evictions/bytes, batches, tokens computed, ..."""
        s = {"backend": self.backend.name, "prompts": len(self.prompts),
             "requests_served": self.requests_served, **self.backend.stats()}
        if self._batcher is not None:
            s.update(self._batcher.stats())
        return s

    def save_cache(self, path) -> int:
        """Persist the prefix cache (safetensors) for a warm restart; returns entries saved."""
        return self.backend.save_cache(path)

    def load_cache(self, path) -> int:
        """Load a cache written by :meth:`save_cache` for the same model and dtype."""
        return self.backend.load_cache(path)


def _choose(logits: np.ndarray, p: GenerateParams, rng: np.random.Generator) -> int:
    """A sample from the temperature/top-k/top-p filtered distribution (temperature > 0)."""
    lp = log_softmax(logits / p.temperature)
    if p.top_k is not None and p.top_k < lp.shape[-1]:
        kth = np.partition(lp, -p.top_k)[-p.top_k]
        lp = np.where(lp >= kth, lp, -np.inf)
    if p.top_p is not None and p.top_p < 1:
        order = np.argsort(-lp)
        cum = np.cumsum(np.exp(lp[order]))
        cut = order[np.searchsorted(cum, p.top_p) + 1:]
        lp[cut] = -np.inf
    probs = np.exp(lp - lp.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
