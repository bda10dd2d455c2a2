"""The ONNX backend: an exported bundle under ONNX Runtime, numpy only (no torch needed).

The bundle's graph takes ``inputs_embeds`` and ``past_key_values.*``, so:
1. a prompt's prefix is the graph run over its P embeddings with an empty past, once; the
   ``present.*`` outputs ``[1, Hkv, P, D]`` go into the PrefixCache;
2. a batch of new rows (a ``BatchPlan``) runs only its L tokens, with each row's cached prefix
   assembled into the past (``[B, Hkv, P_max, D]``, right-padded, ``attention_mask`` 0 on the
   padding) and ``position_ids`` from the plan; ``logits_index`` asks the graph for the
   vocabulary projection only at the positions a score (or the next token) needs. The graph
   takes a dense past, one copy of the prefix per row, so (measured in bench/RESULTS.md, "Long
   K/V prompts"): the past is written into buffers kept between batches (``_Past``: no fresh
   allocation, and a row whose slot already holds its prompt's prefix is not copied again); a
   single row reads its cache entry in place; and score rows whose prefix lengths differ are
   split into graph calls by prefix length (``group_rows``) when that costs less than padding
   the short ones to the longest prompt of the batch;
3. generating rows form one decode state (``_GenState``). Dense: per layer K/V
   ``[B, Hkv, S, D]`` with a mask ``[B, S]``; rows with different past lengths share it (a row
   that joined later has mask-0 gaps); the bundle's graph appends one column per step and
   returns a new ``present``, so each step copies the whole past once inside the graph. Packed:
   row b's keys are columns ``[0, n_b)`` of buffers with room to grow (the rows' capacities),
   and an in-place decoder writes each new key at column n_b: no per-step copy of the past.
   ``DecodeGraph`` (``export/decode_graph.py``: the bundle's graph with its attention as ONNX
   Runtime's GroupQueryAttention, past and present bound to one float32 buffer) or, under
   bfloat16, ``OpenVinoDecoder`` (``export/ov_session.py``: buffers of bfloat16 bits, the graph
   returning only the step's own key and value, which the host writes). The prefill's dense
   state is packed once at its first decode step (or join), in the decoder's storage dtype
   (``_GenState.storage``; a step on a decoder of the other storage converts the state once),
   buffers grow by doubling, rows that leave are dropped; a row whose next position is not its
   key count keeps the state dense (float32);
4. decode steps may run on another session than scoring and prefill (``decoders``: the
   bundle's in-place decoder, other bundles of the same model and theirs): per step kind, the
   faster one. A decode step reads every weight for one token per row, so it is bound by
   memory bandwidth where a score batch is bound by the matrix units: bfloat16 under OpenVINO
   scores fastest; on the bundle's graph its decode steps convert the whole past to bfloat16
   and back at every step, which its in-place decoder does not; an exact 4-bit sibling reads a
   quarter of the weight bytes; an in-place decoder copies no past.
   ``calibrate_decode`` times a few decode steps of each candidate at a few batch sizes, once,
   and ``decode`` uses the fastest for the nearest size (``decode_plan``; measured in
   bench/RESULTS.md). Every candidate is within the served dtype's tolerance of the float32
   reference, so the pick changes speed, not the guarantees.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from softprompt.export.decode_graph import DecodeGraph, DecodeGraphError, InPlaceDecoder
from softprompt.export.ov_session import (OpenVinoDecoder, OpenVinoSession, from_bfloat16_bits,
                                          to_bfloat16_bits)
from softprompt.models import display_name

from .backend import StepperBackend
from .cache import PrefixCache, PrefixEntry
from .plan import BatchPlan, top_alternatives
from .prompts import KV, Embeds
from .requests import Tokenizer, log_softmax
from .sampling import Sampler, pick_numpy
from .stats import BackendStats

if TYPE_CHECKING:
    from softprompt.export.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass
class _GenState:
    """Generating rows. Dense (``packed`` False): per layer (K, V) ``[B, Hkv, S, D]`` where
    ``mask`` ``[B, S]`` says which columns hold a key (gaps allowed), the bundle's graph
    appends one column per step. Packed: row b's keys are columns ``[0, n_b)`` of buffers of
    capacity S > every n_b (``mask`` 1 exactly there) and its next position is n_b; an
    in-place decoder (``DecodeGraph``, ``OpenVinoDecoder``) writes each new key at column n_b.
    ``storage``: a packed state's buffers' dtype, the decoder's (``"bfloat16"``: uint16 bit
    patterns); a dense state is float32."""

    past: list  # per layer (K, V) [B, Hkv, S, D]
    mask: np.ndarray  # [B, S] int64: 1 where a row has a key
    next_pos: np.ndarray  # [B] position id of each row's next token
    packed: bool = False
    reach: int = 0  # the most keys a row may come to hold (prefix + own capacity), 0: unknown
    storage: str = "float32"

    @property
    def nbytes(self) -> int:
        return _past_bytes(self.past)

    @property
    def lens(self) -> np.ndarray:
        """Keys per row ``[B]``."""
        return self.mask.sum(1)


def _past_bytes(past) -> int:
    """Bytes of a per-layer [(K, V)] past."""
    return sum(k.nbytes + v.nbytes for k, v in past)


@dataclass
class _Past:
    """A dense past kept between batches: per layer (K, V) ``[B, Hkv, P, D]``, and per row what
    its slot holds, ``(prompt digest, tokens)``; past a row's tokens the slot is zeros."""

    arrays: list
    held: list

    @property
    def nbytes(self) -> int:
        return _past_bytes(self.arrays)


# The cost of one graph call over B rows of L new tokens on a past of P positions, in units of
# one request token through the layers (``call_cost``): a least-squares fit of the default
# model's graph calls on CPU over B 1..8, L 1..32, P 0..2048 (bench/RESULTS.md, "Long K/V
# prompts"; within 10 % of every measured call). It only decides how score rows are split into
# calls (``group_rows``); every split gives the same log-probs.
CALL_TOKENS = 32.0  # per call: every weight is read once whatever B and L are
PAST_TOKENS = 0.008  # per row and past position: the graph's Concat into present, the mask
ATTN_TOKENS = 0.0004  # per row, past position and new token: the two attention products
MAX_PAST_BYTES = 1 << 30  # the most past one score call assembles (rows beyond go to another)


def call_cost(B: int, L: int, P: int) -> float:
    """Estimated cost of one graph call (request-token units, see ``CALL_TOKENS``)."""
    return CALL_TOKENS + B * (L + P * (PAST_TOKENS + ATTN_TOKENS * L))


def group_rows(prefix_lens: np.ndarray, q_lens: np.ndarray,
               max_positions: int | None = None) -> list[np.ndarray]:
    """Score rows split into graph calls: each call pads its rows to its own longest prefix
    and request, so a short-prompt row need not pay for a 2,048-token one. Rows sorted by prefix
    length are cut into contiguous runs of least total ``call_cost`` (dynamic programming,
    O(B^2)); rows with one prefix length stay one call. ``max_positions``: at most that many
    rows x past positions per call (the past's size), larger calls are cut into equal parts.
    Returns row indices per call, ascending within each."""
    B = len(prefix_lens)
    groups = [np.arange(B)]
    if B > 1 and prefix_lens.min() != prefix_lens.max():
        order = np.lexsort((q_lens, prefix_lens))  # by prefix length, then request length
        P, q = prefix_lens[order].tolist(), q_lens[order].tolist()
        best, cut = [0.0] + [float("inf")] * B, [0] * (B + 1)
        for j in range(1, B + 1):  # best[j]: the cheapest split of the first j sorted rows
            L = 0
            for i in range(j - 1, -1, -1):  # the last call holds sorted rows i..j-1
                L = max(L, q[i])
                c = best[i] + call_cost(j - i, L, P[j - 1])
                if c < best[j]:
                    best[j], cut[j] = c, i
        groups, j = [], B
        while j:
            groups.append(np.sort(order[cut[j]: j]))
            j = cut[j]
        groups = groups[::-1]
    if max_positions:
        parts = []
        for g in groups:
            per = max(1, max_positions // max(1, int(prefix_lens[g].max())))  # rows per call
            parts += np.array_split(g, -(-len(g) // per))
        groups = parts
    return groups


class OnnxBackend(StepperBackend):
    name = "onnx"

    def __init__(self, path, providers=None, prefix_cache_bytes: int = 1 << 30,
                 compute_dtype: str | None = None, decoders: Sequence[Bundle] = (),
                 decode_graphs: bool = True):
        """``path``: the bundle directory; ``providers``: ONNX Runtime's (default CPU);
        ``compute_dtype``: None, or ``"bfloat16"`` (OpenVINO, ``load_bundle``); ``decoders``:
        other opened bundles of the same model and geometry that decode steps may run on, picked
        by ``calibrate_decode`` (call it once; until then decode runs on the bundle itself, or
        its in-place decoder); ``decode_graphs``: at the first decode step (or calibration), add
        an in-place decoder of each candidate that has one (``open_decode_graphs``: a
        ``DecodeGraph`` of each float32 candidate under ONNX Runtime's CPU provider whose graph
        has the usual shape, an ``OpenVinoDecoder`` of a bfloat16 one under OpenVINO); each
        holds its weights once more in memory."""
        from softprompt.export.bundle import load_bundle

        self.bundle = b = load_bundle(path, providers=providers, compute_dtype=compute_dtype)
        for d in decoders:
            if (d.fingerprint, d.num_layers, d.num_kv_heads, d.head_dim, d.vocab_size) != (
                    b.fingerprint, b.num_layers, b.num_kv_heads, b.head_dim, b.vocab_size):
                raise ValueError(f"decoder bundle {d.path} is not of the model of {b.path}")
        self.decoders: list[Bundle | InPlaceDecoder] = [b, *decoders]
        self.decode_graphs = decode_graphs
        self._graphs_opened = False
        # a prompt's prefix is computed once and then read by every request: in float32 when a
        # float32 candidate is at hand (bfloat16 serving), which halves bfloat16's drift on the
        # default model (bench/RESULTS.md, "bfloat16 on the CPU")
        self.prefix_bundle = next((d for d in self.decoders if d.compute_dtype == "float32"
                                   and not d.manifest.get("quantization")), b)
        self.decode_plan: dict[int, int] = {}  # batch size -> index into decoders (calibrated)
        self.decode_ms: dict[int, list[float]] = {}  # batch size -> step ms per decoder (calibrated)
        self.hidden_size, self.vocab_size = b.hidden_size, b.vocab_size
        self.num_layers, self.num_kv_heads, self.head_dim = b.num_layers, b.num_kv_heads, b.head_dim
        self.max_positions = b.max_position_embeddings
        self.fingerprint = b.fingerprint
        self.dtype_name = b.compute_dtype  # bfloat16 under OpenVINO: its prefixes differ
        self.model_name = display_name(b.manifest.get("model_name") or b.manifest.get("source"))
        self.tokenizer = Tokenizer.for_bundle(b)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name, geometry=dict(
            num_layers=b.num_layers, num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
            vocab_size=b.vocab_size))
        empty = [k[0] for k, _ in b.empty_past(1)]  # N x [Hkv, 0, D]
        self._empty = PrefixEntry(empty, empty, np.zeros(0, np.float32))  # P = 0 rows
        self._pasts: OrderedDict[tuple, _Past] = OrderedDict()  # (B, P) -> past kept for reuse
        self.max_pasts = 4
        self.tokens_computed = 0
        self.batches = 0

    # ----------------------------------------------------------------------------- prefix
    def _compute_prefix(self, prompt) -> PrefixEntry:
        """The prompt's segments in order, once (on ``prefix_bundle``): K/V segments join the
        past as they are, embeddings and text run through the graph on the past so far (its
        ``present.*`` is the new past). Per-layer K/V ``[Hkv, P, D]`` and first-token log-probs
        (None when the prompt ends in K/V)."""
        b = self.prefix_bundle
        past = b.empty_past(1)  # N x (K, V) [1, Hkv, 0, D]
        first = None
        for seg in prompt.segments():
            if isinstance(seg, KV):
                past = [(np.concatenate([k, kk[None].astype(b.np_dtype)], 2),
                         np.concatenate([v, vv[None].astype(b.np_dtype)], 2))
                        for (k, v), kk, vv in zip(past, seg.keys, seg.values)]
                first = None
                continue
            emb = (seg.rows if isinstance(seg, Embeds) else b.embeddings[list(seg.ids)])
            P, n = past[0][0].shape[2], emb.shape[0]
            logits, past = b.run(emb[None].astype(b.np_dtype), np.ones((1, P + n), np.int64),
                                 np.arange(P, P + n)[None], past, np.array([[n - 1]], np.int64))
            first = log_softmax(logits[0, 0]).astype(np.float32)
            self.tokens_computed += n
        return PrefixEntry([k[0] for k, _ in past], [v[0] for _, v in past], first)

    def entry(self, prompt) -> PrefixEntry:
        if prompt is None:
            return self._empty
        return self.cache.get_or_compute(prompt.digest, lambda: self._compute_prefix(prompt))

    def prepare(self, prompt) -> None:
        self.entry(prompt)
        self._trim_pasts()  # the kept pasts must still fit beside the grown cache

    def _trim_pasts(self) -> None:
        """Keep at most ``max_pasts`` pasts, and only while cache + pasts fit the cache budget
        (least recently used first out)."""
        while self._pasts and (len(self._pasts) > self.max_pasts or self.cache.bytes + sum(
                p.nbytes for p in self._pasts.values()) > self.cache.max_bytes):
            self._pasts.popitem(last=False)

    def forget(self, prompt) -> None:
        self.cache.invalidate(prompt.digest)
        self._pasts.clear()

    def stats(self) -> BackendStats:
        stacks = sum(p.nbytes for p in self._pasts.values())
        decode = self._state.nbytes if self._state is not None else 0
        return BackendStats(self.cache.stats(), stack_bytes=stacks, decode_bytes=decode,
                            tokens_computed=self.tokens_computed, batches=self.batches)

    def save_cache(self, path) -> int:
        return self.cache.save(path)

    def load_cache(self, path) -> int:
        self._pasts.clear()
        return self.cache.load(path)

    # ------------------------------------------------------------------------------ batch
    def _past(self, rows: list, digests: list, p_max: int) -> list:
        """The dense past ``[B, Hkv, p_max, D]`` per layer of rows whose prefixes are ``rows``
        (PrefixEntries; ``digests``: their prompts', None for no prompt), right-padded with zeros.

        One row reads its entry in place (no copy). Otherwise the past is written into a
        buffer of that shape kept from an earlier batch (``_pasts``, within the cache budget),
        where only the rows whose slot holds another prefix are copied: batch scoring sends
        the same prompts again and again, often in the same slots."""
        b = self.bundle
        B = len(rows)
        self._trim_pasts()  # the cache may have grown since the last batch
        if p_max == 0:
            return b.empty_past(B)
        if B == 1:
            e = rows[0]
            return [(k[None], v[None]) for k, v in zip(e.keys, e.values)]
        shape = (B, b.num_kv_heads, p_max, b.head_dim)
        kept = self._pasts.pop((B, p_max), None)
        if kept is None:
            kept = _Past([(np.zeros(shape, b.np_dtype), np.zeros(shape, b.np_dtype))
                          for _ in range(b.num_layers)], [(None, 0)] * B)
        for i, (e, d) in enumerate(zip(rows, digests)):
            n, (was, m) = e.num_tokens, kept.held[i]
            if (was, m) == (d, n):
                continue
            for layer, (k, v) in enumerate(kept.arrays):
                k[i, :, :n] = e.keys[layer]
                v[i, :, :n] = e.values[layer]
                if m > n:  # what the longer prefix left behind goes back to zeros
                    k[i, :, n:m] = 0
                    v[i, :, n:m] = 0
            kept.held[i] = (d, n)
        self._pasts[(B, p_max)] = kept
        self._trim_pasts()  # the newest too, when it does not fit: it served this batch only
        return kept.arrays

    def _entries(self, plan: BatchPlan) -> list:
        """The PrefixEntry of each of ``plan.prompts``, then the empty one (rows without a prompt)."""
        return [self.entry(p) for p in plan.prompts] + [self._empty]

    def _run_plan(self, plan: BatchPlan, index: np.ndarray, rows: np.ndarray | None = None,
                  entries: list | None = None):
        """The graph over the new tokens of the plan's ``rows`` (default: all, in order) on top
        of their prefixes: (logits ``[R, K, V]`` at ``index [R, K]``, presents per layer
        ``[R, Hkv, P_max + L, D]``, mask, ``entries``: those of ``_entries(plan)``, looked up
        when not given); P_max and L are those of these rows."""
        b = self.bundle
        entries = self._entries(plan) if entries is None else entries
        sel = np.arange(plan.B) if rows is None else np.asarray(rows)
        idx = plan.prompt_idx[sel]
        row_entries = [entries[i] for i in idx]
        digests = [plan.prompts[i].digest if i < len(plan.prompts) else None for i in idx]
        q_lens = plan.q_lens[sel]
        B, L = len(sel), int(q_lens.max())
        p_max = max(e.num_tokens for e in row_entries)
        past = self._past(row_entries, digests, p_max)
        mask = np.zeros((B, p_max + L), np.int64)
        for i, e in enumerate(row_entries):
            mask[i, : e.num_tokens] = 1
        mask[:, p_max:] = np.arange(L)[None] < q_lens[:, None]
        ids = plan.ids[sel, :L]
        emb = np.ascontiguousarray(b.embeddings[ids], b.np_dtype)  # [B, L, E]
        positions = np.ascontiguousarray(plan.positions[sel, :L])
        self.tokens_computed += int(q_lens.sum())
        self.batches += 1
        logits, presents = b.run(emb, mask, positions, past, index)
        return logits, presents, mask, entries

    def score(self, plan: BatchPlan) -> list:
        # logits_index [B, K]: the columns predicting each row's own targets, padded by
        # repeating one (rows without own targets read column 0, unused)
        per_row = [plan.target_cols[plan.target_rows == r] for r in range(plan.B)]
        K = max(1, max(len(c) for c in per_row))
        index = np.array([np.pad(c, (0, K - len(c)), mode="edge") if len(c) else np.zeros(K, int)
                          for c in per_row], np.int64)
        entries = self._entries(plan)
        b = self.bundle
        per_position = 2 * b.num_layers * b.num_kv_heads * b.head_dim * b.np_dtype.itemsize
        groups = group_rows(plan.prefix_lens, plan.q_lens, MAX_PAST_BYTES // per_position)
        if len(groups) == 1:
            logits = self._run_plan(plan, index, entries=entries)[0]  # [B, K, V]
        else:  # one graph call per group of prefix lengths, logits back in row order
            logits = np.empty((plan.B, K, self.vocab_size), np.float32)
            for rows in groups:
                logits[rows] = self._run_plan(plan, index[rows], rows, entries)[0]
        # the k-th own target of row r sits at index[r, k]: its order in the plan's targets
        slot = np.concatenate([np.arange(len(c)) for c in per_row]).astype(np.int64)
        sel = logits[plan.target_rows, slot].astype(np.float64)  # [T, V]
        own_all = log_softmax(sel)
        own_lp = own_all[np.arange(len(sel)), plan.target_ids]
        own_top = sel.argmax(-1) == plan.target_ids
        first = np.stack([entries[plan.prompt_idx[r]].first_logprobs for r in plan.first_rows]) \
            if len(plan.first_rows) else np.zeros((0, self.vocab_size), np.float32)
        first_lp = first[np.arange(len(first)), plan.first_ids]
        first_top = first.argmax(-1) == plan.first_ids if len(first) else np.zeros(0, bool)
        own_alt = first_alt = None
        if plan.max_top_n:  # asked for: the same log-probs' most likely ids, as pick_numpy
            own_alt = top_alternatives(own_all, plan.max_top_n)
            first_alt = top_alternatives(first.astype(np.float64), plan.max_top_n)
        return plan.assemble(own_lp, own_top, first_lp, first_top, own_alt, first_alt)

    # ------------------------------------------------------------------------- generation
    def prefill(self, plan: BatchPlan, capacity):
        logits, presents, mask, entries = self._run_plan(plan, plan.last_cols[:, None])
        next_pos = plan.prefix_lens + plan.past_lens + plan.q_lens
        reach = int((plan.prefix_lens + np.asarray(capacity, np.int64)).max()) if len(capacity) else 0
        return _GenState(presents, mask, next_pos, reach=reach), logits[:, 0]

    def open_decode_graphs(self) -> list[str]:
        """Once: an in-place decoder of each candidate in ``decoders`` that has one (a
        ``DecodeGraph`` of each float32 ONNX Runtime CPU bundle, an ``OpenVinoDecoder`` of a
        bfloat16 one under OpenVINO), appended to them (see ``__init__``); a graph of another
        shape, or one the engine fails to open, is skipped with its reason logged (decode stays
        on the bundle's graph). Returns what was added (``engine_name``)."""
        if self._graphs_opened or not self.decode_graphs:
            return []
        self._graphs_opened = True
        added = []
        for d in list(self.decoders):
            if getattr(d, "packed", False):
                continue
            if isinstance(d.session, OpenVinoSession) and d.compute_dtype == "bfloat16":
                opener = OpenVinoDecoder.open
            elif d.compute_dtype == "float32" \
                    and d.session.get_providers()[0] == "CPUExecutionProvider":
                opener = DecodeGraph.open
            else:
                continue
            try:
                self.decoders.append(opener(d))
                added.append(engine_name(self.decoders[-1]))
            except DecodeGraphError as e:  # a graph of another shape: expected, e.g. GPT-2
                log.info("decode steps on %s stay on its graph: %s", d.path, e)
            except Exception as e:  # noqa: BLE001 - an optimisation: it never fails a request
                log.warning("decode steps on %s stay on its graph: its decode graph failed to "
                            "open (%s: %s)", d.path, type(e).__name__, str(e).splitlines()[0][:200])
        return added

    def decoder(self, batch: int, packed: bool | None = None) -> Bundle | InPlaceDecoder:
        """What decode steps of ``batch`` rows run on: the calibrated pick for the nearest
        calibrated batch size (``decode_plan``), else the bundle's decode graph if it has one,
        else the bundle. ``packed=False``: the fastest candidate that takes a dense past."""
        def ok(d):
            return packed is None or getattr(d, "packed", False) == packed

        if not self.decode_plan:
            return next((d for d in self.decoders if getattr(d, "packed", False)
                         and d.bundle is self.bundle and ok(d)), self.bundle)
        near = min(self.decode_plan, key=lambda n: (abs(np.log(n / batch)), n))
        if ok(self.decoders[self.decode_plan[near]]):
            return self.decoders[self.decode_plan[near]]
        ms = self.decode_ms.get(near)
        order = np.argsort(ms) if ms else range(len(self.decoders))
        return next((self.decoders[i] for i in order if ok(self.decoders[i])), self.bundle)

    def calibrate_decode(self, batches: Sequence[int] = (1, 8, 32), past: int = 64,
                         repeats: int = 2, steps: int = 3) -> dict[int, str]:
        """Time decode steps as generation runs them on every candidate in ``decoders`` (decode
        graphs opened first): ``batches`` rows on a ``past``-token past (random values), each
        step ``decode`` plus the greedy pick of its tokens (the host work a step costs, which
        differs by engine), ``steps`` timed steps after an untimed one that also packs the state
        (a session's first step after another's competes with that one's spinning thread pool),
        in ``repeats`` rounds over the candidates so a burst of other load hits every one. Keeps
        the fastest per batch size for ``decode`` (``decode_plan``; the best step's ms per
        candidate in ``decode_ms``). Returns {batch: the chosen candidate's engine}."""
        import time

        self.open_decode_graphs()
        b = self.bundle
        if len(self.decoders) == 1:
            self.decode_plan = {n: 0 for n in batches}
            return {n: engine_name(b) for n in batches}
        rng = np.random.default_rng(0)
        counted = self.tokens_computed
        for n in batches:
            shape = (n, b.num_kv_heads, past, b.head_dim)
            kv = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
                  for _ in range(b.num_layers)]
            ids0 = rng.integers(0, b.vocab_size, n)
            samplers = [Sampler() for _ in range(n)]
            best = [float("inf")] * len(self.decoders)
            for _ in range(repeats):
                for i, d in enumerate(self.decoders):
                    state = _GenState(list(kv), np.ones((n, past), np.int64),
                                      np.full(n, past), reach=past + steps + 1)
                    ids = ids0
                    for k in range(steps + 1):
                        t = time.perf_counter()
                        ids = self.pick(self._step(d, state, ids), samplers)[0]
                        if k:
                            best[i] = min(best[i], time.perf_counter() - t)
            self.decode_plan[n] = int(np.argmin(best))
            self.decode_ms[n] = [round(t * 1e3, 2) for t in best]
        self.tokens_computed = counted
        return {n: engine_name(self.decoders[i]) for n, i in self.decode_plan.items()}

    def decode(self, state: _GenState, next_ids: np.ndarray):
        self.open_decode_graphs()
        B = len(next_ids)
        d = self.decoder(B)
        if getattr(d, "packed", False) and not state.packed and not _pack(state, storage=d.storage):
            d = self.decoder(B, packed=False)  # positions not contiguous: the bundle's graph
        return self._step(d, state, next_ids)

    def _step(self, d: Bundle | InPlaceDecoder, state: _GenState, next_ids: np.ndarray):
        """One decode step of ``state`` on ``d``, packing or unpacking the state (or converting
        its storage) as ``d`` needs."""
        B = len(next_ids)
        packed = getattr(d, "packed", False)
        if packed:
            if state.packed and state.storage != d.storage:
                _unpack(state)  # another decoder's storage: once through float32
            if not state.packed and not _pack(state, storage=d.storage):
                raise ValueError("an in-place decoder needs each row's next position to be its "
                                 "key count")
        elif state.packed:
            _unpack(state)
        emb = d.embeddings[next_ids][:, None].astype(d.np_dtype)  # [B, 1, E]
        if packed:
            lens = state.lens
            if lens.max() + 1 > state.mask.shape[1]:
                _grow(state, int(lens.max()) + 1)
            logits = d.run(emb, lens, state.past)
            state.mask[np.arange(B), lens] = 1
        else:
            state.mask = np.concatenate([state.mask, np.ones((B, 1), np.int64)], axis=1)
            logits, state.past = d.run(emb, state.mask, state.next_pos[:, None], state.past,
                                       np.zeros((B, 1), np.int64))
            logits = logits[:, 0]
        state.next_pos = state.next_pos + 1
        self.tokens_computed += B
        return logits

    def select(self, state: _GenState, keep: list[int]) -> _GenState:
        mask = state.mask[keep]
        if state.packed:  # the rows leave; the buffers keep their capacity
            state.past = [(k[keep], v[keep]) for k, v in state.past]
            state.mask, state.next_pos = mask, state.next_pos[keep]
            return state
        cols = np.flatnonzero(mask.any(0))  # columns some remaining row still uses
        state.past = [(k[keep][:, :, cols], v[keep][:, :, cols]) for k, v in state.past]
        state.mask, state.next_pos = mask[:, cols], state.next_pos[keep]
        return state

    def join(self, state: _GenState | None, new: _GenState) -> _GenState:
        """Rows of ``new`` after those of ``state``; the shorter past is right-padded (mask 0).
        A packed state takes new rows packed (or becomes dense when they cannot be)."""
        if state is None:
            return new
        if new.packed and (not state.packed or new.storage != state.storage):
            _unpack(new)
        if state.packed and not new.packed and not _pack(new, state.mask.shape[1], state.storage):
            _unpack(state)
        S = max(state.mask.shape[1], new.mask.shape[1])

        def pad(a, axis):
            width = [(0, 0)] * a.ndim
            width[axis] = (0, S - a.shape[axis])
            return np.pad(a, width)

        state.past = [(np.concatenate([pad(k0, 2), pad(k1, 2)]), np.concatenate([pad(v0, 2), pad(v1, 2)]))
                      for (k0, v0), (k1, v1) in zip(state.past, new.past)]
        state.mask = np.concatenate([pad(state.mask, 1), pad(new.mask, 1)])
        state.next_pos = np.concatenate([state.next_pos, new.next_pos])
        state.reach = max(state.reach, new.reach)
        return state

    @staticmethod
    def pick(logits, samplers):
        return pick_numpy(logits, samplers)


def engine_name(d) -> str:
    """e.g. ``"OpenVINO bfloat16"``, ``"CPUExecutionProvider float32 int4"``,
    ``"CPUExecutionProvider float32 int4 in place"`` (an in-place decoder)."""
    q = d.manifest.get("quantization")
    return (f"{d.session.get_providers()[0]} {d.compute_dtype}{' ' + q if q else ''}"
            f"{' in place' if getattr(d, 'packed', False) else ''}")


def _pack(state: _GenState, capacity: int = 0, storage: str = "float32") -> bool:
    """Make a dense state packed (row b's keys to columns ``[0, n_b)``, capacity at least
    ``capacity``, ``state.reach`` and max n_b + 1, buffers of ``storage``'s dtype), one copy of
    the past; False (state unchanged) when a row's next position is not its number of keys (an
    in-place decoder takes one as the other)."""
    lens = state.lens
    if not np.array_equal(lens, state.next_pos):
        return False
    B, S = state.mask.shape
    M = _round16(max(capacity, state.reach, int(lens.max()) + 1))
    contiguous = all(state.mask[b, :n].all() for b, n in enumerate(lens))
    bf16 = storage == "bfloat16"
    past = []
    for k, v in state.past:
        out = []
        for a in (k, v):
            a = to_bfloat16_bits(a) if bf16 else a
            p = np.zeros((B, a.shape[1], M, a.shape[3]), a.dtype)
            if contiguous:  # every row's keys already start at column 0
                n = min(S, M)
                p[:, :, :n] = a[:, :, :n]
            else:
                for b in range(B):
                    p[b, :, :lens[b]] = a[b][:, state.mask[b].astype(bool)]
            out.append(p)
        past.append(tuple(out))
    state.past = past
    state.mask = (np.arange(M)[None] < lens[:, None]).astype(np.int64)
    state.packed, state.storage = True, storage
    return True


def _round16(n: int) -> int:
    """A packed buffer's capacity: ``n`` columns rounded up to a multiple of 16."""
    return -(-n // 16) * 16


def _unpack(state: _GenState) -> None:
    """A packed state as a dense float32 one (its columns up to the longest row), for the
    bundle's graph."""
    S = int(state.lens.max())
    dense = from_bfloat16_bits if state.storage == "bfloat16" else np.ascontiguousarray
    state.past = [(dense(k[:, :, :S]), dense(v[:, :, :S])) for k, v in state.past]
    state.mask = np.ascontiguousarray(state.mask[:, :S])
    state.packed, state.storage = False, "float32"


def _grow(state: _GenState, need: int) -> None:
    """Packed buffers with room for ``need`` keys per row (at least double), one copy."""
    B, S = state.mask.shape
    M = _round16(max(need, 2 * S))
    state.past = [tuple(np.concatenate([a, np.zeros(a.shape[:2] + (M - S,) + a.shape[3:], a.dtype)], 2)
                        for a in kv) for kv in state.past]
    state.mask = np.pad(state.mask, ((0, 0), (0, M - S)))
