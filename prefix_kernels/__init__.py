"""Kernels that attend over a shared, cached soft-prompt prefix (``softprompt.kernels``).

Shape letters used across the project:

    B    batch (rows)
    P    virtual (soft-prompt) tokens, i.e. the prefix length
    L    request tokens
    S    key length, S = P + L
    H    query heads
    Hkv  key/value heads (H % Hkv == 0; H // Hkv query heads share one key/value head)
    D    head dim
    E    hidden size
    N    layers (in the kernels' own signatures N also counts the prompts of a prefix cache)
    V    vocabulary size

Files, one job each (read prefix_attention.py first: the contract and the public API):

    prefix_attention.py  per forward: ``plan_attention`` -> ``AttentionPlan`` (checks and the
                         kernel choice, once), ``run_attention`` per layer; per call:
                         ``prefix_attention`` (Triton prefill/decode kernels),
                         ``prefix_attention_auto`` (fused or cascade), ``write_kv``
    cascade.py           ``prefix_attention_cascade`` (shared-prefix cascade: prefix part batched
                         per prompt, merged by log-sum-exp), ``plan_cascade``, ``use_cascade``
    reference.py         ``prefix_attention_ref`` / ``write_kv_ref`` (PyTorch references, also the
                         CPU serving path), ``Plans`` (the per-call functions' plan cache)
    _triton.py           the ``@triton.jit`` bodies and the fallback when Triton is missing
    _launch.py           launch configuration and the prefill/decode launcher
    _inputs.py           input checks shared by every entry point

Importing this package never needs Triton or a GPU.
"""

from .cascade import CascadePlan, plan_cascade, prefix_attention_cascade, use_cascade
from .prefix_attention import (
    AttentionPlan,
    plan_attention,
    prefix_attention,
    prefix_attention_auto,
    run_attention,
    write_kv,
)
from .reference import Plans, prefix_attention_ref, write_kv_ref

__all__ = [
    "AttentionPlan",
    "CascadePlan",
    "Plans",
    "plan_attention",
    "plan_cascade",
    "prefix_attention",
    "prefix_attention_auto",
    "prefix_attention_cascade",
    "prefix_attention_ref",
    "run_attention",
    "use_cascade",
    "write_kv",
    "write_kv_ref",
]
