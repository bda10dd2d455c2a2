"""The ONNX backend: an exported bundle under ONNX Runtime, numpy only (no torch needed).

The bundle's graph takes ``inputs_embeds`` and ``past_key_values.*``, so:
1. a prompt's prefix is the graph run over its P embeddings with an empty past, once; the
   ``present.*`` outputs ``[1, Hkv, P, D]`` go into the PrefixCache;
2. a batch of requests runs only its L tokens, with each row's cached prefix assembled into
   the past (``[B, Hkv, P_max, D]``, right-padded, ``attention_mask`` 0 on the padding) and
   ``position_ids`` starting at each row's own P; ``logits_index`` asks the graph for the
   vocabulary projection only at the positions a score needs;
3. generation decodes one token at a time on top of the previous ``present.*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import PrefixCache, PrefixEntry
from .models import display_name
from .requests import Row, Tokenizer, log_softmax


class OnnxBackend:
    name = "onnx"

    def __init__(self, path, providers=None, prefix_cache_bytes: int = 1 << 30):
        from softprompt.export.bundle import load_bundle

        self.bundle = b = load_bundle(path, providers=providers)
        self.hidden_size, self.vocab_size = b.hidden_size, b.vocab_size
        self.max_positions = b.max_position_embeddings
        self.fingerprint = b.fingerprint
        self.dtype_name = b.manifest["dtype"]
        self.model_name = display_name(b.manifest.get("model_name") or b.manifest.get("source"))
        self.tokenizer = Tokenizer(b.tokenizer, b.eos_token_ids)
        self.cache = PrefixCache(prefix_cache_bytes, self.fingerprint, self.dtype_name)
        empty = [k[0] for k, _ in b.empty_past(1)]  # N x [Hkv, 0, D]
        self._empty = PrefixEntry(empty, empty, np.zeros(0, np.float32))  # P = 0 rows
        self._last_past = (None, None)  # (row prompt digests, per-layer past) of the last batch
        self.tokens_computed = 0
        self.batches = 0

    # ----------------------------------------------------------------------------- prefix
    def _compute_prefix(self, prompt) -> PrefixEntry:
        b, P = self.bundle, prompt.num_virtual_tokens
        emb = prompt.embeddings[None].astype(b.np_dtype)  # [1, P, E]
        logits, presents = b.run(emb, np.ones((1, P), np.int64), np.arange(P)[None],
                                 b.empty_past(1), np.array([[P - 1]], np.int64))
        return PrefixEntry([k[0] for k, _ in presents], [v[0] for _, v in presents],
                           log_softmax(logits[0, 0]).astype(np.float32))

    def entry(self, prompt) -> PrefixEntry:
        if prompt is None:
            return self._empty
        return self.cache.get_or_compute(prompt.digest, lambda: self._compute_prefix(prompt))

    def prepare(self, prompt) -> None:
        self.entry(prompt)

    def forget(self, prompt) -> None:
        self.cache.invalidate(prompt.digest)
        self._last_past = (None, None)

    def stats(self) -> dict:
        return {**self.cache.stats(), "tokens_computed": self.tokens_computed,
                "batches": self.batches}

    def save_cache(self, path) -> int:
        return self.cache.save(path)

    def load_cache(self, path) -> int:
        return self.cache.load(path)

    # ------------------------------------------------------------------------------ batch
    def _assemble(self, rows: list[Row]):
        """Past ``[B, Hkv, P_max, D]`` per layer from the cache, mask ``[B, P_max + L_max]``,
        positions ``[B, L_max]`` and request embeddings ``[B, L_max, E]``."""
        b = self.bundle
        distinct = {r.prompt.digest: r.prompt for r in rows if r.prompt is not None}
        found = {d: self.entry(p) for d, p in distinct.items()}  # one lookup per prompt
        entries = [found[r.prompt.digest] if r.prompt is not None else self._empty for r in rows]
        B = len(rows)
        p_max = max(e.num_tokens for e in entries)
        l_max = max(len(r.ids) for r in rows)
        # ORT takes a dense past, one copy of the prefix per row; batch scoring sends the
        # same prompts in the same order again and again, so the last one is kept and reused.
        key = tuple(r.prompt.digest if r.prompt is not None else None for r in rows)
        if self._last_past[0] == key:
            past = self._last_past[1]
        else:
            past = []
            for layer in range(b.num_layers):
                k = np.zeros((B, b.num_kv_heads, p_max, b.head_dim), b.np_dtype)
                v = np.zeros_like(k)
                for i, e in enumerate(entries):
                    k[i, :, : e.num_tokens] = e.keys[layer]
                    v[i, :, : e.num_tokens] = e.values[layer]
                past.append((k, v))
            self._last_past = (key, past)
        mask = np.zeros((B, p_max + l_max), np.int64)
        pos = np.zeros((B, l_max), np.int64)
        emb = np.zeros((B, l_max, self.hidden_size), b.np_dtype)
        for i, (r, e) in enumerate(zip(rows, entries)):
            mask[i, : e.num_tokens] = 1
            mask[i, p_max: p_max + len(r.ids)] = 1
            pos[i] = e.num_tokens + np.arange(l_max)
            emb[i, : len(r.ids)] = b.embeddings[r.ids]
        self.tokens_computed += sum(len(r.ids) for r in rows)
        self.batches += 1
        return entries, past, mask, pos, emb

    def logprobs(self, rows: list[Row]) -> list[np.ndarray]:
        entries, past, mask, pos, emb = self._assemble(rows)
        # Positions predicting each row's targets (the first token, when scored, comes from
        # the cached prefix); rows with fewer are padded by repeating their last index.
        want = [np.array(r.own_targets, np.int64) - 1 for r in rows]
        k = max(1, max(len(w) for w in want))
        index = np.array([np.pad(w, (0, k - len(w)), mode="edge") if len(w) else np.zeros(k, int)
                          for w in want], np.int64)
        logits, _ = self.bundle.run(emb, mask, pos, past, index)  # [B, K, V]
        out = []
        for i, (r, e, w) in enumerate(zip(rows, entries, want)):
            tgt = np.array([r.ids[j] for j in r.own_targets], np.int64)
            lp = log_softmax(logits[i, : len(w)])[np.arange(len(w)), tgt]
            if r.target_start == 0:
                lp = np.concatenate([[e.first_logprobs[r.ids[0]]], lp])
            out.append(lp)
        return out

    # ------------------------------------------------------------------------- generation
    def start(self, rows: list[Row], max_new_tokens: int, greedy: bool = False):
        entries, past, mask, pos, emb = self._assemble(rows)
        last = np.array([[len(r.ids) - 1] for r in rows], np.int64)
        logits, presents = self.bundle.run(emb, mask, pos, past, last)
        next_pos = np.array([e.num_tokens + len(r.ids) for r, e in zip(rows, entries)], np.int64)
        return _GenState(presents, mask, next_pos), _next(logits[:, 0], greedy)

    def step(self, state: "_GenState", next_ids: np.ndarray, greedy: bool = False):
        b = self.bundle
        state.mask = np.concatenate([state.mask, np.ones((len(next_ids), 1), np.int64)], axis=1)
        emb = b.embeddings[next_ids][:, None].astype(b.np_dtype)  # [B, 1, E]
        logits, state.past = b.run(emb, state.mask, state.next_pos[:, None], state.past,
                                   np.zeros((len(next_ids), 1), np.int64))
        state.next_pos = state.next_pos + 1
        self.tokens_computed += len(next_ids)
        return _next(logits[:, 0], greedy)

    def select(self, state: "_GenState", keep: list[int]) -> "_GenState":
        state.past = [(k[keep], v[keep]) for k, v in state.past]
        state.mask, state.next_pos = state.mask[keep], state.next_pos[keep]
        return state


def _next(logits: np.ndarray, greedy: bool) -> np.ndarray:
    """``[B, V]`` float32 logits, or with ``greedy`` their argmax ids ``[B]``."""
    return logits.argmax(-1) if greedy else logits.astype(np.float32)


@dataclass
class _GenState:
    past: list  # per layer (K, V) [B, Hkv, S, D]
    mask: np.ndarray  # [B, S]
    next_pos: np.ndarray  # [B]


def bundle_for(model, dtype: str | None = None, out_dir=None) -> Path:
    """The bundle directory for a (non-bundle) model, exporting it once if needed.

    Bundles are kept under ``$SOFTPROMPT_HOME/bundles/<fingerprint>-<dtype>``, so a model is
    exported once per content and dtype and reused by every later ``Runtime.load``.
    """
    import sys

    from softprompt.export import export

    from .models import load_model, softprompt_home

    dtype = {"float32": "fp32", "float16": "fp16", None: "fp32"}.get(dtype, dtype)
    lm = load_model(model)
    path = Path(out_dir) if out_dir else softprompt_home() / "bundles" / f"{lm.fingerprint[:16]}-{dtype}"
    if (path / "bundle.json").is_file():
        return path
    print(f"softprompt: exporting {lm.source} to {path} (one time, a few minutes) ...",
          file=sys.stderr, flush=True)
    return Path(export(lm, path, dtype=dtype))
