"""The shared-prefix cascade (Hydragen / FlashInfer cascade style): prefix attention in two kernels.

1. prefix part (``_shared_prefix_fwd``): for each prompt, the queries of all its rows (x heads of
   a group) are stacked against the prompt's prefix once; writes a normalised float32 output
   ``part_o`` [B, H, Lq, D] and its log2-sum-exp ``part_lse`` [B, H, Lq];
2. own part (``launch_own`` with the partial result): the prefill/decode kernel starts its
   online softmax from that state and runs over the row's own keys, which merges the two parts
   by log-sum-exp in its epilogue.

    plan_cascade              rows grouped by prompt, on the device without a sync (once per forward)
    use_cascade               cascade-or-not from shapes: never, until a GPU measurement sets a rule
    attend_cascade            one layer from a plan (inputs already checked)
    prefix_attention_cascade  the per-call function: checks, plans (or reuses a plan), attends

Same contract, shapes and outputs as ``prefix_attention`` (prefix_attention.py); its reference
is ``reference.prefix_attention_ref``.
"""

from typing import NamedTuple

import torch

from . import _triton  # kernel bodies looked up at launch time
from ._inputs import Dims, check_inputs
from ._launch import LOG2E, config, dot_precision, launch_own, new_out, pow2_at_least, require_kernels
from .reference import Plans


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
    block_m = max(config(dev, 0).cascade_block_m, 16)
    sorted_idx, rows = torch.sort(prompt_idx.long(), stable=True)
    prompts = torch.arange(N, device=dev)
    seg_start = torch.searchsorted(sorted_idx, prompts)
    seg_count = torch.searchsorted(sorted_idx, prompts, right=True) - seg_start
    blocks = (seg_count * (Lq * group) + block_m - 1) // block_m
    block_start = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    block_start[1:] = torch.cumsum(blocks, 0)
    grid = -(-B * Lq * group // block_m) + min(N, B)
    return CascadePlan(rows, seg_start, seg_count, block_start, grid, block_m, (B, N, Lq, group, dev))


def cascade_plan_for(dims: Dims, prompt_idx: torch.Tensor, plan: CascadePlan | None = None,
                     plans: Plans | None = None) -> CascadePlan:
    """The cascade plan for these dims: ``plan`` if given (it must fit), else the one kept in
    ``plans`` for the same dims, else a new one (kept in ``plans``)."""
    key = (dims.B, dims.N, dims.Lq, dims.H // dims.Hkv, prompt_idx.device)
    if plan is None and plans is not None and plans.cascade is not None and plans.cascade.key == key:
        plan = plans.cascade
    if plan is None:
        plan = plan_cascade(prompt_idx, dims.N, dims.Lq, dims.H // dims.Hkv)
        if plans is not None:
            plans.cascade = plan
    elif plan.key != key:
        raise ValueError(f"plan was made for (B, N, Lq, G, device)={plan.key}, expected {key}")
    return plan


class CascadeRule(NamedTuple):
    """Take the cascade when B >= min_rows, B >= rows_per_prompt * N (N: the layer's cached
    prompts), Pmax >= min_prefix and Pmax >= prefix_per_query * Lq: many rows re-reading one
    prefix that dominates their own work, which is where the cascade's second launch, its plan
    and its float32 round trip of the output can pay."""

    min_rows: int
    rows_per_prompt: int
    min_prefix: int
    prefix_per_query: int

    def __call__(self, B: int, N: int, Pmax: int, Lq: int) -> bool:
        return (B >= self.min_rows and B >= self.rows_per_prompt * N and Pmax >= self.min_prefix
                and Pmax >= self.prefix_per_query * Lq)


# A guess from the kernels' costs, never timed: bench/gpu_kernels.py times both kernels over a
# grid and reports how often this candidate (and "never") picks the faster one, and by how much.
CANDIDATE_RULE = CascadeRule(min_rows=16, rows_per_prompt=4, min_prefix=256, prefix_per_query=4)
# The rule the default path follows: none until a GPU run of bench/gpu_kernels.py has measured
# one (its dispatch summary), so plan_attention(kernel="auto") runs the fused kernel everywhere
# and the cascade only when asked for by name.
MEASURED_RULE: CascadeRule | None = None


def use_cascade(B: int, N: int, Pmax: int, Lq: int, rule: CascadeRule | None = None) -> bool:
    """Cascade or fused for these shapes (no device sync): ``rule``, default ``MEASURED_RULE``;
    False while no rule has been measured."""
    rule = MEASURED_RULE if rule is None else rule
    return bool(rule is not None and rule(B, N, Pmax, Lq))


def attend_cascade(plan: CascadePlan, dims: Dims, q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx,
                   kv_lens, q_lens, scale: float | None = None, return_lse: bool = False):
    """One layer through the two kernels. Inputs already checked (``dims``); index tensors
    contiguous; ``plan`` made for these dims (``cascade_plan_for``)."""
    B, H, Lq, D, Hkv, Lk, N, Pmax = dims
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = new_out(dims, q.dtype, q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    if B == 0 or Lq == 0:
        return (out, lse) if return_lse else out
    cfg = config(q.device, D)
    part_o = torch.empty_like(out, dtype=torch.float32)  # same [B, Lq, H, D] memory layout as out
    part_lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    # grid: (stacked blocks of BLOCK_M (row, query, head) triples, grouped by prompt, kv heads)
    _triton._shared_prefix_fwd[(plan.grid, Hkv)](
        q, prefix_k, prefix_v, prefix_lens, q_lens, plan.rows, plan.seg_start, plan.seg_count,
        plan.block_start, part_o, part_lse, scale * LOG2E, H, Lq, N,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *part_o.stride(),
        GROUP=G, BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=pow2_at_least(D),
        HAS_Q_LENS=q_lens is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps * (2 if plan.block_m >= 128 else 1), num_stages=cfg.num_stages)
    launch_own(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, scale,
               out, lse, part_o, part_lse, dims)
    return (out, lse) if return_lse else out


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
    """Same contract as `prefix_attention`, computed in two kernels (module docstring).

    plan: optional `plan_cascade(prompt_idx, N, Lq, H // Hkv)` to reuse across layers; or
    plans: this forward's ``Plans``, where the plan is made on first use and kept for the other
        layers; without either the plan is made here.
    """
    dims = check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens)
    require_kernels(q.device, dims.D)
    if dims.B and dims.Lq:
        plan = cascade_plan_for(dims, prompt_idx, plan, plans)
    return attend_cascade(plan, dims, q, k, v, prefix_k, prefix_v, prefix_lens.contiguous(),
                          prompt_idx.contiguous(), None if kv_lens is None else kv_lens.contiguous(),
                          None if q_lens is None else q_lens.contiguous(), scale, return_lse)
