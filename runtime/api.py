"""``Runtime``: the one entry point, a thin facade over validation, the engine and a backend.

    rt = Runtime.load("default", backend="auto")      # onnx on CPU, torch + Triton on CUDA
    rt.add_prompt("sentiment", "path/to/peft_adapter")
    rt.score([{"prompt": "sentiment", "context": "Review: great!\\nSentiment:",
               "continuation": " positive"}])
    rt.classify("sentiment", ["Review: awful.\\nSentiment:"], [" positive", " negative"])
    rt.generate("sentiment", ["Write a review:"], max_new_tokens=20)
    for chunk in rt.stream("sentiment", "Write a review:"):   # tokens as they come
        print(chunk.text, end="")

Every call validates its requests here, alone (a bad request fails only itself, before any
batching), then hands the rows to the engine (``engine.py``), which schedules every caller's
work into shared steps on the backend (``backend.py``; ``onnx_backend.py``,
``torch_backend.py``, ``reference.py``). The prompt registry lives here: changes are atomic and
a request keeps the prompt version that was current when it was accepted.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import numpy as np

from .cache import CacheError
from .engine import Engine, EngineClosed, Sequence as GenSequence, StreamChunk
from .prompts import DEFAULT_MAX_VIRTUAL_TOKENS, SoftPrompt, SoftPromptError
from .requests import (ClassifyResult, GenerateParams, GenerateResult, RequestError, Row,
                       ScoreRequest, ScoreResult, Tokenizer, as_request, log_softmax, to_ids)

BACKENDS = ("auto", "onnx", "torch", "reference")


class Runtime:
    """Serve soft prompts over one frozen causal LM.

    Build it with :meth:`Runtime.load`. Thread-safe and asyncio-friendly: every call from any
    thread or task goes through one engine, which batches concurrent scores and generations
    into shared forwards step by step (continuous batching).
    """

    def __init__(self, backend, tokenizer: Tokenizer, *, model_name: str | None = None,
                 max_batch_tokens: int = 4096, max_batch: int = 64,
                 max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS, strict: bool = False):
        for arg, val in (("max_batch_tokens", max_batch_tokens), ("max_batch", max_batch),
                         ("max_virtual_tokens", max_virtual_tokens)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {val!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch = max_batch
        self.max_virtual_tokens = max_virtual_tokens
        self.strict = strict
        self.prompts: dict[str, SoftPrompt] = {}
        self._registry = threading.Lock()  # prompt changes, one at a time, swapped atomically
        self._inflight: Counter = Counter()  # prompt digest -> accepted requests not finished
        self._inflight_lock = threading.Lock()
        self.engine = Engine(backend, tokenizer, max_batch=max_batch,
                             max_batch_tokens=max_batch_tokens)
        self.requests_served = 0

    # ------------------------------------------------------------------------------ load
    @classmethod
    def load(cls, model="default", backend: str = "auto", *, device: str | None = None,
             dtype: str | None = None, max_batch_tokens: int = 4096, max_batch: int = 64,
             prefix_cache_bytes: int = 1 << 30, max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
             strict: bool = False, providers: Sequence[str] | None = None,
             bundle_dir: str | Path | None = None, cuda_graphs: bool | None = None,
             revision: str | None = None) -> "Runtime":
        """Load a model and a backend.

        Args:
            model: ``"default"`` (SmolLM2-135M-Instruct), a Hugging Face model directory, a
                hub id (``owner/name`` or ``owner/name@revision``, resolved through
                ``huggingface_hub`` and its cache; a local path of that name wins), a
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
            revision: for a hub id, the branch, tag or commit (same as ``owner/name@revision``).
        """
        if revision is not None:
            if not isinstance(model, str) or "@" in model:
                raise ValueError(f"revision= applies to a hub id without '@revision', got {model!r}")
            model = f"{model}@{revision}"
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
        from .models import display_name, load_model

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
        with ``allow_pickle=True``), a SoftPrompt (not modified: the registry keeps a renamed
        copy), or a ``[P, E]`` tensor/array. All-or-nothing: the new prompt is validated and its
        prefix computed first; only then does it replace the old one, so a failure leaves the
        registry as it was. Requests accepted before the swap keep the old version; the old
        prefix is dropped once none of them needs it.
        """
        if not isinstance(name, str) or not name:
            raise SoftPromptError(f"prompt name must be a non-empty string, got {name!r}")
        sp = SoftPrompt.load(source, name=name, allow_pickle=allow_pickle)
        if sp is source or sp.name != name:
            from dataclasses import replace

            sp = replace(sp, name=name)
        sp.validate(self.backend.hidden_size, self.max_virtual_tokens)
        if sp.num_virtual_tokens >= self.backend.max_positions:
            raise SoftPromptError(f"soft prompt {name!r} has {sp.num_virtual_tokens} virtual "
                                  f"tokens but the model has only {self.backend.max_positions} positions")
        sp.check_base_model(self.backend.fingerprint, self.model_name, strict=self.strict)
        with self._registry:
            try:  # the new prefix first: if it fails, nothing has changed
                self.engine.call(lambda: self.backend.prepare(sp))
            except CacheError as e:
                raise SoftPromptError(f"soft prompt {name!r}: {e}") from None
            old = self.prompts.get(name)
            self.prompts[name] = sp
            if old is not None:
                self._forget_if_unused(old)
        return sp

    def remove_prompt(self, name: str) -> None:
        """Unregister ``name``; its cached prefix goes once no accepted request needs it."""
        with self._registry:
            sp = self.prompts.pop(name, None)
            if sp is None:
                raise KeyError(f"unknown prompt {name!r}; known: {sorted(self.prompts)}")
            self._forget_if_unused(sp)

    def _forget_if_unused(self, sp: SoftPrompt) -> None:
        """Drop sp's prefix unless a registered prompt or an accepted request still uses it
        (called under the registry lock; requests release theirs in ``_release``)."""
        with self._inflight_lock:
            if self._inflight[sp.digest] or any(p.digest == sp.digest for p in self.prompts.values()):
                return
        self.engine.call(lambda: self.backend.forget(sp))

    def _hold(self, rows) -> None:
        """Bind accepted rows to their prompt versions (released by ``_release``)."""
        with self._inflight_lock:
            self._inflight.update(r.prompt.digest for r in rows if r is not None and r.prompt)

    def _release(self, rows) -> None:
        """The rows finished: drop prompt versions that nothing uses any more. Runs on the
        engine thread (result delivery), so it never waits for the registry lock."""
        drop = {}
        with self._inflight_lock:
            for r in rows:
                if r is None or r.prompt is None:
                    continue
                d = r.prompt.digest
                self._inflight[d] -= 1
                if self._inflight[d] <= 0:
                    del self._inflight[d]
                    if all(p.digest != d for p in list(self.prompts.values())):
                        drop[d] = r.prompt
        for sp in drop.values():
            try:
                self.engine.call(lambda sp=sp: self.backend.forget(sp))
            except EngineClosed:
                pass  # closing: the cache goes with the runtime

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
        if cont is None and P == 0 and len(ctx) < 2 and not extra_positions:
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
        """Rows for the valid requests (None for the others) and {index: error}."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if isinstance(requests, (str, bytes, dict)) or not hasattr(requests, "__len__"):
            raise RequestError(f"requests must be a list of requests, got {type(requests).__name__}")
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

    def _score_future(self, rows: list, on_progress=None) -> Future:
        """Future of one ScoreResult per row (None rows are skipped: their slot stays None)."""
        valid = [i for i, r in enumerate(rows) if r is not None]
        self._hold(rows)
        try:
            inner = self.engine.submit_scores([rows[i] for i in valid], on_progress)
        except BaseException:
            self._release(rows)
            raise
        inner.add_done_callback(lambda _: self._release(rows))

        def results(scored: list) -> list:
            res: list = [None] * len(rows)
            for i, (lp, greedy) in zip(valid, scored):
                r = rows[i]
                res[i] = ScoreResult(float(np.sum(lp, dtype=np.float64)), [float(x) for x in lp],
                                     r.ids[r.target_start:], is_greedy=greedy)
            self.requests_served += len(valid)
            return res

        return _then(inner, results)

    def score(self, requests: Sequence, *, errors: str = "raise",
              progress: bool = False) -> list[ScoreResult]:
        """Log-probability of each request's continuation (or its context without one).

        requests: dicts ``{"prompt", "context", "continuation"}`` or ScoreRequest.
        errors: ``"raise"`` (a bad request raises RequestError naming its index before any
            work) or ``"return"`` (its result carries ``.error``; the others are scored).
        progress: show a tqdm bar over the rows (for large offline scoring jobs).
        Returns one ScoreResult per request, in order (``is_greedy`` from the same forward).
        """
        rows, failed = self._prepare(requests, errors)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) - len(failed), desc="scoring", unit="row")
        try:
            res = self._score_future(rows, bar.update if bar else None).result()
        finally:
            if bar is not None:
                bar.close()
        return [ScoreResult(error=failed[i]) if i in failed else r for i, r in enumerate(res)]

    def classify(self, prompt: str | None, contexts: Sequence, labels: Sequence[str], *,
                 errors: str = "raise") -> list[ClassifyResult]:
        """Probabilities of each label as the continuation of each context (softmax over the
        labels' summed log-probabilities). Returns one ClassifyResult per context."""
        contexts, labels, reqs = _classify_requests(prompt, contexts, labels)
        return _classify_results(contexts, labels, self.score(reqs, errors=errors))

    async def classify_async(self, prompt: str | None, contexts: Sequence, labels: Sequence[str],
                             *, errors: str = "return") -> list[ClassifyResult]:
        """``await rt.classify_async(...)``: :meth:`classify` without blocking the event loop;
        cancelling the awaiting task drops the rows the engine has not computed yet."""
        contexts, labels, reqs = _classify_requests(prompt, contexts, labels)
        return _classify_results(contexts, labels, await self.score_async(reqs, errors=errors))

    # ------------------------------------------------------------------------ generation
    def _sequence(self, prompt, context, params: GenerateParams, sink) -> GenSequence:
        """A validated, accepted generation row (raises RequestError when invalid)."""
        row = self._row(ScoreRequest(prompt, context), extra_positions=params.max_new_tokens)
        return self._submit_rows([row], params, sink)[0]

    def _submit_rows(self, rows: list[Row], params: GenerateParams, sink) -> list[GenSequence]:
        """Hand validated rows to the engine together (they arrive in the same step), each
        bound to its prompt version until it ends."""
        self._hold(rows)
        seqs = [GenSequence(r, params, self.tokenizer, self.tokenizer.eos_token_ids, sink,
                            on_done=lambda s: self._release([s.row])) for r in rows]
        try:
            self.engine.submit_generations(seqs)
        except BaseException:
            self._release(rows)
            raise
        return seqs

    def generate(self, prompt: str | None | Sequence[str | None], contexts: Sequence, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 stop_at_eos: bool = True, logprobs: int | None = None,
                 errors: str = "raise") -> list[GenerateResult]:
        """Continue each context under its soft prompt.

        prompt: one prompt name for all contexts, or a list with one name per context (rows
            of different prompts share batches). contexts: strings or token-id lists.
        Greedy when temperature == 0; otherwise sampling (top_k / top_p filters), each row with
        its own generator: with ``seed`` every row uses that seed and samples the same tokens
        alone, in any batch and any arrival order; without, each row draws a fresh one. Each row
        stops at EOS (stop_at_eos), at a stop string (the text is cut before it), or after
        max_new_tokens (``finish_reason`` eos | stop | length). Rows join the engine's running
        batch as they come and leave it when they finish, alongside other callers' work.
        Every new token's log-probability is in ``token_logprobs``; with ``logprobs=n`` the n
        most likely ``(id, log-prob)`` of each position are in ``top_logprobs``.
        """
        params = GenerateParams(max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eos,
                                logprobs)
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if isinstance(contexts, str):
            contexts = [contexts]
        names = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(contexts)
        if len(names) != len(contexts):
            raise RequestError(f"got {len(names)} prompt names for {len(contexts)} contexts")
        rows, failed = self._prepare([ScoreRequest(p, c) for p, c in zip(names, contexts)],
                                     errors, extra_positions=max_new_tokens)
        done = threading.Event()
        left = [sum(r is not None for r in rows)]
        lock = threading.Lock()

        def finished(_chunk):
            if _chunk.finish_reason is not None:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        if not left[0]:
            done.set()
        valid = [i for i, r in enumerate(rows) if r is not None]
        seqs = dict(zip(valid, self._submit_rows([rows[i] for i in valid], params, finished)))
        try:
            done.wait()
        except BaseException:  # KeyboardInterrupt: free the rows
            for s in seqs.values():
                s.cancel()
            self.engine.wake()
            raise
        self.requests_served += len(seqs)
        out = []
        for i in range(len(rows)):
            if i in failed:
                out.append(GenerateResult("", [], "error", error=failed[i]))
                continue
            s = seqs[i]
            out.append(GenerateResult(s.detok.text, s.token_ids, s.finish_reason, error=s.error,
                                      token_logprobs=s.token_logprobs,
                                      top_logprobs=s.top_logprobs))
        return out

    def stream(self, prompt: str | None, context, **sampling) -> "Stream":
        """Generate for one context, yielding ``StreamChunk``s (text delta, ids, log-probs) as
        the engine produces them; the last has ``finish_reason``. Same keyword arguments as
        :meth:`generate` (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eos,
        logprobs).
        Closing the iterator (``close()``, leaving a ``with`` block, or dropping it) cancels
        the row: it is freed at the next engine step. Raises RequestError when invalid."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        seq = self._sequence(prompt, context, GenerateParams(**_sampling(sampling)), q.put)
        return Stream(seq, q, self)

    def stream_async(self, prompt: str | None, context, **sampling) -> "AsyncStream":
        """The asyncio form of :meth:`stream`: ``async for chunk in rt.stream_async(...)``.
        Cancelling the consuming task or ``await it.aclose()`` cancels the row. Must be called
        from a running event loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        def sink(chunk):  # raises once the loop is closed: the engine then frees the row
            loop.call_soon_threadsafe(q.put_nowait, chunk)

        seq = self._sequence(prompt, context, GenerateParams(**_sampling(sampling)), sink)
        return AsyncStream(seq, q, self)

    # --------------------------------------------------------------------------- services
    def submit(self, request) -> Future:
        """Queue one score request; returns a ``concurrent.futures.Future[ScoreResult]``.

        A bad request's future raises its RequestError; the others are unaffected. Concurrent
        submissions share engine steps (they batch without any waiting window)."""
        fut: Future = Future()
        try:
            row = self._row(request)
        except (RequestError, SoftPromptError) as e:
            fut.set_exception(RequestError(str(e)))
            return fut
        return _then(self._score_future([row]), lambda res: res[0])

    async def submit_async(self, request) -> ScoreResult:
        """``await rt.submit_async(request)``: the asyncio form of :meth:`submit`."""
        return await asyncio.wrap_future(self.submit(request))

    async def score_async(self, requests: Sequence, *, errors: str = "return") -> list[ScoreResult]:
        """``await rt.score_async(requests)``: :meth:`score` without blocking the event loop."""
        rows, failed = self._prepare(requests, errors)
        res = await asyncio.wrap_future(self._score_future(rows))
        return [ScoreResult(error=failed[i]) if i in failed else r for i, r in enumerate(res)]

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; finish every accepted one (``drain``) or cancel them (score
        futures are cancelled, generations end with ``finish_reason="cancelled"``). Every
        accepted request ends with a result, an error or a cancellation; none is left waiting."""
        self.engine.close(drain=drain, timeout=timeout)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warmup(self, batch_sizes: Sequence[int] = (1, 8), lengths: Sequence[int] = (32,),
               prompts: Sequence[str | None] | None = None, new_tokens: int = 0) -> float:
        """Run one dummy batch per (prompt, batch size, length) now, so that the first real
        requests of those shapes skip the one-time work: Triton compilation and CUDA graph
        capture (torch backend on CUDA), ONNX Runtime's first-run allocations. Shapes are
        bucketed (runtime/graphs.py), so B=8 also covers 5..8 rows and L=32 covers 17..32
        tokens. With ``new_tokens``, each shape also generates that many greedy tokens (the
        decode graphs). prompts: names (None: no prompt; default: every registered prompt, or
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
        """Counters: prefix-cache hits/misses/evictions/bytes, engine running/waiting/steps,
        tokens computed, memory by kind (``*_bytes``)."""
        try:
            backend = self.engine.call(self.backend.stats)
        except EngineClosed:
            backend = self.backend.stats()
        return {"backend": self.backend.name, "prompts": len(self.prompts),
                "requests_served": self.requests_served, **backend, **self.engine.stats()}

    def save_cache(self, path) -> int:
        """Persist the prefix cache (safetensors) for a warm restart; returns entries saved."""
        return self.engine.call(lambda: self.backend.save_cache(path))

    def load_cache(self, path) -> int:
        """Load a cache written by :meth:`save_cache` for the same model and dtype."""
        return self.engine.call(lambda: self.backend.load_cache(path))


class _StreamBase:
    """One generation's chunks as they come; dropping it unfinished cancels the row."""

    def __init__(self, seq: GenSequence, q, rt: Runtime):
        self.seq, self._q, self._rt = seq, q, rt
        self._ended = False

    def _got(self, chunk: StreamChunk) -> StreamChunk:
        if chunk.finish_reason is not None:
            self._ended = True
            self._rt.requests_served += 1
        return chunk

    def _cancel(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        if not self._ended:
            self._ended = True
            self.seq.cancel()
            self._rt.engine.wake()

    def __del__(self):
        if not self._ended and self.seq.finish_reason is None:
            self.seq.cancel()


class Stream(_StreamBase):
    """Iterator of one generation's StreamChunks (see :meth:`Runtime.stream`)."""

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        if self._ended:
            raise StopIteration
        return self._got(self._q.get())

    def close(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        self._cancel()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream(_StreamBase):
    """Async iterator of one generation's StreamChunks (see :meth:`Runtime.stream_async`)."""

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._ended:
            raise StopAsyncIteration
        try:
            chunk = await self._q.get()
        except BaseException:  # the consuming task was cancelled: free the row
            self._cancel()
            raise
        return self._got(chunk)

    async def aclose(self) -> None:
        """Cancel the row (freed at the next engine step) unless it already finished."""
        self._cancel()


def _classify_requests(prompt, contexts, labels) -> tuple[list, list[str], list]:
    """(contexts, labels, one ScoreRequest per context x label) of a classify call."""
    labels = list(labels) if not isinstance(labels, str) else [labels]
    if (len(labels) < 2 or len(set(labels)) != len(labels)
            or any(not isinstance(x, str) or not x for x in labels)):
        raise RequestError(f"labels must be at least 2 distinct non-empty strings, got {labels!r}")
    contexts = [contexts] if isinstance(contexts, str) else list(contexts)
    return contexts, labels, [ScoreRequest(prompt, c, lab) for c in contexts for lab in labels]


def _classify_results(contexts: list, labels: list[str], scores: list) -> list[ClassifyResult]:
    out = []
    for c in range(len(contexts)):
        group = scores[c * len(labels):(c + 1) * len(labels)]
        err = next((s.error for s in group if s.error), None)
        if err:
            out.append(ClassifyResult(None, {}, {}, error=err))
            continue
        lp = np.array([s.logprob for s in group])
        probs = np.exp(log_softmax(lp))
        out.append(ClassifyResult(labels[int(np.argmax(lp))], dict(zip(labels, probs.tolist())),
                                  dict(zip(labels, lp.tolist()))))
    return out


def _then(inner: Future, fn) -> Future:
    """A Future of ``fn(inner's result)``, cancelled or failed as ``inner`` is; cancelling it
    cancels ``inner`` (the engine then drops the work it has not started)."""
    outer: Future = Future()
    outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)

    def done(f: Future):
        if f.cancelled():
            outer.cancel()
            outer.set_running_or_notify_cancel()
        elif f.exception() is not None:
            outer.set_exception(f.exception())
        else:
            outer.set_result(fn(f.result()))

    inner.add_done_callback(done)
    return outer


def _sampling(kw: dict) -> dict:
    allowed = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_at_eos",
               "logprobs")
    unknown = set(kw) - set(allowed)
    if unknown:
        raise RequestError(f"unknown generation arguments {sorted(unknown)}; expected {allowed}")
    return kw


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
