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

Entry points (all in prefix_attention.py): ``prefix_attention`` (Triton prefill/decode kernels),
``prefix_attention_cascade`` (shared-prefix cascade: prefix part batched per prompt, merged by
log-sum-exp), ``prefix_attention_auto`` (picks one), ``prefix_attention_ref`` (PyTorch reference,
also the CPU serving path), ``write_kv`` / ``write_kv_ref`` (append a token's K/V to per-row
decode buffers). Importing this package never needs Triton or a GPU.
"""

from .prefix_attention import (
    CascadePlan,
    Plans,
    plan_cascade,
    prefix_attention,
    prefix_attention_auto,
    prefix_attention_cascade,
    prefix_attention_ref,
    use_cascade,
    write_kv,
    write_kv_ref,
)

__all__ = [
    "CascadePlan",
    "Plans",
    "plan_cascade",
    "prefix_attention",
    "prefix_attention_auto",
    "prefix_attention_cascade",
    "prefix_attention_ref",
    "use_cascade",
    "write_kv",
    "write_kv_ref",
]
