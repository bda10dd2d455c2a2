"""The host-side plan of one forward, built once and read by every backend (numpy only).

A forward runs B rows. Row b brings ``q_lens[b]`` new tokens (``ids[b, :q_lens[b]]``) on top of
its prompt's cached prefix (``prefix_lens[b]`` = P virtual tokens) and ``past_lens[b]`` of its own
tokens already cached by earlier steps (decode). Its new token i sits at model position
``P + past + i``, exactly where ``peft.PeftModelForCausalLM`` puts it for the request alone.

Scoring reads the log-probabilities of *targets*: ``ids[j]`` for j >= ``Row.target_start``. A
target j >= 1 is predicted by the row's own column j - 1 (``target_rows``/``target_cols``); a
first token (j = 0, only with a prompt) is predicted by the last virtual token, whose
log-probabilities the prefix cache keeps (``first_rows``). Every backend computes the two
kinds in this order and ``assemble`` turns them back into one array per row, so the arithmetic
of targets and prefixes is written here once. A row may also ask for the ``top_n`` most likely
alternatives of each target position (``Row.top_n``): backends compute ``top_alternatives``
of the same log-probs for ``max_top_n`` and ``assemble`` cuts each row's to its own n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .requests import Row


def prompt_slots(prompts: list) -> tuple[list, np.ndarray, bool]:
    """(distinct SoftPrompts in order of first appearance, ``[B]`` int32 index of each row's
    prompt into them, whether any row has none): rows without a prompt point at slot Np, the
    empty prefix after the distinct prompts."""
    distinct: dict = {}
    for p in prompts:
        if p is not None:
            distinct.setdefault(p.digest, p)
    slot = {d: n for n, d in enumerate(distinct)}
    idx = np.array([slot[p.digest] if p is not None else len(distinct) for p in prompts], np.int32)
    return list(distinct.values()), idx, any(p is None for p in prompts)


@dataclass
class BatchPlan:
    """One forward of B rows (shape letters as in the package docstring; Np distinct prompts).

    rows: the B Rows in batch order.
    prompts: ``[Np]`` distinct SoftPrompts of the batch, in order of first appearance.
    prompt_idx: ``[B]`` int32 row -> index into ``prompts``; rows without a prompt point at
        ``Np`` (an empty prefix slot, present when ``empty_slot``).
    prefix_lens: ``[B]`` int64 P of each row; past_lens: ``[B]`` own tokens already cached.
    q_lens: ``[B]`` new tokens per row; ids: ``[B, L_max]`` int64 new tokens, 0-padded.
    positions: ``[B, L_max]`` int64 model positions ``P + past + i`` (padding: the last real one).
    last_cols: ``[B]`` column of each row's last new token (its next-token logits).
    target_rows, target_cols, target_ids: ``[T]`` own targets (row, column predicting it, id).
    first_rows, first_ids: ``[F]`` rows whose first token is scored from the prefix, and that id.
    top_n: ``[B]`` int64 alternatives each row wants per target (0: none).
    """

    rows: list
    prompts: list
    prompt_idx: np.ndarray
    empty_slot: bool
    prefix_lens: np.ndarray
    past_lens: np.ndarray
    q_lens: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    last_cols: np.ndarray
    target_rows: np.ndarray
    target_cols: np.ndarray
    target_ids: np.ndarray
    first_rows: np.ndarray
    first_ids: np.ndarray
    top_n: np.ndarray

    @property
    def B(self) -> int:
        return len(self.rows)

    @property
    def L_max(self) -> int:
        return int(self.ids.shape[1])

    @property
    def max_top_n(self) -> int:
        """The most alternatives any row wants per target (0: no row wants any)."""
        return int(self.top_n.max(initial=0))

    @property
    def tokens(self) -> int:
        """New tokens computed by this forward (padding excluded)."""
        return int(self.q_lens.sum())

    @classmethod
    def build(cls, rows: list[Row], past_lens=None, score: bool = True) -> "BatchPlan":
        """Plan ``rows`` (``past_lens``: own tokens each row already has cached, default 0).
        ``score=False`` skips the target arrays (prefill and decode need only ``last_cols``)."""
        B = len(rows)
        if B == 0:
            raise ValueError("a batch plan needs at least one row")
        distinct, prompt_idx, empty = prompt_slots([r.prompt for r in rows])
        prefix_lens = np.array([r.num_virtual for r in rows], np.int64)
        past = np.zeros(B, np.int64) if past_lens is None else np.asarray(past_lens, np.int64)
        q_lens = np.array([len(r.ids) for r in rows], np.int64)
        L = int(q_lens.max())
        ids = np.zeros((B, L), np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r.ids)] = r.ids
        cols = np.minimum(np.arange(L)[None], q_lens[:, None] - 1)  # padding repeats the last
        positions = prefix_lens[:, None] + past[:, None] + cols
        t_rows, t_cols, t_ids, f_rows, f_ids = [], [], [], [], []
        if score:
            for b, r in enumerate(rows):
                own = r.own_targets
                t_rows += [b] * len(own)
                t_cols += [j - 1 for j in own]
                t_ids += [r.ids[j] for j in own]
                if r.target_start == 0:
                    f_rows.append(b)
                    f_ids.append(r.ids[0])
        as_i = lambda x: np.array(x, np.int64)  # noqa: E731
        return cls(list(rows), distinct, prompt_idx, empty, prefix_lens, past,
                   q_lens, ids, positions, q_lens - 1, as_i(t_rows), as_i(t_cols), as_i(t_ids),
                   as_i(f_rows), as_i(f_ids), as_i([r.top_n for r in rows]))

    def assemble(self, own_lp: np.ndarray, own_top: np.ndarray, first_lp: np.ndarray,
                 first_top: np.ndarray, own_alt: Alternatives | None = None,
                 first_alt: Alternatives | None = None,
                 ) -> list[tuple[np.ndarray, bool, list[list[tuple[int, float]]]]]:
        """Per row ``(log-probs of its targets in order, is_greedy, alternatives)`` from the
        backend's ``[T]`` own-target and ``[F]`` first-token log-probs, their argmax flags and
        (when ``max_top_n``) their ``top_alternatives``; alternatives: per target the row's
        ``top_n`` most likely ``(id, log-prob)``, or [] for a row that wants none."""
        def pairs(a: Alternatives | None, lo: int, hi: int, k: int) -> list[list[tuple[int, float]]]:
            if a is None:
                raise ValueError("a row wants alternatives the backend did not compute")
            return [list(zip(i, v)) for i, v in zip(a[0][lo:hi, :k].tolist(), a[1][lo:hi, :k].tolist())]

        out, t, f = [], 0, 0
        for r in self.rows:
            n = len(r.own_targets)
            lp, top = own_lp[t: t + n], own_top[t: t + n]
            alts = pairs(own_alt, t, t + n, r.top_n) if r.top_n else []
            t += n
            if r.target_start == 0:
                lp = np.concatenate([first_lp[f: f + 1], lp])
                top = np.concatenate([first_top[f: f + 1], top])
                alts = (pairs(first_alt, f, f + 1, r.top_n) + alts) if r.top_n else []
                f += 1
            out.append((np.asarray(lp, np.float64), bool(np.all(top)), alts))
        return out


Alternatives = tuple[np.ndarray, np.ndarray]  # ([T, n] ids int64, [T, n] log-probs), best first


def top_alternatives(logprobs: np.ndarray, n: int) -> Alternatives:
    """The ``n`` most likely ids and log-probs of each row of ``logprobs [T, V]`` (host arrays;
    ties in id order, as ``sampling.pick_numpy``)."""
    order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :n]
    return order.astype(np.int64), np.take_along_axis(logprobs, order, -1).astype(np.float64)
