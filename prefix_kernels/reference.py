"""PyTorch references of the kernels: the semantics the Triton kernels are tested against, and
the CPU serving path of the torch backend (efficient: the prefix is never copied per row).

    prefix_attention_ref  reference of prefix_attention / prefix_attention_cascade / run_attention
                          (same arguments, semantics and outputs; see prefix_attention.py)
    write_kv_ref          reference of write_kv: append one token's K/V to per-row decode buffers
    plan_reference        what the reference derives from the lengths alone (masks, row groups):
                          the same for every layer of a forward, so an AttentionPlan makes it once
    attend_reference      one layer's attention from such a plan
    Plans                 the per-call functions' optional per-forward cache of their plans

Shapes (letters as in the package docstring): q [B, H, Lq, D]; k, v [B, Hkv, Lk, D];
prefix_k, prefix_v [N, Hkv, Pmax, D]; prefix_lens [N]; prompt_idx [B]; kv_lens, q_lens [B] or
None; out [B, H, Lq, D] in q.dtype; lse [B, H, Lq] float32.
"""

import math
from typing import NamedTuple

import torch

from ._inputs import Dims, check_inputs, check_lengths, check_write_kv


class RefPlan(NamedTuple):
    """What the reference derives from the length/index tensors alone: the same for every layer
    of one forward, so it is made once per forward (``plan_reference``)."""

    K: int  # own keys of the longest row (keys beyond it are never visible)
    own_ok: torch.Tensor  # [B, Lq, K] bool: query i of row b may see own key j
    q_ok: torch.Tensor  # [B, Lq] bool: real queries
    groups: list  # [(n, rows [b] int64, P)] each prompt present, its rows and prefix length
    dims: tuple  # the dims it was made for


class Plans:
    """Index plans of one forward for the per-call functions (``prefix_attention_ref(...,
    plans=)``, ``prefix_attention_cascade``, ``prefix_attention_auto``), made on first use and
    reused by every layer of it. New code makes one ``AttentionPlan`` per forward instead
    (``plan_attention``); this stays for callers of the per-call functions.

    The caller owns them and makes a new ``Plans`` per forward; nothing is cached at module
    level. ``ref``: the reference's masks and row groups (made with a device sync); ``cascade``:
    the cascade kernel's ``plan_cascade`` (no sync)."""

    def __init__(self):
        self.ref: RefPlan | None = None
        self.cascade = None  # CascadePlan | None


def plan_reference(dims: Dims, prefix_lens, prompt_idx, kv_lens, q_lens,
                   plans: Plans | None = None) -> RefPlan:
    """The reference's masks and row groups. The length values are checked here (a device sync),
    once per plan. plans: reuse the plan kept there for the same dims, else keep this one there
    (the same length tensors must come back)."""
    if plans is not None and plans.ref is not None and plans.ref.dims == tuple(dims):
        return plans.ref
    B, Lq, Lk, dev = dims.B, dims.Lq, dims.Lk, prompt_idx.device
    if B == 0 or Lq == 0:  # nothing to attend: no masks, no groups, no sync
        empty = torch.zeros(B, Lq, 0, dtype=torch.bool, device=dev)
        return RefPlan(0, empty, empty[:, :, 0], [], tuple(dims))
    kv = torch.full((B,), Lk, device=dev) if kv_lens is None else kv_lens.long()
    ql = torch.full((B,), Lq, device=dev) if q_lens is None else q_lens.long()
    check_lengths(dims, prefix_lens, prompt_idx, kv, ql)
    K = int(kv.max())
    pos = (kv - ql)[:, None] + torch.arange(Lq, device=dev)  # [B, Lq] own position of query i
    j = torch.arange(K, device=dev)
    own_ok = (j <= pos[:, :, None]) & (j < kv[:, None, None])  # [B, Lq, K]
    q_ok = torch.arange(Lq, device=dev) < ql[:, None]  # [B, Lq]
    groups = [(n, torch.nonzero(prompt_idx == n).squeeze(1), int(prefix_lens[n]))
              for n in torch.unique(prompt_idx).tolist()]
    plan = RefPlan(K, own_ok, q_ok, groups, tuple(dims))
    if plans is not None:
        plans.ref = plan
    return plan


def attend_reference(plan: RefPlan, q, k, v, prefix_k, prefix_v, scale: float | None = None,
                     return_lse: bool = False):
    """One layer of prefix attention from a ``plan_reference`` plan (inputs already checked).

    Rows are grouped by prompt. Within a group, every row's queries of every head sharing a
    key/value head are stacked into the M dimension of one [Hkv, M, D] @ [Hkv, D, P] product
    against the prompt's prefix (Hydragen style), so the prefix is read once per group and never
    expanded per row. Own-key scores are a batched per-row product. Scores are masked (causal over
    own keys, kv_lens, q_lens), softmaxed in float32, and applied to the prefix and own values.
    """
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.zeros(B, H, Lq, D, device=q.device, dtype=q.dtype)
    lse = torch.full((B, H, Lq), -math.inf, device=q.device, dtype=torch.float32)
    K, own_ok, q_ok, groups, _ = plan
    for n, rows, P in groups:
        b = rows.numel()
        qg = q[rows].float().reshape(b, Hkv, G * Lq, D)  # [b, Hkv, G*Lq, D]
        pk = prefix_k[n, :, :P].float()  # [Hkv, P, D]: one copy per prompt, not per row
        pv = prefix_v[n, :, :P].float()
        # prefix scores: rows x (G heads x Lq queries) stacked into M -> [Hkv, b*G*Lq, P]
        qm = qg.transpose(0, 1).reshape(Hkv, b * G * Lq, D)
        s_pre = torch.bmm(qm, pk.transpose(1, 2)).view(Hkv, b, G * Lq, P).transpose(0, 1)
        kg, vg = k[rows, :, :K].float(), v[rows, :, :K].float()  # [b, Hkv, K, D]
        s_own = torch.matmul(qg, kg.transpose(-1, -2))  # [b, Hkv, G*Lq, K]
        s_own = s_own.view(b, Hkv, G, Lq, K).masked_fill(~own_ok[rows][:, None, None], -math.inf)
        s = torch.cat([s_pre.reshape(b, Hkv, G, Lq, P), s_own], dim=-1) * scale  # [b, Hkv, G, Lq, P+K]
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # nothing visible: keep exp finite
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)  # [b, Hkv, G, Lq, 1]
        p_pre, p_own = p.split([P, K], dim=-1)
        o_pre = torch.bmm(p_pre.reshape(b, Hkv, G * Lq, P).transpose(0, 1).reshape(Hkv, b * G * Lq, P), pv)
        o_pre = o_pre.view(Hkv, b, G * Lq, D).transpose(0, 1)  # [b, Hkv, G*Lq, D]
        o_own = torch.matmul(p_own.reshape(b, Hkv, G * Lq, K), vg)
        o = (o_pre + o_own).view(b, Hkv, G, Lq, D) / torch.where(l > 0, l, torch.ones_like(l))
        ok = q_ok[rows][:, None, None, :]  # [b, 1, 1, Lq]
        out[rows] = torch.where(ok[..., None], o, 0.0).reshape(b, H, Lq, D).to(q.dtype)
        lse[rows] = torch.where(ok, (m + torch.log(l)).squeeze(-1), -math.inf).reshape(b, H, Lq)
    return (out, lse) if return_lse else out


def prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    prompt_idx: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    plans: Plans | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch prefix attention; same arguments, semantics and outputs as `prefix_attention`
    (computed as in `attend_reference`).

    Also checks the length values (prompt_idx in range, q_lens <= kv_lens <= Lk, ...), which
    syncs with the device. plans: this forward's ``Plans``: the masks and groups are made once
    and reused by the other layers (the same length tensors must come back).
    """
    dims = check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    plan = plan_reference(dims, prefix_lens, prompt_idx, kv_lens, q_lens, plans)
    return attend_reference(plan, q, k, v, prefix_k, prefix_v, scale, return_lse)


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """In place: k_cache[b, :, positions[b]] = k_new[b, :, 0] (same for v) for every row b whose
    position lies in [0, cap); rows with another position (e.g. -1 for an idle row) are skipped.

    k_cache, v_cache: [B, Hkv, cap, D]; k_new, v_new: [B, Hkv, 1, D]; positions: [B] int.
    """
    check_write_kv(k_cache, v_cache, k_new, v_new, positions)
    cap = k_cache.shape[2]
    rows = torch.nonzero((positions >= 0) & (positions < cap)).squeeze(1)
    pos = positions[rows].long()
    k_cache[rows, :, pos] = k_new[rows, :, 0]
    v_cache[rows, :, pos] = v_new[rows, :, 0]
