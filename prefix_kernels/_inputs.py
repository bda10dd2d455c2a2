"""Input checks shared by every entry point: one-line ValueErrors, no device sync (except
``check_lengths``, which reads the length values on the host).

``check_shapes`` validates what one forward's attention plan fixes (the shapes of the per-layer
tensors, their dtype and the index tensors) from shapes alone, so ``plan_attention`` runs it once
per forward; ``check_inputs`` is the same contract for the per-call functions, which hold the
tensors themselves. Shape letters as in the package docstring.
"""

from typing import NamedTuple

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Dims(NamedTuple):
    """The sizes one attention call (or every layer of one forward) is checked for."""

    B: int
    H: int
    Lq: int
    D: int
    Hkv: int
    Lk: int
    N: int
    Pmax: int


def check_shapes(q_shape, k_shape, prefix_shape, dtype: torch.dtype, prefix_lens, prompt_idx, kv_lens,
                 q_lens, device: torch.device | None = None, device_of: str = "q's device") -> Dims:
    """Validate q [B, H, Lq, D], k/v [B, Hkv, Lk, D] and prefix_k/v [N, Hkv, Pmax, D] given as
    shapes, the dtype, and the index tensors (1-D integer tensors of the right length on
    ``device``, by default prompt_idx's device)."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("prefix_k", prefix_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {tuple(shape)}")
    B, H, Lq, D = q_shape
    Bk, Hkv, Lk, Dk = k_shape
    N, Hp, Pmax, Dp = prefix_shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"k must be [B={B}, Hkv, Lk, D={D}] like q, got {tuple(k_shape)}")
    if (Hp, Dp) != (Hkv, D):
        raise ValueError(f"prefix_k must be [N, Hkv={Hkv}, Pmax, D={D}], got {tuple(prefix_shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if Lq > Lk:
        raise ValueError(f"q has Lq={Lq} queries but k holds only Lk={Lk} own keys; expected Lq <= Lk")
    if dtype not in DTYPES:
        raise ValueError(f"q.dtype must be one of float32/float16/bfloat16, got {dtype}")
    index = (("prefix_lens", prefix_lens, N), ("prompt_idx", prompt_idx, B),
             ("kv_lens", kv_lens, B), ("q_lens", q_lens, B))
    for name, t, n in index:
        if t is None and name in ("kv_lens", "q_lens"):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor of length {n}, got {got}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    device = prompt_idx.device if device is None else device
    for name, t, _ in index:
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device_of} {device}")
    return Dims(B, H, Lq, D, Hkv, Lk, N, Pmax)


def check_inputs(q, k, v, prefix_k, prefix_v, prefix_lens, prompt_idx, kv_lens, q_lens) -> Dims:
    """``check_shapes`` for the tensors themselves, plus v/prefix_v against k/prefix_k and every
    tensor's dtype and device against q's."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got {got}")
    dims = check_shapes(q.shape, k.shape, prefix_k.shape, q.dtype, prefix_lens, prompt_idx, kv_lens,
                        q_lens, device=q.device)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, "
                         f"got {tuple(prefix_v.shape)}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype={q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    return dims


def check_lengths(dims: Dims, prefix_lens, prompt_idx, kv_lens, q_lens) -> None:
    """Value checks that need the index tensors on the host (a device sync: the reference's plan
    runs them; the kernels' plans do not). kv_lens/q_lens: filled in (not None)."""
    if dims.B and not bool(((prompt_idx >= 0) & (prompt_idx < dims.N)).all()):
        raise ValueError(f"prompt_idx values must lie in [0, N={dims.N}), got {prompt_idx.tolist()}")
    if dims.N and not bool(((prefix_lens >= 0) & (prefix_lens <= dims.Pmax)).all()):
        raise ValueError(f"prefix_lens values must lie in [0, Pmax={dims.Pmax}], got {prefix_lens.tolist()}")
    if dims.B and not bool(((q_lens >= 0) & (q_lens <= kv_lens) & (kv_lens <= dims.Lk)).all()):
        raise ValueError(f"expected 0 <= q_lens <= kv_lens <= Lk={dims.Lk}, "
                         f"got q_lens={q_lens.tolist()} kv_lens={kv_lens.tolist()}")


def check_write_kv(k_cache, v_cache, k_new, v_new, positions) -> None:
    """k_cache, v_cache: [B, Hkv, cap, D]; k_new, v_new: [B, Hkv, 1, D] like them; positions: [B] int."""
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
