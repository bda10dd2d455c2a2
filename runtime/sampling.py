"""Choosing the next token on the backend's own device, and incremental detokenising.

Each generating row carries a ``Sampler``: its temperature, top-k, top-p and its *own* random
generator seeded from the request's seed. A row's token depends only on its own logits and its
own generator, so a seeded request samples the same tokens alone, in any batch and in any
arrival order. Sampling is Gumbel-max over the filtered logits (``argmax(logits / T + g)``,
g ~ Gumbel(0, 1)), which draws exactly from softmax(logits / T) restricted to the filter.
Only the B chosen ids and their log-probabilities leave the device, never the B x V logits.

``pick_numpy`` serves the ONNX backend (its logits are host arrays); ``pick_torch`` the torch
backends (logits stay on their device; each row's noise comes from a ``torch.Generator`` there).

``Detokenizer`` turns a row's ids into text deltas incrementally (a window of the last few
tokens is decoded, not the whole text) and finds stop strings in the new text only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass
class Sampler:
    """One row's sampling settings. ``temperature < GREEDY_BELOW`` (0 included): greedy (argmax,
    no randomness); such a temperature is too small to tell from greedy, and dividing logits by
    it would overflow (1e-320 turns every logit into inf). Sampling divides ``logits - max``,
    never above 0, so no temperature overflows."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed (unseeded rows differ from each other)
    top_n: int = 0  # also return this many most likely alternatives per token (OpenAI logprobs)
    _np: object = field(default=None, repr=False)
    _torch: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbits(63)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def numpy_rng(self) -> np.random.Generator:
        if self._np is None:
            self._np = np.random.default_rng(self.seed)
        return self._np

    def torch_rng(self, device):
        import torch

        key = str(device)
        if key not in self._torch:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._torch[key] = g
        return self._torch[key]


def _filter_np(x: np.ndarray, s: Sampler) -> np.ndarray:
    """``[V]`` float64 scaled logits with everything outside top-k / top-p set to -inf."""
    if s.top_k is not None and s.top_k < x.shape[-1]:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x >= kth, x, -np.inf)
    if s.top_p is not None and s.top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        cum = np.cumsum(p / p.sum())
        x[order[np.searchsorted(cum, s.top_p) + 1:]] = -np.inf  # keep the smallest set >= top_p
    return x


def _tops_numpy(lp: np.ndarray, samplers: list[Sampler]) -> list | None:
    n = max((s.top_n for s in samplers), default=0)
    if not n:
        return None
    order = np.argsort(-lp, axis=-1, kind="stable")[:, :n]
    return [[(int(i), float(lp[b, i])) for i in order[b, : s.top_n]] for b, s in enumerate(samplers)]


def pick_numpy(logits: np.ndarray, samplers: list[Sampler]):
    """logits ``[B, V]`` -> (chosen ids ``[B]`` int64, their log-probs under the model ``[B]``,
    per row its ``top_n`` most likely ``(id, log-prob)`` or None when no row asks for them)."""
    x = np.asarray(logits)
    ids = np.empty(len(samplers), np.int64)
    for b, s in enumerate(samplers):
        if s.greedy:
            ids[b] = int(np.argmax(x[b]))
            continue
        xb = x[b].astype(np.float64)
        z = _filter_np((xb - xb.max()) / s.temperature, s)  # <= 0: cannot overflow
        g = s.numpy_rng().gumbel(size=z.shape[-1])
        ids[b] = int(np.argmax(z + g))
    # log-probs: logsumexp per row, the exponentials in the logits' precision (<= 1 each,
    # relative error ~1e-7) summed in float64; one pass over [B, V] instead of four in float64
    m = x.max(-1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(-1, dtype=np.float64))  # [B]
    rows = np.arange(len(ids))
    chosen = x[rows, ids].astype(np.float64) - lse
    tops = None
    if any(s.top_n for s in samplers):
        tops = _tops_numpy(x.astype(np.float64) - lse[:, None], samplers)
    return ids, chosen, tops


def pick_torch(logits, samplers: list[Sampler]):
    """logits ``[B, V]`` on any device -> (ids ``[B]``, log-probs ``[B]``, top alternatives or
    None) as host values; one device-to-host copy of 2 x B numbers (plus the asked tops)."""
    import torch

    x = logits.float()
    ids = x.argmax(-1)
    for b, s in enumerate(samplers):
        if s.greedy:
            continue
        z = (x[b] - x[b].max()) / s.temperature  # <= 0: cannot overflow
        if s.top_k is not None and s.top_k < z.shape[-1]:
            kth = torch.topk(z, s.top_k).values[-1]
            z = torch.where(z >= kth, z, -torch.inf)
        if s.top_p is not None and s.top_p < 1:
            srt, order = torch.sort(z, descending=True, stable=True)
            cum = torch.cumsum(torch.softmax(srt, -1), -1)
            cut = torch.searchsorted(cum, torch.tensor([s.top_p], device=z.device)) + 1
            drop = order[torch.arange(z.shape[-1], device=z.device) >= cut]
            z = z.index_fill(0, drop, -torch.inf)
        u = torch.rand(z.shape, generator=s.torch_rng(z.device), device=z.device)
        g = -torch.log(-torch.log(u.clamp_min(1e-20)))
        ids[b] = torch.argmax(z + g)
    all_lp = torch.log_softmax(x, -1)
    lp = all_lp.gather(-1, ids[:, None])[:, 0]
    out = torch.stack([ids.double(), lp.double()]).cpu().numpy()
    n = max((s.top_n for s in samplers), default=0)
    tops = None
    if n:
        val, idx = torch.topk(all_lp, n, dim=-1)
        val, idx = val.double().cpu().numpy(), idx.cpu().numpy()
        tops = [[(int(i), float(v)) for i, v in zip(idx[b, : s.top_n], val[b, : s.top_n])]
                for b, s in enumerate(samplers)]
    return out[0].astype(np.int64), out[1], tops


class Detokenizer:
    """Incremental text of one row's generated ids, with stop strings found in new text only.

    ``add(id)`` returns the text that became final with this id: a token that ends inside a
    multi-byte character, or text that could be the start of a stop string, is held back until
    the next ids decide it; ``flush()`` returns what is held when the row ends otherwise. Only
    the last few tokens are decoded each step (as vLLM's detokenizer does), so a generation
    costs O(tokens), not O(tokens²). The concatenated deltas equal ``text``, which is cut
    before the first stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (held-back characters included)
        self.emitted = 0  # characters of text already returned
        self._prefix = 0  # ids[_prefix:_read] were decoded already: the context window
        self._read = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one id; returns the new final text. Sets ``stopped`` at a stop string."""
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self._prefix: self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before) or not now.startswith(before):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        old = len(self.text)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        safe = len(self.text)
        if self.stop:
            start = max(0, old - max(len(s) for s in self.stop) + 1)  # may straddle old text
            cuts = [self.text.find(s, start) for s in self.stop]
            cuts = [c for c in cuts if c >= 0]
            if cuts:
                self.stopped = True
                self.text = self.text[: min(cuts)]
                return self.flush()
            safe -= max((k for s in self.stop for k in range(1, len(s))
                         if self.text.endswith(s[:k])), default=0)
        delta = self.text[self.emitted: safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """The held-back text, at the end of the row."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
