"""The FLOP model of ``softprompt bench``: what one timed batch computes, and the achieved rates.

:class:`Dims` reads the sizes the formula needs from a transformers model, :func:`flops` counts
the FLOPs of one batch by method (the prompt recomputed or cached), and :func:`rates` turns a
batch's wall time into sequences/s, request tokens/s and GFLOP/s, which bench/driver.py reports
next to the time. bench/cpu_floor.py, bench/gpu_e2e.py and bench/test_bench.py use the same
:func:`flops`.
Letters as in the package docstring: B batch, P virtual tokens, L request tokens, N layers,
H query heads, D head dim, E hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """What the FLOP formula needs from a model.

    linear_params: weights of every matmul inside the N layers (q/k/v/o projections, MLP),
    i.e. the non-embedding parameters that multiply activations (norm weights, embedding
    lookups and position tables do no matmul and are left out); lm_head: E x V.
    """

    num_layers: int  # N
    num_heads: int  # H
    head_dim: int  # D
    hidden_size: int  # E
    vocab_size: int  # V
    linear_params: int

    @classmethod
    def from_model(cls, model) -> "Dims":
        cfg = model.config
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        skip = {emb.data_ptr(), head.data_ptr()}
        linear = 0
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.data_ptr() not in skip and "embed" not in name and "wpe" not in name \
                    and "wte" not in name:
                linear += p.numel()
        H = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        E = int(emb.shape[1])
        D = int(getattr(cfg, "head_dim", None) or E // H)
        N = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
        return cls(N, H, D, E, int(head.shape[0]), linear)


def flops(d: Dims, method: str, B: int, P: int, L: int, n_score: int) -> float:
    """FLOPs one batch really computes (multiply-add = 2 FLOPs), by method:

        tokens T run through the layers: reference, peft T = P + L (prompt recomputed), else T = L
        linear  = 2 * linear_params * T
        attention (causal, only keys a query may see; QK^T and PV each 2*H*D per key):
            reference: 4 * N * H * D * sum_{i=1..P+L} i        = 4NHD * S(S+1)/2, S = P + L
            cached   : 4 * N * H * D * sum_{j=1..L} (P + j)    = 4NHD * (L*P + L(L+1)/2)
        lm_head = 2 * E * V * positions projected: reference and peft all P + L (PEFT returns
                  logits at every position), the cached methods only the n_score scored ones
        total   = B * (linear + attention + lm_head)

    The one-time prefix computation of the cached methods is not counted (not in the timed call).
    """
    attn = 4 * d.num_layers * d.num_heads * d.head_dim
    if method in ("reference", "peft"):
        S = P + L
        per_row = 2 * d.linear_params * S + attn * S * (S + 1) / 2 + 2 * d.hidden_size * d.vocab_size * S
    else:
        per_row = (2 * d.linear_params * L + attn * (L * P + L * (L + 1) / 2)
                   + 2 * d.hidden_size * d.vocab_size * n_score)
    return float(B * per_row)


def rates(B: int, L: int, gflop: float, ms: float) -> tuple[float, float, float]:
    """(seq_per_s, tok_per_s, gflop_per_s) of one batch of B requests of L tokens that took
    ``ms`` wall milliseconds and computes ``gflop`` GFLOP (:func:`flops` / 1e9):

        seq_per_s   = B / s
        tok_per_s   = B * L / s       (request tokens; the virtual tokens are not counted)
        gflop_per_s = gflop / s       (the work the method really computes, see flops)
    """
    sec = ms / 1e3
    return B / sec, B * L / sec, gflop / sec
