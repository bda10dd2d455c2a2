"""Attention over a shared, cached soft-prompt prefix plus each row's own keys: the public API.

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

Per forward (as FlashInfer's plan()/run(), vLLM's metadata build()): everything that is the same
in every layer is decided once, then each layer only runs.

    plan_attention   once per forward: checks shapes, dtype and index tensors, picks the kernel
                     ("auto": cascade or fused by `use_cascade`), makes that kernel's own plan
    run_attention    per layer: checks the layer's tensors against the plan (shape, dtype,
                     device; no sync) and runs the planned kernel

Per call (each builds a plan for its one call, from the tensors):

    prefix_attention          Triton: prefill kernel (Lq > 1) or decode kernel (Lq == 1)
    prefix_attention_auto     picks the fused kernel or the cascade (cascade.use_cascade)
    write_kv                  Triton: append one token's K/V to per-row decode buffers

Elsewhere: the cascade (``cascade.py``), the PyTorch references ``prefix_attention_ref`` /
``write_kv_ref`` (``reference.py``, also the CPU serving path), the kernel bodies
(``_triton.py``), the prefill/decode launcher (``_launch.py``), the input checks (``_inputs.py``).
"""

from dataclasses import dataclass
from typing import Literal

import torch

from . import _triton  # kernel bodies looked up at launch time
from ._inputs import Dims, check_inputs, check_shapes, check_write_kv
from ._launch import launch_own, new_out, require_kernels
from ._triton import triton
from .cascade import CascadePlan, attend_cascade, cascade_plan_for, use_cascade
from .reference import Plans, RefPlan, attend_reference, plan_reference

KERNELS = ("auto", "fused", "cascade", "reference")


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """One forward's attention, planned once by `plan_attention` and read by every layer's
    `run_attention`: the checked sizes, the dtype and device every layer's tensors must have, the
    index tensors, which kernel runs, and that kernel's own plan. Index tensors are held, not
    copied (when contiguous): under CUDA graphs they are the graph's static inputs, refilled in
    place before each replay."""

    dims: Dims  # B, H, Lq, D, Hkv, Lk, N, Pmax
    dtype: torch.dtype
    device: torch.device
    kernel: str  # "fused" (prefix_attention), "cascade" or "reference" (prefix_attention_ref)
    prefix_lens: torch.Tensor  # [N] int, contiguous
    prompt_idx: torch.Tensor  # [B] int, contiguous
    kv_lens: torch.Tensor | None  # [B] int, contiguous, or None (Lk for every row)
    q_lens: torch.Tensor | None  # [B] int, contiguous, or None (Lq for every row)
    ref: RefPlan | None = None  # kernel "reference": masks and row groups (made with a sync)
    cascade: CascadePlan | None = None  # kernel "cascade" with B, Lq > 0: rows grouped by prompt

    @property
    def q_shape(self) -> tuple:  # [B, H, Lq, D]
        return (self.dims.B, self.dims.H, self.dims.Lq, self.dims.D)

    @property
    def kv_shape(self) -> tuple:  # [B, Hkv, Lk, D]
        return (self.dims.B, self.dims.Hkv, self.dims.Lk, self.dims.D)

    @property
    def prefix_shape(self) -> tuple:  # [N, Hkv, Pmax, D]
        return (self.dims.N, self.dims.Hkv, self.dims.Pmax, self.dims.D)


def plan_attention(
    q_shape: tuple,
    kv_shape: tuple,
    prefix_shape: tuple,
    prefix_lens: torch.Tensor,
    prompt_idx: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    *,
    dtype: torch.dtype,
    kernel: Literal["auto", "fused", "cascade", "reference"] = "auto",
) -> AttentionPlan:
    """Plan one forward's attention: every check and decision that is the same in every layer.

    Args:
        q_shape: (B, H, Lq, D) of every layer's queries.
        kv_shape: (B, Hkv, Lk, D) of every layer's own keys and values.
        prefix_shape: (N, Hkv, Pmax, D) of every layer's prefix cache.
        prefix_lens, prompt_idx, kv_lens, q_lens: as for `prefix_attention`; their device is the
            plan's (and every layer's tensors') device.
        dtype: every layer's q/k/v/prefix dtype (float32, float16 or bfloat16).
        kernel: "auto" (the cascade where `use_cascade(B, N, Pmax, Lq)` holds, else "fused"),
            "fused", "cascade" or "reference" (the PyTorch reference: also checks the length
            values, a device sync; the Triton kernels' plans never sync).

    Returns:
        An `AttentionPlan` for `run_attention`. Raises ValueError (one line) on bad shapes or
        index tensors, RuntimeError/ValueError when the Triton kernels cannot run here.
    """
    dims = check_shapes(tuple(q_shape), tuple(kv_shape), tuple(prefix_shape), dtype, prefix_lens,
                        prompt_idx, kv_lens, q_lens, device_of="prompt_idx's device")
    return _plan(dims, dtype, prefix_lens, prompt_idx, kv_lens, q_lens, kernel)


def _plan(dims: Dims, dtype, prefix_lens, prompt_idx, kv_lens, q_lens, kernel: str,
          plans: Plans | None = None) -> AttentionPlan:
    """The plan for checked dims (plans: the per-call functions' cache of kernel plans)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":  # cascade.use_cascade: fused until a measured rule says otherwise
        kernel = "cascade" if use_cascade(dims.B, dims.N, dims.Pmax, dims.Lq) else "fused"
    device = prompt_idx.device
    if kernel != "reference":
        require_kernels(device, dims.D)
    prefix_lens, prompt_idx = prefix_lens.contiguous(), prompt_idx.contiguous()
    kv_lens = None if kv_lens is None else kv_lens.contiguous()
    q_lens = None if q_lens is None else q_lens.contiguous()
    ref = cascade = None
    if kernel == "reference":  # masks and row groups: reads the lengths on the host
        ref = plan_reference(dims, prefix_lens, prompt_idx, kv_lens, q_lens, plans)
    elif kernel == "cascade" and dims.B and dims.Lq:  # rows grouped by prompt, on the device
        cascade = cascade_plan_for(dims, prompt_idx, plans=plans)
    return AttentionPlan(dims, dtype, device, kernel, prefix_lens, prompt_idx, kv_lens, q_lens, ref, cascade)


def run_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One layer of the planned attention.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D], prefix_k/prefix_v [N, Hkv, Pmax, D] must have the
    plan's shapes, dtype and device (checked here, no sync: a tensor of another shape raises
    ValueError instead of reading out of bounds). scale: softmax scale, default D ** -0.5.
    Returns out [B, H, Lq, D] in q.dtype, and lse [B, H, Lq] float32 if return_lse.
    """
    _check_layer(plan, q, k, v, prefix_k, prefix_v)
    return _attend(plan, q, k, v, prefix_k, prefix_v, scale, return_lse)


def _check_layer(plan: AttentionPlan, q, k, v, prefix_k, prefix_v) -> None:
    """The per-layer check: each tensor has the shape, dtype and device the plan was made for."""
    kv, prefix = plan.kv_shape, plan.prefix_shape
    for name, t, shape in (("q", q, plan.q_shape), ("k", k, kv), ("v", v, kv),
                           ("prefix_k", prefix_k, prefix), ("prefix_v", prefix_v, prefix)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != shape or t.dtype != plan.dtype or t.device != plan.device:
            raise ValueError(f"{name} must be {list(shape)} {plan.dtype} on {plan.device} as planned, "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")


def _attend(plan: AttentionPlan, q, k, v, prefix_k, prefix_v, scale, return_lse):
    """Run the planned kernel on checked tensors."""
    if plan.kernel == "reference":
        return attend_reference(plan.ref, q, k, v, prefix_k, prefix_v, scale, return_lse)
    dims = plan.dims
    if plan.kernel == "cascade":
        return attend_cascade(plan.cascade, dims, q, k, v, prefix_k, prefix_v, plan.prefix_lens,
                              plan.prompt_idx, plan.kv_lens, plan.q_lens, scale, return_lse)
    scale = dims.D**-0.5 if scale is None else float(scale)
    out = new_out(dims, q.dtype, q.device)
    lse = torch.empty(dims.B, dims.H, dims.Lq, dtype=torch.float32, device=q.device) if return_lse else None
    if dims.B and dims.Lq:
        launch_own(q, k, v, prefix_k, prefix_v, plan.prefix_lens, plan.prompt_idx, plan.kv_lens,
                   plan.q_lens, scale, out, lse, None, None, dims)
    return (out, lse) if return_lse else out


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
    dims = check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    plan = _plan(dims, q.dtype, prefix_lens, prompt_idx, kv_lens, q_lens, "fused")
    return _attend(plan, q, k, v, prefix_k, prefix_v, scale, return_lse)


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
    (plans: this forward's ``Plans``, for the cascade's plan). Checks its inputs once."""
    dims = check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    plan = _plan(dims, q.dtype, prefix_lens, prompt_idx, kv_lens, q_lens, "auto", plans)
    return _attend(plan, q, k, v, prefix_k, prefix_v, scale, return_lse)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             positions: torch.Tensor) -> None:
    """Triton version of `write_kv_ref`: in place, k_cache[b, :, positions[b]] = k_new[b, :, 0] (and v)
    for rows whose position is in [0, cap); other rows (e.g. position -1) are left alone.

    k_cache, v_cache: [B, Hkv, cap, D]; k_new, v_new: [B, Hkv, 1, D]; positions: [B] int.
    """
    check_write_kv(k_cache, v_cache, k_new, v_new, positions)
    B, Hkv, cap, D = k_cache.shape
    require_kernels(k_cache.device, D)
    if B == 0:
        return
    # grid: one program per row copies its [Hkv, D] key and value
    _triton._write_kv[(B,)](
        k_cache, v_cache, k_new, v_new, positions.contiguous(), Hkv, cap,
        *k_cache.stride(), *v_cache.stride(),
        k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
        BLOCK_H=triton.next_power_of_2(Hkv), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), num_warps=1)
