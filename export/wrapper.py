"""The torch module that is exported: a causal LM with embeddings in, a flat KV cache in/out.

``ExportWrapper.forward(inputs_embeds, attention_mask, position_ids, past, logits_index)``
keeps the graph contract documented in ``bundle.py``. The same module is the PyTorch side
of the export validation, so the reference and the graph share one definition.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from softprompt.runtime.models import ModelSpec, cache_kwarg

__all__ = ["ExportWrapper", "ModelSpec", "attention_bias"]


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
    through unchanged to its attention functions.
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
