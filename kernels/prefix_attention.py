"""Attention over a shared, cached soft-prompt prefix plus each row's own keys.

For row b and query head h, the new queries of the row attend over

    [prefix K/V of prompt prompt_idx[b]]   read in place from the prefix cache, never copied per row
    [the row's own K/V]                     causal: query i sits at own position kv_lens[b] - q_lens[b] + i

with one online softmax (float32 accumulation). Query head h reads key/value head h // (H // Hkv)
(grouped-query attention). Rows are ragged: queries i >= q_lens[b] cost nothing and produce zeros.

Shapes (letters as in the package docstring; Lq/Lk are the query/own-key extents of the padded
tensors, Pmax the prefix cache's capacity):

    q:           [B, H, Lq, D]      any strides (e.g. a transposed [B, Lq, H, D] projection)
    k, v:        [B, Hkv, Lk, D]    the row's own keys/values (prefill: the new tokens; decode: a
                                    per-row buffer of capacity Lk filled up to kv_lens[b])
    prefix_k/v:  [N, Hkv, Pmax, D]  one layer of the prefix cache, N prompts
    prefix_lens: [N] int            valid prefix length per prompt (0 allowed)
    prompt_idx:  [B] int            prompt of each row (many rows share a prompt)
    kv_lens:     [B] int or None    own keys valid per row (default Lk)
    q_lens:      [B] int or None    queries valid per row (default Lq); q_lens <= kv_lens
    out:         [B, H, Lq, D]      q.dtype; the kernels lay it out as [B, Lq, H, D] memory so that
                                    out.transpose(1, 2).reshape(B, Lq, H * D) is free
    lse:         [B, H, Lq] f32     natural log of the softmax denominator (max included); -inf
                                    for queries that see no key (padding, or nothing to attend to)

Entry points:

    prefix_attention          Triton: prefill kernel (Lq > 1) or decode kernel (Lq == 1)
    prefix_attention_cascade  Triton, Hydragen/FlashInfer-cascade style: the prefix part of all rows
                              of a prompt is one stacked product against that prompt's prefix, the
                              own part is a second kernel that merges the two by log-sum-exp
    prefix_attention_auto     picks one of the two (provisional rule, see its docstring)
    prefix_attention_ref      plain PyTorch, same signature; the CPU serving path of the torch backend
    write_kv / write_kv_ref   append one token's K/V to per-row decode buffers

The Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before
this module was imported (the tests do that). Without Triton the module still imports and the
references work.
"""

import math
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # CPU-only install: the references work, the kernels raise when called

    class _NoTriton:
        """Stand-in so the @triton.jit definitions below can be defined; they are never launched."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    _TRITON_IMPORT_ERROR = _err

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2


# --------------------------------------------------------------------------------------------
# Input checks shared by the kernels and the reference
# --------------------------------------------------------------------------------------------


class _Dims(NamedTuple):
    B: int
    H: int
    Lq: int
    D: int
    Hkv: int
    Lk: int
    N: int
    Pmax: int


def _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens) -> _Dims:
    """Validate shapes, dtypes and devices (no device sync); raise a one-line ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got {got}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    N, Hp, Pmax, Dp = prefix_k.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"k must be [B={B}, Hkv, Lk, D={D}] like q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if (Hp, Dp) != (Hkv, D):
        raise ValueError(f"prefix_k must be [N, Hkv={Hkv}, Pmax, D={D}], got {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if Lq > Lk:
        raise ValueError(f"q has Lq={Lq} queries but k holds only Lk={Lk} own keys; expected Lq <= Lk")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q.dtype must be one of float32/float16/bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype={q.dtype}, got {t.dtype}")
    for name, t, n in (("prefix_lens", prefix_lens, N), ("prompt_idx", prompt_idx, B),
                       ("kv_lens", kv_lens, B), ("q_lens", q_lens, B)):
        if t is None and name in ("kv_lens", "q_lens"):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor of length {n}, got {got}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v),
                    ("prefix_lens", prefix_lens), ("prompt_idx", prompt_idx),
                    ("kv_lens", kv_lens), ("q_lens", q_lens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    return _Dims(B, H, Lq, D, Hkv, Lk, N, Pmax)


def _check_lengths(dims: _Dims, prefix_lens, prompt_idx, kv_lens, q_lens) -> None:
    """Value checks that need the index tensors on the host (the reference only: a device sync)."""
    if dims.B and not bool(((prompt_idx >= 0) & (prompt_idx < dims.N)).all()):
        raise ValueError(f"prompt_idx values must lie in [0, N={dims.N}), got {prompt_idx.tolist()}")
    if dims.N and not bool(((prefix_lens >= 0) & (prefix_lens <= dims.Pmax)).all()):
        raise ValueError(f"prefix_lens values must lie in [0, Pmax={dims.Pmax}], got {prefix_lens.tolist()}")
    if dims.B and not bool(((q_lens >= 0) & (q_lens <= kv_lens) & (kv_lens <= dims.Lk)).all()):
        raise ValueError(f"expected 0 <= q_lens <= kv_lens <= Lk={dims.Lk}, "
                         f"got q_lens={q_lens.tolist()} kv_lens={kv_lens.tolist()}")


# --------------------------------------------------------------------------------------------
# PyTorch references (also the CPU serving path: efficient, never copies the prefix per row)
# --------------------------------------------------------------------------------------------


class _RefPlan(NamedTuple):
    """What the reference derives from the length/index tensors alone: the same for every layer
    of one forward, so it is made once per forward and kept in the caller's ``Plans``."""

    K: int  # own keys of the longest row (keys beyond it are never visible)
    own_ok: torch.Tensor  # [B, Lq, K] bool: query i of row b may see own key j
    q_ok: torch.Tensor  # [B, Lq] bool: real queries
    groups: list  # [(n, rows [b] int64, P)] each prompt present, its rows and prefix length
    dims: tuple  # the dims it was made for


class Plans:
    """Index plans of one forward, made on first use and reused by every layer of it.

    The caller owns them and makes a new ``Plans`` per forward (the torch backend keeps one in
    each forward's batch, so a CUDA graph capture plans from its own static inputs); nothing is
    cached at module level. ``ref``: the reference's masks and row groups (made with a device
    sync); ``cascade``: the cascade kernel's ``plan_cascade`` (no sync)."""

    def __init__(self):
        self.ref: _RefPlan | None = None
        self.cascade: "CascadePlan | None" = None


def _ref_plan(dims: _Dims, prefix_lens, prompt_idx, kv_lens, q_lens) -> _RefPlan:
    """The reference's masks and row groups; value checks run here, once per plan."""
    B, Lq, Lk, dev = dims.B, dims.Lq, dims.Lk, prompt_idx.device
    kv = torch.full((B,), Lk, device=dev) if kv_lens is None else kv_lens.long()
    ql = torch.full((B,), Lq, device=dev) if q_lens is None else q_lens.long()
    _check_lengths(dims, prefix_lens, prompt_idx, kv, ql)
    K = int(kv.max())
    pos = (kv - ql)[:, None] + torch.arange(Lq, device=dev)  # [B, Lq] own position of query i
    j = torch.arange(K, device=dev)
    own_ok = (j <= pos[:, :, None]) & (j < kv[:, None, None])  # [B, Lq, K]
    q_ok = torch.arange(Lq, device=dev) < ql[:, None]  # [B, Lq]
    groups = [(n, torch.nonzero(prompt_idx == n).squeeze(1), int(prefix_lens[n]))
              for n in torch.unique(prompt_idx).tolist()]
    return _RefPlan(K, own_ok, q_ok, groups, tuple(dims))


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
    """Plain PyTorch prefix attention; same arguments, semantics and outputs as `prefix_attention`.

    Rows are grouped by prompt. Within a group, every row's queries of every head sharing a
    key/value head are stacked into the M dimension of one [Hkv, M, D] @ [Hkv, D, P] product
    against the prompt's prefix (Hydragen style), so the prefix is read once per group and never
    expanded per row. Own-key scores are a batched per-row product. Scores are masked (causal over
    own keys, kv_lens, q_lens), softmaxed in float32, and applied to the prefix and own values.
    Also checks the length values (prompt_idx in range, q_lens <= kv_lens <= Lk, ...), which
    syncs with the device. plans: this forward's ``Plans``: the masks and groups are made once
    and reused by the other layers (the same length tensors must come back).
    """
    dims = _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    B, H, Lq, D, Hkv, Lk, N, Pmax = dims
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.zeros(B, H, Lq, D, device=q.device, dtype=q.dtype)
    lse = torch.full((B, H, Lq), -math.inf, device=q.device, dtype=torch.float32)
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out
    plan = plans.ref if plans is not None else None
    if plan is None or plan.dims != tuple(dims):
        plan = _ref_plan(dims, prefix_lens, prompt_idx, kv_lens, q_lens)
        if plans is not None:
            plans.ref = plan
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


def write_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """In place: k_cache[b, :, positions[b]] = k_new[b, :, 0] (same for v) for every row b whose
    position lies in [0, cap); rows with another position (e.g. -1 for an idle row) are skipped.

    k_cache, v_cache: [B, Hkv, cap, D]; k_new, v_new: [B, Hkv, 1, D]; positions: [B] int.
    """
    _check_write_kv(k_cache, v_cache, k_new, v_new, positions)
    cap = k_cache.shape[2]
    rows = torch.nonzero((positions >= 0) & (positions < cap)).squeeze(1)
    pos = positions[rows].long()
    k_cache[rows, :, pos] = k_new[rows, :, 0]
    v_cache[rows, :, pos] = v_new[rows, :, 0]


def _check_write_kv(k_cache, v_cache, k_new, v_new, positions) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [B, Hkv, cap, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hkv, _, D = k_cache.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (B, Hkv, 1, D):
            raise ValueError(f"{name} must be [B={B}, Hkv={Hkv}, 1, D={D}], got {tuple(t.shape)}")
        if t.dtype != k_cache.dtype or t.device != k_cache.device:
            raise ValueError(f"{name} must be {k_cache.dtype} on {k_cache.device} like k_cache, "
                             f"got {t.dtype} on {t.device}")
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(f"v_cache must be {k_cache.dtype} on {k_cache.device} like k_cache, "
                         f"got {v_cache.dtype} on {v_cache.device}")
    if positions.shape != (B,) or positions.dtype.is_floating_point or positions.device != k_cache.device:
        raise ValueError(f"positions must be a [B={B}] integer tensor on {k_cache.device}, "
                         f"got {tuple(positions.shape)} {positions.dtype} on {positions.device}")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _attend_range(
    acc, m_i, l_i,  # running state: [BLOCK_M, BLOCK_D] f32, [BLOCK_M] f32 (log2 units), [BLOCK_M] f32
    q,  # [BLOCK_M, BLOCK_D] query tile, stays in registers/SRAM for every key block
    k_base, v_base,  # pointers to key 0 of one (prompt | row, kv head): keys are [n, D] at these strides
    stride_kn, stride_kd, stride_vn, stride_vd,
    start, end,  # key range [start, end)
    q_pos,  # [BLOCK_M] own position of each query row (used when CAUSAL)
    qk_scale,  # softmax scale * log2(e): scores are kept in log2 units so exp2 is exact
    offs_d, d_ok,  # [BLOCK_D] head-dim offsets and their mask (D may be padded to a power of 2)
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax pass of a query tile over keys [start, end) (flash-attention v2 inner loop)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        kn = n0 + offs_n  # [BLOCK_N]
        k_ok = kn < end
        kn64 = kn.to(tl.int64)  # key offsets in int64: a long per-row buffer can pass 2**31 elements
        kt = tl.load(k_base + kn64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] f32
        if CAUSAL:
            visible = k_ok[None, :] & (kn[None, :] <= q_pos[:, None])
        else:
            visible = k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2 gives 0 (not NaN) and the state stays exactly (m=-inf, l=0, acc=0)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _lse_log2(m_i, l_i):
    """log2 of the softmax denominator, -inf (not NaN, no log of 0) for rows that saw no key."""
    return tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))


@triton.jit
def _start_state(
    q, q_pos, tile_ok,  # [R, BLOCK_D] query tile, [R] own positions, [R] rows that exist
    b, kvh,  # row and kv head of this program
    o_off, lse_off,  # [R, BLOCK_D] / [R] offsets into the cascade's partial output / lse
    part_o_ptr, part_lse_ptr,  # cascade partial result (PREFIX_FROM_PARTIAL)
    pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,  # prefix cache [N, Hkv, Pmax, D], [N], [B]
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    qk_scale, offs_d, d_ok,
    R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PREFIX_FROM_PARTIAL: tl.constexpr,
):
    """Online-softmax state (acc, m, l) after the row's prefix: read from the cascade's
    partial result, or computed here over the prompt's cached prefix (visible to every query,
    no causal mask)."""
    if PREFIX_FROM_PARTIAL:
        # (m = lse, l = 1, acc = normalised output) is the online-softmax state after the prefix
        acc = tl.load(part_o_ptr + o_off, mask=tile_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.load(part_lse_ptr + lse_off, mask=tile_ok, other=float("-inf"))
        l_i = tl.full([R], 1.0, tl.float32)
    else:
        acc = tl.zeros([R, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], dtype=tl.float32)
        p64 = tl.load(prompt_idx_ptr + b).to(tl.int64)
        plen = tl.load(prefix_lens_ptr + p64).to(tl.int32)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q,
            pk_ptr + p64 * stride_pkn + kvh.to(tl.int64) * stride_pkh,
            pv_ptr + p64 * stride_pvn + kvh.to(tl.int64) * stride_pvh,
            stride_pkp, stride_pkd, stride_pvp, stride_pvd,
            0, plen, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_fwd(
    q_ptr,  # [B, H, Lq, D]
    k_ptr,  # [B, Hkv, Lk, D] the row's own keys
    v_ptr,  # [B, Hkv, Lk, D]
    pk_ptr,  # [N, Hkv, Pmax, D] prefix keys, shared by all rows of a prompt
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    prompt_idx_ptr,  # [B] int
    kv_lens_ptr,  # [B] int, or None (HAS_KV_LENS=False: Lk)
    q_lens_ptr,  # [B] int, or None (HAS_Q_LENS=False: Lq)
    o_ptr,  # [B, H, Lq, D] out, q's dtype
    lse_ptr,  # [B, H, Lq] f32 out (STORE_LSE), contiguous
    part_o_ptr,  # [B, H, Lq, D] f32, o's strides: normalised prefix part (PREFIX_FROM_PARTIAL)
    part_lse_ptr,  # [B, H, Lq] f32, contiguous: its log2-sum-exp (PREFIX_FROM_PARTIAL)
    qk_scale, H, Lq, Lk,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    GROUP: tl.constexpr,  # H // Hkv query heads per key/value head
    BLOCK_Q: tl.constexpr,  # queries per program; BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,  # tile rows = (query, head-in-group) pairs
    BLOCK_N: tl.constexpr,  # keys per inner step
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2 (>= 16 for tl.dot)
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    PREFIX_FROM_PARTIAL: tl.constexpr,  # cascade: start from the prefix part instead of reading the prefix
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else "tf32" (ignored)
):
    """Prefill: one program = BLOCK_Q queries x the GROUP query heads of one kv head of one row.

    Packing the GROUP heads into the tile rows means each K/V block (prefix and own) is loaded
    once per kv head and reused by all its query heads, as in vLLM's unified attention.
    """
    tl.static_assert(BLOCK_Q * GROUP <= BLOCK_M)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)  # tl.dot needs 16 x 16 tiles
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)  # every base offset in int64: caches and batches can pass 2**31 elements

    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    else:
        q_len = Lq
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        kv_len = Lk

    offs_r = tl.arange(0, BLOCK_M)
    qi = pid_q * BLOCK_Q + offs_r // GROUP  # [BLOCK_M] query index of each tile row
    h = kvh * GROUP + offs_r % GROUP  # [BLOCK_M] query head of each tile row
    row_in = (offs_r < BLOCK_Q * GROUP) & (qi < Lq)  # tile rows that exist in `out`
    row_ok = row_in & (qi < q_len)  # tile rows that are real queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qi64 = qi.to(tl.int64)
    h64 = h.to(tl.int64)
    o_off = b64 * stride_ob + h64[:, None] * stride_oh + qi64[:, None] * stride_om + offs_d[None, :] * stride_od
    lse_off = (b64 * H + h64) * Lq + qi64  # [BLOCK_M] into contiguous [B, H, Lq]

    if pid_q * BLOCK_Q >= q_len:
        # padding queries of a short row: write zeros and skip all attention work
        tl.store(o_ptr + o_off, tl.zeros([BLOCK_M, BLOCK_D], dtype=o_ptr.dtype.element_ty),
                 mask=row_in[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + lse_off, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_in)
        return

    q_pos = kv_len - q_len + qi  # [BLOCK_M] own position of each query (decode/chunked: after the cache)
    q = tl.load(q_ptr + b64 * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # q stays in SRAM for the whole loop: prefix blocks first, then own blocks

    acc, m_i, l_i = _start_state(
        q, q_pos, row_ok, b, kvh, o_off, lse_off, part_o_ptr, part_lse_ptr,
        pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,
        stride_pkn, stride_pkh, stride_pkp, stride_pkd, stride_pvn, stride_pvh, stride_pvp, stride_pvd,
        qk_scale, offs_d, d_ok, BLOCK_M, BLOCK_D, BLOCK_N, DOT_PRECISION, PREFIX_FROM_PARTIAL)

    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    first_pos = kv_len - q_len + pid_q * BLOCK_Q  # own position of the block's first query
    last_end = tl.minimum(first_pos + BLOCK_Q, kv_len)  # one past the block's last query position
    # own keys [0, first_pos] are visible to every query of the block: no causal mask
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        0, first_pos + 1, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)
    # the diagonal band (first_pos, last_end): causal mask
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        first_pos + 1, last_end, q_pos, qk_scale, offs_d, d_ok, True, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = _lse_log2(m_i, l_i) * 0.6931471805599453  # log2 units -> natural log
        tl.store(lse_ptr + lse_off, tl.where(row_ok, lse, float("-inf")), mask=row_in)


@triton.jit
def _prefix_attention_decode(
    q_ptr,  # [B, H, 1, D]
    k_ptr,  # [B, Hkv, Lk, D] per-row buffers, valid up to kv_lens[b] (current token included)
    v_ptr,  # [B, Hkv, Lk, D]
    pk_ptr,  # [N, Hkv, Pmax, D]
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    prompt_idx_ptr,  # [B] int
    kv_lens_ptr,  # [B] int, or None (Lk)
    q_lens_ptr,  # [B] int (0: idle row, 1: active), or None (all active)
    o_ptr,  # [B, H, 1, D]
    lse_ptr,  # [B, H, 1] f32, contiguous (STORE_LSE)
    part_o_ptr,  # [B, H, 1, D] f32, o's strides (PREFIX_FROM_PARTIAL)
    part_lse_ptr,  # [B, H, 1] f32, contiguous
    qk_scale, H, Lk,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a power of 2, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    PREFIX_FROM_PARTIAL: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode (one new query per row): one program = the GROUP query heads of one kv head of one row.

    The tile rows are the query heads, so every prefix/own K/V block is read once per kv head;
    the single query sits at the end of the row, so no causal mask is needed.
    """
    tl.static_assert(BLOCK_G >= GROUP)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    b64 = b.to(tl.int64)
    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    else:
        q_len = 1
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        kv_len = Lk

    offs_g = tl.arange(0, BLOCK_G)
    h64 = (kvh * GROUP + offs_g).to(tl.int64)
    g_ok = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    o_off = b64 * stride_ob + h64[:, None] * stride_oh + offs_d[None, :] * stride_od
    lse_off = b64 * H + h64

    if q_len == 0:
        # idle row in a ragged decode batch
        tl.store(o_ptr + o_off, tl.zeros([BLOCK_G, BLOCK_D], dtype=o_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + lse_off, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g_ok)
        return

    q = tl.load(q_ptr + b64 * stride_qb + h64[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D], stays in SRAM
    q_pos = tl.full([BLOCK_G], 0, tl.int32) + (kv_len - 1)
    acc, m_i, l_i = _start_state(
        q, q_pos, g_ok, b, kvh, o_off, lse_off, part_o_ptr, part_lse_ptr,
        pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,
        stride_pkn, stride_pkh, stride_pkp, stride_pkd, stride_pvn, stride_pvh, stride_pvp, stride_pvd,
        qk_scale, offs_d, d_ok, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, PREFIX_FROM_PARTIAL)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q,
        k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh,
        v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        0, kv_len, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + lse_off, _lse_log2(m_i, l_i) * 0.6931471805599453, mask=g_ok)


@triton.jit
def _shared_prefix_fwd(
    q_ptr,  # [B, H, Lq, D]
    pk_ptr,  # [N, Hkv, Pmax, D]
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    q_lens_ptr,  # [B] int, or None (Lq)
    rows_ptr,  # [B] int64: row ids sorted by prompt (rows of prompt n are rows[seg_start[n]:][:seg_count[n]])
    seg_start_ptr,  # [N] int64
    seg_count_ptr,  # [N] int64
    block_start_ptr,  # [N + 1] int64: first program of each prompt; block_start[N] = programs in use
    part_o_ptr,  # [B, H, Lq, D] f32 out: prefix-only attention, normalised
    part_lse_ptr,  # [B, H, Lq] f32 out, contiguous: log2-sum-exp of the prefix scores
    qk_scale, H, Lq, N,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # stacked (row, query, head-in-group) triples per program
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Cascade, prefix part: the queries of ALL rows of one prompt are stacked into the tile rows,
    so one K/V block of that prompt's prefix serves BLOCK_M (row, query, head) triples at once
    (Hydragen's inter-sequence batching): the prefix is read once per BLOCK_M stacked queries
    instead of once per row, and the dots have full-height tiles even in decode.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    if pid >= tl.load(block_start_ptr + N):
        return  # the grid is an upper bound so that planning needs no device sync
    # binary search for the prompt n with block_start[n] <= pid < block_start[n + 1]
    lo = pid * 0  # int32 tensors (not constants) so the loop may reassign them
    hi = lo + N
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(block_start_ptr + mid) <= pid:
            lo = mid
        else:
            hi = mid
    n64 = lo.to(tl.int64)

    per_row = Lq * GROUP
    s = (pid - tl.load(block_start_ptr + n64)) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] stacked index
    s_ok = s < tl.load(seg_count_ptr + n64) * per_row
    b64 = tl.load(rows_ptr + tl.load(seg_start_ptr + n64) + s // per_row, mask=s_ok, other=0).to(tl.int64)
    qi = (s // GROUP) % Lq
    h64 = (kvh * GROUP + s % GROUP).to(tl.int64)
    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b64, mask=s_ok, other=0).to(tl.int32)
    else:
        q_len = Lq
    ok = s_ok & (qi < q_len)
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b64[:, None] * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    plen = tl.load(prefix_lens_ptr + n64).to(tl.int32)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q,
        pk_ptr + n64 * stride_pkn + kvh.to(tl.int64) * stride_pkh,
        pv_ptr + n64 * stride_pvn + kvh.to(tl.int64) * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd,
        0, plen, qi, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = b64[:, None] * stride_ob + h64[:, None] * stride_oh + qi64[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(part_o_ptr + o_off, out, mask=ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + (b64 * H + h64) * Lq + qi64, _lse_log2(m_i, l_i), mask=ok)


@triton.jit
def _write_kv(
    kc_ptr,  # [B, Hkv, cap, D]
    vc_ptr,  # [B, Hkv, cap, D]
    kn_ptr,  # [B, Hkv, 1, D]
    vn_ptr,  # [B, Hkv, 1, D]
    pos_ptr,  # [B] int: slot to write; outside [0, cap) means "skip this row"
    Hkv, cap,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    BLOCK_H: tl.constexpr,  # Hkv rounded up to a power of 2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per row: copy the row's [Hkv, D] new key and value into slot positions[b]."""
    b64 = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + b64).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < Hkv) & (offs_d[None, :] < HEAD_DIM)
    if (pos >= 0) & (pos < cap):  # rows parked at position -1 (idle) write nothing
        k = tl.load(kn_ptr + b64 * stride_knb + offs_h[:, None] * stride_knh + offs_d[None, :] * stride_knd,
                    mask=ok)
        v = tl.load(vn_ptr + b64 * stride_vnb + offs_h[:, None] * stride_vnh + offs_d[None, :] * stride_vnd,
                    mask=ok)
        tl.store(kc_ptr + b64 * stride_kcb + offs_h[:, None] * stride_kch + pos * stride_kcn
                 + offs_d[None, :] * stride_kcd, k, mask=ok)
        tl.store(vc_ptr + b64 * stride_vcb + offs_h[:, None] * stride_vch + pos * stride_vcn
                 + offs_d[None, :] * stride_vcd, v, mask=ok)


# --------------------------------------------------------------------------------------------
# Launch configuration and public wrappers
# --------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    block_m: int  # prefill tile rows (queries x heads of a group)
    block_n: int  # keys per inner step
    cascade_block_m: int  # stacked queries per program in the cascade's prefix part
    num_warps: int
    num_stages: int


def _config(device: torch.device, D: int) -> _Config:
    if device.type != "cuda":  # TRITON_INTERPRET=1: few, mid-sized tiles keep the interpreter fast
        return _Config(block_m=32, block_n=32, cascade_block_m=32, num_warps=4, num_stages=1)
    # provisional GPU choice (H100/H200, D <= 128); bench/gpu_check.sh measures it
    return _Config(block_m=64, block_n=64 if D <= 64 else 32, cascade_block_m=128, num_warps=4, num_stages=2)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(x))


def _require_kernels(q: torch.Tensor, D: int) -> None:
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not installed ({_TRITON_IMPORT_ERROR}); use prefix_attention_ref")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels need CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set "
                         "before importing this module; on CPU use prefix_attention_ref")
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is larger than the kernels' limit {_MAX_HEAD_DIM}")


def _new_out(dims: _Dims, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # [B, H, Lq, D] view of [B, Lq, H, D] memory: the caller's transpose(1, 2).reshape is free
    return torch.empty(dims.B, dims.Lq, dims.H, dims.D, dtype=dtype, device=device).transpose(1, 2)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_own(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, scale,
                out, lse, part_o, part_lse, dims: _Dims) -> None:
    """Run the prefill or decode kernel; with part_o/part_lse it starts from the cascade's prefix part."""
    B, H, Lq, D, Hkv, Lk, N, Pmax = dims
    G = H // Hkv
    cfg = _config(q.device, D)
    from_partial = part_o is not None
    common = dict(
        GROUP=G, BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=_pow2_at_least(D),
        HAS_KV_LENS=kv_lens is not None, HAS_Q_LENS=q_lens is not None,
        PREFIX_FROM_PARTIAL=from_partial, STORE_LSE=lse is not None,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, out, lse,
            part_o, part_lse, scale * 1.4426950408889634, H)
    if Lq == 1:
        # grid: one program per (row, kv head); its GROUP query heads share every K/V load
        _prefix_attention_decode[(B, Hkv)](
            *args, Lk,
            q.stride(0), q.stride(1), q.stride(3),
            *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            out.stride(0), out.stride(1), out.stride(3),
            BLOCK_G=_pow2_at_least(G), **common)
    else:
        block_m = max(cfg.block_m, triton.next_power_of_2(G))
        block_q = block_m // G
        if B > _MAX_GRID_YZ:
            raise ValueError(f"batch B={B} is larger than the prefill grid's limit {_MAX_GRID_YZ}")
        # grid: (query blocks of BLOCK_Q queries, kv heads, rows); blocks past a row's q_lens only write zeros
        _prefix_attention_fwd[(triton.cdiv(Lq, block_q), Hkv, B)](
            *args, Lq, Lk,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(),
            BLOCK_Q=block_q, BLOCK_M=block_m, **common)


def prefix_attention(
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
    """Fused attention of each row's new queries over its prompt's cached prefix, then its own keys.

    Args:
        q: [B, H, Lq, D] new queries, any strides.
        k, v: [B, Hkv, Lk, D] the row's own keys/values (not the prefix), any strides.
        prefix_k, prefix_v: [N, Hkv, Pmax, D] prefix cache of N prompts for this layer; read in place.
        prefix_lens: [N] int, valid prefix length per prompt (0 allowed).
        prompt_idx: [B] int, prompt of each row, in [0, N).
        kv_lens: [B] int, own keys valid per row (default Lk). Decode: filled length incl. the new token.
        q_lens: [B] int, valid queries per row (default Lq); q_lens <= kv_lens. Query i sits at own
            position kv_lens - q_lens + i and sees own keys up to and including that position.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the float32 [B, H, Lq] natural-log softmax denominator.
        plans: accepted for a signature shared with the other entry points (this kernel needs
            no plan).

    Returns:
        out [B, H, Lq, D] in q.dtype (zeros for queries >= q_lens), and lse if return_lse.
        Index values (prompt_idx range, lengths) are not checked here, to avoid a device sync;
        prefix_attention_ref checks them.
    """
    dims = _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    _require_kernels(q, dims.D)
    scale = dims.D**-0.5 if scale is None else float(scale)
    out = _new_out(dims, q.dtype, q.device)
    lse = torch.empty(dims.B, dims.H, dims.Lq, dtype=torch.float32, device=q.device) if return_lse else None
    if dims.B and dims.Lq:
        _launch_own(q, k, v, prefix_k, prefix_v, prefix_lens.contiguous(), prompt_idx.contiguous(),
                    None if kv_lens is None else kv_lens.contiguous(),
                    None if q_lens is None else q_lens.contiguous(), scale, out, lse, None, None, dims)
    return (out, lse) if return_lse else out


class CascadePlan(NamedTuple):
    """Rows grouped by prompt, computed on the device without a sync. It depends only on
    prompt_idx, N, Lq, H/Hkv and the device: plan once per forward and reuse it for every layer."""

    rows: torch.Tensor  # [B] int64 row ids sorted by prompt
    seg_start: torch.Tensor  # [N] int64 first position in `rows` of each prompt
    seg_count: torch.Tensor  # [N] int64 rows per prompt
    block_start: torch.Tensor  # [N + 1] int64 first program of each prompt
    grid: int  # upper bound on programs in use: cdiv(B * Lq * G, BLOCK_M) + min(N, B)
    block_m: int
    key: tuple  # (B, N, Lq, G, device) the plan was made for


def plan_cascade(prompt_idx: torch.Tensor, num_prompts: int, Lq: int, group: int) -> CascadePlan:
    """Group rows by prompt for `prefix_attention_cascade` (no device sync)."""
    B, N, dev = prompt_idx.shape[0], num_prompts, prompt_idx.device
    block_m = max(_config(dev, 0).cascade_block_m, 16)
    sorted_idx, rows = torch.sort(prompt_idx.long(), stable=True)
    prompts = torch.arange(N, device=dev)
    seg_start = torch.searchsorted(sorted_idx, prompts)
    seg_count = torch.searchsorted(sorted_idx, prompts, right=True) - seg_start
    blocks = (seg_count * (Lq * group) + block_m - 1) // block_m
    block_start = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    block_start[1:] = torch.cumsum(blocks, 0)
    grid = -(-B * Lq * group // block_m) + min(N, B)
    return CascadePlan(rows, seg_start, seg_count, block_start, grid, block_m, (B, N, Lq, group, dev))


def prefix_attention_cascade(
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
    plan: CascadePlan | None = None,
    plans: Plans | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `prefix_attention`, computed in two kernels (Hydragen / FlashInfer cascade):

    1. prefix part: for each prompt, the queries of all its rows (x heads of a group) are stacked
       against the prompt's prefix once; writes a normalised float32 output and its log-sum-exp;
    2. own part: the prefill/decode kernel starts its online softmax from that state and runs over
       the row's own keys, which merges the two parts by log-sum-exp in its epilogue.

    plan: optional `plan_cascade(prompt_idx, N, Lq, H // Hkv)` to reuse across layers; or
    plans: this forward's ``Plans``, where the plan is made on first use and kept for the other
        layers; without either the plan is made here.
    """
    dims = _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    _require_kernels(q, dims.D)
    B, H, Lq, D, Hkv, Lk, N, Pmax = dims
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = _new_out(dims, q.dtype, q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out
    if plan is None and plans is not None and plans.cascade is not None \
            and plans.cascade.key == (B, N, Lq, G, q.device):
        plan = plans.cascade
    if plan is None:
        plan = plan_cascade(prompt_idx, N, Lq, G)
        if plans is not None:
            plans.cascade = plan
    elif plan.key != (B, N, Lq, G, q.device):
        raise ValueError(f"plan was made for (B, N, Lq, G, device)={plan.key}, "
                         f"expected {(B, N, Lq, G, q.device)}")
    prefix_lens, prompt_idx = prefix_lens.contiguous(), prompt_idx.contiguous()
    kv_lens = None if kv_lens is None else kv_lens.contiguous()
    q_lens = None if q_lens is None else q_lens.contiguous()
    cfg = _config(q.device, D)
    part_o = torch.empty_like(out, dtype=torch.float32)  # same [B, Lq, H, D] memory layout as out
    part_lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    # grid: (stacked blocks of BLOCK_M (row, query, head) triples, grouped by prompt, kv heads)
    _shared_prefix_fwd[(plan.grid, Hkv)](
        q, prefix_k, prefix_v, prefix_lens, q_lens, plan.rows, plan.seg_start, plan.seg_count,
        plan.block_start, part_o, part_lse, scale * 1.4426950408889634, H, Lq, N,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *part_o.stride(),
        GROUP=G, BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=_pow2_at_least(D),
        HAS_Q_LENS=q_lens is not None, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps * (2 if plan.block_m >= 128 else 1), num_stages=cfg.num_stages)
    _launch_own(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, scale,
                out, lse, part_o, part_lse, dims)
    return (out, lse) if return_lse else out


def use_cascade(B: int, N: int, Pmax: int, Lq: int) -> bool:
    """PROVISIONAL heuristic, from shapes only (no device sync), awaiting GPU measurements from
    bench/gpu_check.sh: the cascade pays two launches, a plan and a float32 round trip of the
    output, and wins when the prefix would otherwise be re-read by many rows. So: many rows per
    prompt (B >= 16 and B >= 4 * N, N being the cached prompts of this layer) and a prefix that
    dominates the row's own work (Pmax >= 256 and Pmax >= 4 * Lq)."""
    # PROVISIONAL thresholds: replace with the crossover measured by bench/gpu_check.sh
    return B >= 16 and B >= 4 * N and Pmax >= 256 and Pmax >= 4 * Lq


def prefix_attention_auto(
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
    """`prefix_attention_cascade` when `use_cascade(B, N, Pmax, Lq)` holds, else `prefix_attention`
    (plans: this forward's ``Plans``, for the cascade's plan)."""
    d = _check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    fn = prefix_attention_cascade if use_cascade(d.B, d.N, d.Pmax, d.Lq) else prefix_attention
    return fn(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, scale,
              return_lse, plans=plans)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             positions: torch.Tensor) -> None:
    """Triton version of `write_kv_ref`: in place, k_cache[b, :, positions[b]] = k_new[b, :, 0] (and v)
    for rows whose position is in [0, cap); other rows (e.g. position -1) are left alone.

    k_cache, v_cache: [B, Hkv, cap, D]; k_new, v_new: [B, Hkv, 1, D]; positions: [B] int.
    """
    _check_write_kv(k_cache, v_cache, k_new, v_new, positions)
    B, Hkv, cap, D = k_cache.shape
    _require_kernels(k_cache, D)
    if B == 0:
        return
    # grid: one program per row copies its [Hkv, D] key and value
    _write_kv[(B,)](
        k_cache, v_cache, k_new, v_new, positions.contiguous(), Hkv, cap,
        *k_cache.stride(), *v_cache.stride(),
        k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
        BLOCK_H=triton.next_power_of_2(Hkv), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), num_warps=1)
