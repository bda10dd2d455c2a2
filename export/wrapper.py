"""The torch module that is exported: a causal LM with embeddings in, a flat KV cache in/out.

``ExportWrapper.forward(inputs_embeds, attention_mask, position_ids, past, logits_index)``
keeps the graph contract documented in ``bundle.py``. The same module is the PyTorch side
of the export validation, so the reference and the graph share one definition.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from softprompt.models import ModelSpec, cache_kwarg

__all__ = ["ExportWrapper", "ModelSpec", "attention_bias", "grouped_attention"]
GROUPED = "softprompt_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Grouped-query attention without repeating K/V: transformers' eager attention, bit for bit.

    query ``[B, H, S, D]``; key, value ``[B, Hkv, T, D]``; attention_mask additive
    ``[B, 1, S, >=T]``. The G = H / Hkv query heads that share a K/V head are stacked along the
    query axis (``[B, Hkv, G*S, D]``), so both products read each K/V head once instead of
    through a G-times expanded copy, and ``K^T`` is a transposed operand of the product (ONNX
    Runtime fuses it into the MatMul) rather than a separate transpose of the expanded keys.
    Returns ``([B, S, H, D], None)`` as transformers' attention functions do.
    """
    b, h, s, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    g = h // hkv
    q = (query * (d ** -0.5 if scaling is None else scaling)).reshape(b, hkv, g * s, d)
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, Hkv, G*S, T]
    if attention_mask is not None:
        scores = (scores.view(b, hkv, g, s, t)
                  + attention_mask[:, :, None, :, :t]).view(b, hkv, g * s, t)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G*S, D]
    return out.view(b, h, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, grouped_attention)


def attention_bias(attention_mask: torch.Tensor, past_len, seq_len: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, L, T]``: 0 where query i may attend key j, else dtype's min.

    Query i sits at absolute key index past_len + i; it attends key j iff
    j <= past_len + i and attention_mask[b, j] == 1. The minimum (not -inf) keeps a fully
    masked query row (a padding token) finite instead of NaN, and a NaN there would leak into
    every later layer through 0 * NaN in the attention-weighted sum.
    """
    total = attention_mask.shape[1]
    device = attention_mask.device
    q = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1) + past_len  # [1, 1, L, 1]
    k = torch.arange(total, device=device).view(1, 1, 1, total)  # [1, 1, 1, T]
    allowed = (k <= q) & (attention_mask[:, None, None, :] == 1)  # [B, 1, L, T]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class ExportWrapper(torch.nn.Module):
    """A transformers ``*ForCausalLM`` behind the bundle's graph contract.

    The 4D mask is built here rather than by transformers' mask helpers (they are written for
    their own cache bookkeeping and break under export); transformers passes a 4D mask
    through unchanged to its attention functions. Models with grouped K/V heads (llama, qwen2,
    gemma) are traced with ``grouped_attention`` (``with wrapper.grouped():``, what the
    exporter does); outside that block the model runs its own attention implementation, so
    the export validation checks the graph against transformers' attention, not against
    itself.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.spec = ModelSpec.from_model(model)
        self.cache_kw = cache_kwarg(self.decoder)  # `cache` from transformers 5.2x, else past_key_values
        self.eval()

    @contextlib.contextmanager
    def grouped(self):
        """Run the model's attention as ``grouped_attention`` inside this block (GQA models)."""
        config = self.model.config
        if self.spec.num_kv_heads == self.spec.num_heads or config._attn_implementation == GROUPED:
            yield
            return
        own = config._attn_implementation
        config._attn_implementation = GROUPED
        try:
            yield
        finally:
            config._attn_implementation = own

    def forward(self, inputs_embeds, attention_mask, position_ids, past, logits_index):
        # inputs_embeds: [B, L, E]; attention_mask: [B, T]; position_ids: [B, L]
        # past: N pairs of [B, Hkv, past, D]; logits_index: [B, K]
        seq_len = inputs_embeds.shape[1]
        past_len = past[0][0].shape[2]
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        bias = attention_bias(attention_mask, past_len, seq_len, inputs_embeds.dtype)
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=bias,
                           position_ids=position_ids, use_cache=True, **{self.cache_kw: cache})
        hidden = out.last_hidden_state  # [B, L, E]
        index = logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, K, E]
        logits = self.lm_head(torch.gather(hidden, 1, index)).float()  # [B, K, V]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        presents = []
        for layer in cache.layers[: self.spec.num_layers]:  # updated in place by the decoder
            presents += [layer.keys, layer.values]  # [B, Hkv, T, D] each
        return (logits, *presents)
