"""Launch configuration and the prefill/decode launcher shared by the fused and cascade paths.

``launch_own`` runs ``_prefix_attention_fwd`` (Lq > 1) or ``_prefix_attention_decode`` (Lq == 1)
from ``_triton.py``: over the row's prefix and own keys, or, with the cascade's partial result
(``part_o`` [B, H, Lq, D] f32, ``part_lse`` [B, H, Lq] f32), over the own keys only, merging the
two by log-sum-exp. Shapes and letters as in the package docstring; ``out`` [B, H, Lq, D] is a
view of [B, Lq, H, D] memory (``new_out``).
"""

import os
from typing import NamedTuple

import torch

from . import _triton  # kernel bodies looked up at launch time (a reload of _triton is seen here)
from ._inputs import Dims
from ._triton import triton  # the package, or its stand-in when Triton is missing

MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2
LOG2E = 1.4426950408889634  # the kernels keep scores in log2 units: qk_scale = scale * LOG2E


class Config(NamedTuple):
    block_m: int  # prefill tile rows (queries x heads of a group)
    block_n: int  # keys per inner step
    cascade_block_m: int  # stacked queries per program in the cascade's prefix part
    num_warps: int
    num_stages: int


def config(device: torch.device, D: int) -> Config:
    if device.type != "cuda":  # TRITON_INTERPRET=1: few, mid-sized tiles keep the interpreter fast
        return Config(block_m=32, block_n=32, cascade_block_m=32, num_warps=4, num_stages=1)
    # provisional GPU choice (H100/H200, D <= 128); bench/gpu_check.sh measures it
    return Config(block_m=64, block_n=64 if D <= 64 else 32, cascade_block_m=128, num_warps=4, num_stages=2)


def pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(x))


def require_kernels(device: torch.device, D: int) -> None:
    """Raise unless the Triton kernels can run on ``device`` at head dim D."""
    if _triton.TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"Triton is not installed ({_triton.TRITON_IMPORT_ERROR}); "
                           "use prefix_attention_ref")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
                         "before importing this module; on CPU use prefix_attention_ref")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is larger than the kernels' limit {MAX_HEAD_DIM}")


def new_out(dims: Dims, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # [B, H, Lq, D] view of [B, Lq, H, D] memory: the caller's transpose(1, 2).reshape is free
    return torch.empty(dims.B, dims.Lq, dims.H, dims.D, dtype=dtype, device=device).transpose(1, 2)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_own(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, scale,
               out, lse, part_o, part_lse, dims: Dims) -> None:
    """Run the prefill or decode kernel; with part_o/part_lse it starts from the cascade's prefix part.
    Index tensors must be contiguous; kv_lens/q_lens may be None (Lk / Lq for every row)."""
    B, H, Lq, D, Hkv, Lk, N, Pmax = dims
    G = H // Hkv
    cfg = config(q.device, D)
    from_partial = part_o is not None
    common = dict(
        GROUP=G, BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=pow2_at_least(D),
        HAS_KV_LENS=kv_lens is not None, HAS_Q_LENS=q_lens is not None,
        PREFIX_FROM_PARTIAL=from_partial, STORE_LSE=lse is not None,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens, out, lse,
            part_o, part_lse, scale * LOG2E, H)
    if Lq == 1:
        # grid: one program per (row, kv head); its GROUP query heads share every K/V load
        _triton._prefix_attention_decode[(B, Hkv)](
            *args, Lk,
            q.stride(0), q.stride(1), q.stride(3),
            *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            out.stride(0), out.stride(1), out.stride(3),
            BLOCK_G=pow2_at_least(G), **common)
    else:
        block_m = max(cfg.block_m, triton.next_power_of_2(G))
        block_q = block_m // G
        if B > MAX_GRID_YZ:
            raise ValueError(f"batch B={B} is larger than the prefill grid's limit {MAX_GRID_YZ}")
        # grid: (query blocks of BLOCK_Q queries, kv heads, rows); blocks past a row's q_lens only write zeros
        _triton._prefix_attention_fwd[(triton.cdiv(Lq, block_q), Hkv, B)](
            *args, Lq, Lk,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(),
            BLOCK_Q=block_q, BLOCK_M=block_m, **common)
