"""``Runtime``: the one entry point, a thin facade over the parts that do the work.

    rt = Runtime.load("default", backend="auto")      # onnx on CPU, torch + Triton on CUDA
    rt.add_prompt("sentiment", "path/to/peft_adapter")
    rt.score([{"prompt": "sentiment", "context": "Review: great!\\nSentiment:",
               "continuation": " positive"}])
    rt.classify("sentiment", ["Review: awful.\\nSentiment:"], [" positive", " negative"])
    rt.generate("sentiment", ["Write a review:"], max_new_tokens=20)
    for chunk in rt.stream("sentiment", "Write a review:"):   # tokens as they come
        print(chunk.text, end="")

The request path: each request is validated alone (``requests.make_row``: a bad request fails
only itself, before any batching) against the prompt registry (``registry.py``: atomic changes,
each request bound to the prompt version it was accepted with), then handed to the engine
(``engine.py``), whose scheduler (``scheduler.py``) puts every caller's work into shared steps
on the backend (``backend.py``; built by ``factory.py``). Results come back as futures and
streams (``streams.py``).

This file is a little over 500 lines because its one job is the public API: each method is
short, and its docstring is the reference users read.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import fields
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, overload

import numpy as np

from .backend import Backend, ScoredRow
from .cache import CacheError
from .chat import as_conversations, chat_ids
from .engine import Engine, EngineClosed
from .factory import build
from .generation import Generation, StreamChunk
from .prompt_kinds import as_prompt, check_prompt, compose
from .prompts import DEFAULT_MAX_VIRTUAL_TOKENS, Prompt, SoftPrompt, SoftPromptError
from .registry import PromptRegistry
from .requests import (ClassifyResult, GenerateParams, GenerateResult, ModelInfo, RequestError,
                       Row, ScoreRequest, ScoreResult, Tokenizer, classify_requests,
                       classify_results, make_row)
from .stats import RuntimeStats
from .streams import AsyncStream, Stream, then

Errors = str  # "raise" | "return"
GENERATE_ARGS = tuple(f.name for f in fields(GenerateParams))  # the keyword arguments of generate


class Runtime:
    """Serve soft prompts over one frozen causal LM.

    Build it with :meth:`Runtime.load`. Thread-safe and asyncio-friendly: every call from any
    thread or task goes through one engine, which batches concurrent scores and generations
    into shared forwards step by step (continuous batching).
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, model_name: str | None = None,
                 max_batch_tokens: int = 4096, max_batch: int = 64,
                 max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS, strict: bool = False):
        for arg, val in (("max_batch_tokens", max_batch_tokens), ("max_batch", max_batch),
                         ("max_virtual_tokens", max_virtual_tokens)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {val!r}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.info = ModelInfo(model_name, backend.name, backend.hidden_size, backend.vocab_size,
                              backend.max_positions, backend.fingerprint, backend.dtype_name,
                              backend.num_layers, backend.num_kv_heads, backend.head_dim)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch = max_batch
        self.max_virtual_tokens = max_virtual_tokens
        self.strict = strict
        self.engine = Engine(backend, max_batch=max_batch, max_batch_tokens=max_batch_tokens)
        self.registry = PromptRegistry(self._prepare_prefix, self._forget_prefix)

    @classmethod
    def load(cls, model: Any = "default", backend: str = "auto", *, device: str | None = None,
             dtype: str | None = None, max_batch_tokens: int = 4096, max_batch: int = 64,
             prefix_cache_bytes: int = 1 << 30, max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS,
             strict: bool = False, providers: Sequence[str] | None = None,
             bundle_dir: str | Path | None = None, cuda_graphs: bool | None = None,
             revision: str | None = None) -> Runtime:
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
                device, onnx on CPU; for bfloat16 on CPU onnx under OpenVINO when installed,
                else torch).
            device: torch device for the torch backends (default: cuda if available, else cpu).
            dtype: ``float32`` (default on CPU: exact, equal to PEFT within 1e-4), ``float16``,
                ``bfloat16`` (default on CUDA; on CPU the matrix units: backend onnx runs the
                float32 bundle under OpenVINO in bfloat16, backend torch runs bfloat16
                weights), or ``"auto"``: bfloat16 on CUDA and on a CPU with AMX-BF16, float32
                on other CPUs (``runtime/factory.py``, ``auto_dtype``). bfloat16 moves
                log-probs by a few hundredths of a nat (``softprompt/tolerances.py``,
                ``SCORE_CPU_BF16``; measured in bench/RESULTS.md).
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
        b = build(model, backend, device=device, dtype=dtype, prefix_cache_bytes=prefix_cache_bytes,
                  providers=providers, bundle_dir=bundle_dir, cuda_graphs=cuda_graphs)
        return cls(b.backend, b.tokenizer, model_name=b.model_name, max_batch_tokens=max_batch_tokens,
                   max_batch=max_batch, max_virtual_tokens=max_virtual_tokens, strict=strict)

    # --------------------------------------------------------------------------- prompts
    @property
    def prompts(self):
        """Registered prompts by name (a live read-only mapping)."""
        return self.registry.prompts

    def _prepare_prefix(self, sp: Prompt) -> None:
        try:
            self.engine.call(lambda: self.backend.prepare(sp))
        except CacheError as e:
            raise SoftPromptError(f"prompt {sp.name!r}: {e}") from None

    def _forget_prefix(self, sp: Prompt) -> None:
        try:
            self.engine.call(lambda: self.backend.forget(sp))
        except EngineClosed:
            pass  # closing: the cache goes with the runtime

    def add_prompt(self, name: str, source: Any, *, allow_pickle: bool = False) -> Any:
        """Register (or replace) prompt ``name`` and compute its prefix now.

        source: a PEFT adapter directory of any served prompt-learning type (PROMPT_TUNING,
        P_TUNING, CPT, MULTITASK_PROMPT_TUNING, PREFIX_TUNING, CARTRIDGE; a hub id too), a
        ``.safetensors``/``.npy`` file (``.bin``/``.pt`` with ``allow_pickle=True``), a prompt of
        any kind (not modified: the registry keeps a renamed copy), a ``[P, E]`` tensor/array,
        or a list of parts composed into one prefix, computed once in order: a ``str`` part is
        text (tokenised on its own, no special tokens), any other part is a source as above, e.g.
        ``rt.add_prompt("qa", [SoftPrompt.load(path), "Answer briefly.\n"])``.
        A multitask adapter registers one prompt per task, ``name/0`` .. ``name/<T-1>``, and
        returns the list of them; otherwise the registered prompt is returned.
        All-or-nothing: each new prompt is validated and its prefix computed first; only then
        does it replace the old one, so a failure leaves the registry as it was. Requests
        accepted before the swap keep the old version; the old prefix is dropped once none of
        them needs it.
        """
        if not isinstance(name, str) or not name:
            raise SoftPromptError(f"prompt name must be a non-empty string, got {name!r}")
        prompts = self._resolve(name, source, allow_pickle)
        for p in prompts.values():
            check_prompt(p, self.info, self.max_virtual_tokens)
            p.check_base_model(self.info.fingerprint, self.model_name, strict=self.strict)
        added = [self.registry.add(n, p) for n, p in prompts.items()]
        return added if list(prompts) != [name] else added[0]

    def _resolve(self, name: str, source: Any, allow_pickle: bool) -> dict[str, Prompt]:
        """The prompt(s) ``source`` stands for by the names they register under: ``name``, or
        ``name/t`` per task of a multitask adapter."""
        if isinstance(source, (list, tuple)):
            def part(p):  # a non-str, non-prompt part: a path, or a [P, E] array
                return SoftPrompt.load(p, allow_pickle=allow_pickle) if isinstance(p, PathLike) \
                    else as_prompt(p)
            return {name: compose(source, self.tokenizer, name, resolve=part)}
        loaded = SoftPrompt.load_all(source, name=name, allow_pickle=allow_pickle)
        every_task = loaded[0].kind == "multitask_prompt_tuning" and not isinstance(source, SoftPrompt)
        return {p.name: p for p in loaded} if every_task else {name: loaded[0]}

    def remove_prompt(self, name: str) -> None:
        """Unregister ``name``; its cached prefix goes once no accepted request needs it."""
        self.registry.remove(name)

    # -------------------------------------------------------------------------- requests
    def check(self, request: Any, extra_positions: int = 0) -> Row:
        """Validate one request (a dict ``{prompt, context, continuation}`` or ScoreRequest)
        against the registry, the tokenizer and the model: its ``Row`` (token ids, bound prompt
        version), or a RequestError naming what is wrong. ``extra_positions``: tokens it will
        generate. Every path (Python calls, the server) validates through this one function."""
        return make_row(request, self.registry.prompts, self.tokenizer, self.info, extra_positions,
                        inline=self._inline)

    def _inline(self, value: Any) -> Prompt:
        """A request's own prompt (any kind, or a ``[P, E]`` array), checked against the model
        like a registered one; cached by content (its digest) under the same budget."""
        try:
            return check_prompt(as_prompt(value), self.info, self.max_virtual_tokens)
        except SoftPromptError as e:
            raise RequestError(str(e)) from None

    def _rows(self, requests: Sequence[Any], errors: Errors,
              extra_positions: int = 0) -> tuple[list[Row | None], dict[int, str]]:
        """Rows for the valid requests (None for the others) and {index: error}."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if isinstance(requests, (str, bytes, dict)) or not hasattr(requests, "__len__"):
            raise RequestError(f"requests must be a list of requests, got {type(requests).__name__}")
        rows: list[Row | None] = []
        failed: dict[int, str] = {}
        for i, req in enumerate(requests):
            try:
                rows.append(self.check(req, extra_positions))
            except (RequestError, SoftPromptError) as e:
                if errors == "raise":
                    raise RequestError(f"request {i}: {e}") from None
                rows.append(None)
                failed[i] = str(e)
        return rows, failed

    def _score_future(self, rows: list[Row | None], on_progress: Callable[[int], object] | None = None,
                      count: bool = True) -> Future[list[ScoreResult | None]]:
        """Future of one ScoreResult per row (None rows are skipped: their slot stays None)."""
        valid = [i for i, r in enumerate(rows) if r is not None]
        self.registry.hold(rows)
        try:
            inner = self.engine.submit_scores([rows[i] for i in valid], on_progress, count)  # type: ignore[misc]
        except BaseException:
            self.registry.release(rows)
            raise
        inner.add_done_callback(lambda _: self.registry.release(rows))

        def results(scored: list[ScoredRow]) -> list[ScoreResult | None]:
            res: list[ScoreResult | None] = [None] * len(rows)
            for i, (lp, greedy, alts) in zip(valid, scored):
                r = rows[i]
                assert r is not None
                res[i] = ScoreResult(float(np.sum(lp, dtype=np.float64)), [float(x) for x in lp],
                                     r.ids[r.target_start:], is_greedy=greedy, top_logprobs=alts)
            return res

        return then(inner, results)

    @staticmethod
    def _merge(res: list[ScoreResult | None], failed: dict[int, str]) -> list[ScoreResult]:
        return [ScoreResult(error=failed[i]) if i in failed else r  # type: ignore[misc]
                for i, r in enumerate(res)]

    def score(self, requests: Sequence[Any], *, errors: Errors = "raise",
              progress: bool = False) -> list[ScoreResult]:
        """Log-probability of each request's continuation (or its context without one).

        requests: dicts ``{"prompt", "context", "continuation"}`` or ScoreRequest.
        errors: ``"raise"`` (a bad request raises RequestError naming its index before any
            work) or ``"return"`` (its result carries ``.error``; the others are scored).
        progress: show a tqdm bar over the rows (for large offline scoring jobs).
        Returns one ScoreResult per request, in order (``is_greedy`` from the same forward).
        """
        return self._score(requests, errors, progress)

    def _score(self, requests: Sequence[Any], errors: Errors, progress: bool = False,
               count: bool = True) -> list[ScoreResult]:
        rows, failed = self._rows(requests, errors)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) - len(failed), desc="scoring", unit="row")
        try:
            res = self._score_future(rows, bar.update if bar else None, count).result()
        finally:
            if bar is not None:
                bar.close()
        return self._merge(res, failed)

    async def score_async(self, requests: Sequence[Any], *,
                          errors: Errors = "return") -> list[ScoreResult]:
        """``await rt.score_async(requests)``: :meth:`score` without blocking the event loop."""
        rows, failed = self._rows(requests, errors)
        return self._merge(await asyncio.wrap_future(self._score_future(rows)), failed)

    def classify(self, prompt: str | None, contexts: Sequence[Any], labels: Sequence[str], *,
                 errors: Errors = "raise") -> list[ClassifyResult]:
        """Probabilities of each label as the continuation of each context (softmax over the
        labels' summed log-probabilities). Returns one ClassifyResult per context."""
        contexts, labels, reqs = classify_requests(prompt, contexts, labels)
        return classify_results(contexts, labels, self.score(reqs, errors=errors))

    async def classify_async(self, prompt: str | None, contexts: Sequence[Any],
                             labels: Sequence[str], *, errors: Errors = "return") -> list[ClassifyResult]:
        """``await rt.classify_async(...)``: :meth:`classify` without blocking the event loop;
        cancelling the awaiting task drops the rows the engine has not computed yet."""
        contexts, labels, reqs = classify_requests(prompt, contexts, labels)
        return classify_results(contexts, labels, await self.score_async(reqs, errors=errors))

    def submit(self, request: Any) -> Future[ScoreResult]:
        """Queue one score request; returns a ``concurrent.futures.Future[ScoreResult]``.

        A bad request's future raises its RequestError; the others are unaffected. Concurrent
        submissions share engine steps (they batch without any waiting window)."""
        try:
            row = self.check(request)
        except (RequestError, SoftPromptError) as e:
            fut: Future[ScoreResult] = Future()
            fut.set_exception(RequestError(str(e)))
            return fut
        return then(self._score_future([row]), lambda res: res[0])  # type: ignore[arg-type,return-value]

    async def submit_async(self, request: Any) -> ScoreResult:
        """``await rt.submit_async(request)``: the asyncio form of :meth:`submit`."""
        return await asyncio.wrap_future(self.submit(request))

    # ------------------------------------------------------------------------ generation
    def _generations(self, rows: list[Row], params: GenerateParams,
                     sink: Callable[[StreamChunk], object], count: bool = True) -> list[Generation]:
        """Hand validated rows to the engine together (they arrive in the same step), each
        bound to its prompt version until it ends."""
        self.registry.hold(rows)
        gens = [Generation(r, params, self.tokenizer, sink,
                           on_done=lambda g: self.registry.release([g.row]), count=count)
                for r in rows]
        try:
            self.engine.submit_generations(gens)
        except BaseException:
            self.registry.release(rows)
            raise
        return gens

    def generate(self, prompt: str | None | Sequence[str | None], contexts: Sequence[Any], *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 stop_at_eos: bool = True, logprobs: int | None = None,
                 errors: Errors = "raise") -> list[GenerateResult]:
        """Continue each context under its soft prompt.

        prompt: one prompt name for all contexts, or a list with one name per context (rows
            of different prompts share batches). contexts: strings or token-id lists.
        Greedy when temperature < 1e-5 (``sampling.GREEDY_BELOW``, 0 included); otherwise
        sampling (top_k / top_p filters), each row with its own generator: with ``seed`` every
        row uses that seed and samples the same tokens alone, in any batch and any arrival
        order; without, each row draws a fresh one. Each row stops at EOS (stop_at_eos), at a
        stop string (the text is cut before it), or after max_new_tokens (``finish_reason`` eos
        | stop | length). Rows join the engine's running batch as they come and leave it when
        they finish, alongside other callers' work.
        Every new token's log-probability is in ``token_logprobs``; with ``logprobs=n`` the n
        most likely ``(id, log-prob)`` of each position are in ``top_logprobs``.
        """
        params = GenerateParams(max_new_tokens, temperature, top_k, top_p, seed,
                                stop, stop_at_eos, logprobs)  # type: ignore[arg-type]
        return self._generate(prompt, contexts, params, errors)

    def _generate(self, prompt: str | None | Sequence[str | None], contexts: Sequence[Any],
                  params: GenerateParams, errors: Errors, count: bool = True) -> list[GenerateResult]:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if isinstance(contexts, str):
            contexts = [contexts]
        names = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(contexts)
        if len(names) != len(contexts):
            raise RequestError(f"got {len(names)} prompt names for {len(contexts)} contexts")
        rows, failed = self._rows([ScoreRequest(p, c) for p, c in zip(names, contexts)],
                                  errors, extra_positions=params.max_new_tokens)
        valid = [i for i, r in enumerate(rows) if r is not None]
        left = [len(valid)]
        done = threading.Event()
        lock = threading.Lock()

        def finished(chunk: StreamChunk) -> None:
            if chunk.finish_reason is not None:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        if not valid:
            done.set()
        gens = dict(zip(valid, self._generations([rows[i] for i in valid], params,  # type: ignore[misc]
                                                 finished, count)))
        try:
            done.wait()
        except BaseException:  # KeyboardInterrupt: free the rows
            for g in gens.values():
                g.cancel()
            self.engine.wake()
            raise
        out = []
        for i in range(len(rows)):
            if i in failed:
                out.append(GenerateResult("", [], "error", error=failed[i]))
                continue
            g = gens[i]
            out.append(GenerateResult(g.text, g.token_ids, g.finish_reason or "error",
                                      error=g.error, token_logprobs=g.token_logprobs,
                                      top_logprobs=g.top_logprobs))
        return out

    def _generation(self, prompt: str | None, context: Any, sampling: dict[str, Any],
                    sink: Callable[[StreamChunk], object]) -> Generation:
        """One validated, accepted generation row (raises RequestError when invalid)."""
        params = _params(sampling)
        row = self.check(ScoreRequest(prompt, context), extra_positions=params.max_new_tokens)
        return self._generations([row], params, sink)[0]

    def stream(self, prompt: str | None, context: Any, **sampling: Any) -> Stream:
        """Generate for one context, yielding ``StreamChunk``s (text delta, ids, log-probs) as
        the engine produces them; the last has ``finish_reason``. Same keyword arguments as
        :meth:`generate` (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eos,
        logprobs).
        Closing the iterator (``close()``, leaving a ``with`` block, or dropping it) cancels
        the row: it is freed at the next engine step. Raises RequestError when invalid."""
        q: queue.SimpleQueue[StreamChunk] = queue.SimpleQueue()
        return Stream(self._generation(prompt, context, sampling, q.put), q, self.engine.wake)

    def stream_async(self, prompt: str | None, context: Any, **sampling: Any) -> AsyncStream:
        """The asyncio form of :meth:`stream`: ``async for chunk in rt.stream_async(...)``.
        Cancelling the consuming task or ``await it.aclose()`` cancels the row. Must be called
        from a running event loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StreamChunk] = asyncio.Queue()

        def sink(chunk: StreamChunk) -> None:  # raises once the loop is closed: the row is freed
            loop.call_soon_threadsafe(q.put_nowait, chunk)

        return AsyncStream(self._generation(prompt, context, sampling, sink), q, self.engine.wake)

    # ------------------------------------------------------------------------------ chat
    def chat_ids(self, messages: Any, *, add_generation_prompt: bool = True) -> list[int]:
        """The token ids of one conversation under the model's own chat template, as
        transformers' ``apply_chat_template(messages, add_generation_prompt=True,
        tokenize=True)`` returns them; a soft prompt's virtual tokens go before them. Raises
        RequestError for a bad message or a model without a chat template (runtime/chat.py)."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt, self.info.max_positions)

    @overload
    def chat(self, prompt: str | None | Sequence[str | None], messages: Sequence[Mapping[str, Any]],
             *, add_generation_prompt: bool = ..., errors: Errors = ...,
             **sampling: Any) -> GenerateResult: ...

    @overload
    def chat(self, prompt: str | None | Sequence[str | None],
             messages: Sequence[Sequence[Mapping[str, Any]]], *, add_generation_prompt: bool = ...,
             errors: Errors = ..., **sampling: Any) -> list[GenerateResult]: ...

    def chat(self, prompt: str | None | Sequence[str | None], messages: Any, *,
             add_generation_prompt: bool = True, errors: Errors = "raise",
             **sampling: Any) -> GenerateResult | list[GenerateResult]:
        """Answer a conversation (or several) under soft prompt ``prompt`` (None: the base model).

        messages: one conversation, a list of ``{"role": "system" | "user" | "assistant",
            "content": str | [{"type": "text", "text": str}, ...]}``, or a list of
            conversations. prompt: one name for all, or one per conversation.
        Returns one GenerateResult for one conversation, a list (in order) for a list.
        The model sees ``[v_1..v_P, chat_ids(conversation)]``: the virtual tokens, then the
        conversation rendered by the model's chat template (ending with the assistant's header
        when ``add_generation_prompt``) and tokenised without adding special tokens again
        (:meth:`chat_ids`). Generation then runs as :meth:`generate`, with its keyword
        arguments (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eos,
        logprobs) and ``errors`` (``"return"``: a bad conversation's result carries ``.error``).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        params = _params(sampling)
        convs, single = as_conversations(messages)
        names: list[Any] = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(convs)
        if len(names) != len(convs):
            raise RequestError(f"got {len(names)} prompt names for {len(convs)} conversations")
        contexts: dict[int, list[int]] = {}
        failed: dict[int, str] = {}
        for i, conv in enumerate(convs):
            try:
                contexts[i] = self.chat_ids(conv, add_generation_prompt=add_generation_prompt)
            except RequestError as e:
                if errors == "raise":
                    raise RequestError(str(e) if single else f"conversation {i}: {e}") from None
                failed[i] = str(e)
        done = iter(self._generate([names[i] for i in contexts], list(contexts.values()), params,
                                   errors) if contexts else [])
        out = [GenerateResult("", [], "error", error=failed[i]) if i in failed else next(done)
               for i in range(len(convs))]
        return out[0] if single else out

    def stream_chat(self, prompt: str | None, messages: Any, *, add_generation_prompt: bool = True,
                    **sampling: Any) -> Stream:
        """:meth:`stream` over one conversation's :meth:`chat_ids` (what :meth:`chat` runs)."""
        ids = self.chat_ids(messages, add_generation_prompt=add_generation_prompt)
        return self.stream(prompt, ids, **sampling)

    def stream_chat_async(self, prompt: str | None, messages: Any, *,
                          add_generation_prompt: bool = True, **sampling: Any) -> AsyncStream:
        """The asyncio form of :meth:`stream_chat` (as :meth:`stream_async`)."""
        ids = self.chat_ids(messages, add_generation_prompt=add_generation_prompt)
        return self.stream_async(prompt, ids, **sampling)

    # --------------------------------------------------------------------------- services
    @property
    def requests_served(self) -> int:
        """Requests finished so far (score rows and generations; warm-up excluded)."""
        return self.engine.requests_served

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; finish every accepted one (``drain``) or cancel them (score
        futures are cancelled, generations end with ``finish_reason="cancelled"``). Every
        accepted request ends with a result, an error or a cancellation; none is left waiting."""
        self.engine.close(drain=drain, timeout=timeout)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
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
        t0 = time.perf_counter()
        token = min(self.tokenizer.eos_token_ids or [0])  # any valid id: the values do not matter
        params = GenerateParams(max_new_tokens=max(new_tokens, 1), stop_at_eos=False)
        for name in prompts:
            for L in lengths:
                if name is None and L < 2:
                    continue  # nothing to score without a prompt
                for B in batch_sizes:
                    self._score([{"prompt": name, "context": [token] * L}] * B, "raise", count=False)
                    if new_tokens:
                        self._generate([name] * B, [[token] * L] * B, params, "raise", count=False)
        return time.perf_counter() - t0

    def stats(self) -> RuntimeStats:
        """Counters and memory: prefix-cache hits/misses/evictions/bytes, engine running/
        waiting/steps, tokens computed, bytes by kind. Read by attribute (``s.cache.hits``) or
        by the flat names of earlier versions (``s["hits"]``)."""
        try:
            backend = self.engine.call(self.backend.stats)
        except EngineClosed:
            backend = self.backend.stats()
        return RuntimeStats(self.backend.name, len(self.prompts), self.requests_served, backend,
                            self.engine.stats())

    def save_cache(self, path: str | PathLike[str]) -> int:
        """Persist the prefix cache (safetensors) for a warm restart; returns entries saved."""
        return self.engine.call(lambda: self.backend.save_cache(path))

    def load_cache(self, path: str | PathLike[str]) -> int:
        """Load a cache written by :meth:`save_cache` for the same model and dtype."""
        return self.engine.call(lambda: self.backend.load_cache(path))


def _params(sampling: dict[str, Any]) -> GenerateParams:
    """The GenerateParams of a stream/chat call's keyword arguments (unknown ones refused)."""
    unknown = set(sampling) - set(GENERATE_ARGS)
    if unknown:
        raise RequestError(f"unknown generation arguments {sorted(unknown)}; expected {GENERATE_ARGS}")
    return GenerateParams(**sampling)
