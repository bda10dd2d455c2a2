"""PEFT-made adapters of every prompt-learning kind, and PEFT's own reference numbers.

Test support (no tests here): ``train_adapter`` makes a real PEFT adapter directory of each kind in
``KINDS`` on a tiny model (tests/tiny.py), and ``peft_logprobs`` / ``peft_first_logprob`` /
``peft_greedy`` / ``peft_prefix_kv`` say what PEFT itself computes with it, so a test can hold the
runtime to PEFT's numbers. Everything is float32 on CPU with eager attention. Checked with
peft 0.21.2, transformers 5.24, torch 2.13 (tests/test_peft_kinds.py checks the helpers).

What each kind saves (``adapter_model.safetensors``, all float32; P = num_virtual_tokens, E =
hidden size, L = layers, KV = head_dim * num_key_value_heads, T = num_tasks, R = NUM_RANKS)::

    kind                      tensors saved                          what the runtime must do
    prompt_tuning             prompt_embeddings [P, E]               prepend as input embeddings
    p_tuning_mlp              prompt_embeddings [P, E]               same: it is the MLP's OUTPUT
    p_tuning_lstm             prompt_embeddings [P, E]               same: LSTM+MLP output
    multitask                 prompt_embeddings [P, E] (shared),     prompt for task t =
                              prefix_task_cols  [T, P, R],           shared * (cols[t] @ rows[t])
                              prefix_task_rows  [T, R, E]            (elementwise *, matmul @)
    cpt                       prompt_embeddings [P, E]               prepend; = embed(cpt_token_ids)
                                                                     + trained delta
    prefix_tuning             prompt_embeddings [P, L*2*KV]          K/V prefix of every layer
    prefix_tuning_projection  prompt_embeddings [P, L*2*KV]          same: it is the MLP's OUTPUT
    cartridge                 prompt_embeddings [P, L*2*KV]          same layout as prefix_tuning

On the tiny families (E=64, L=2, head_dim 16) the prefix width L*2*KV is llama 128 (2 kv heads),
gpt2 256 (4 heads, no num_key_value_heads), qwen2 64 (1 kv head; equal to E by coincidence),
gemma 256 (4 kv heads). Only the multitask file has extra tensors; the P-tuning encoder and the
prefix projection MLP are never saved (PEFT saves their output, and ``adapter_config.json``
still says ``encoder_reparameterization_type`` / ``prefix_projection: true``), and loading in
inference mode (``PeftModel.from_pretrained``) rebuilds them as a plain embedding table.

Prefix K/V layout (``peft_prefix_kv``; PeftModel.get_prompt): row p of ``prompt_embeddings`` is
``[L, 2, H_kv, D]`` flattened (layer-major, then key/value, then head, then head_dim), so
``keys[l, h, p, :] = w[p].reshape(L, 2, H_kv, D)[l, 0, h]`` and ``values`` use index 1. PEFT
provisions ``num_key_value_heads`` heads (GQA; ``num_attention_heads`` in adapter_config.json is
then the KV head count) with ``head_dim`` from the config. No tiny family has post-processing
(TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING holds only bloom / old gpt_bigcode);
gemma2/3/4 go through a separate per-layer DynamicCache branch, gemma 1 through the plain
``DynamicCache(...)`` one like llama/gpt2/qwen2. The prefix takes positions 0..P-1: request
tokens get positions P.. (matters for gpt2's learned absolute positions); the embedding kinds
also put request tokens at P.. since the virtual tokens are ordinary leading inputs.

Quirks worth knowing:
- gemma: the embedding module multiplies token embeddings by sqrt(E); PEFT prepends the
  virtual-token embeddings unscaled. CPT initialises from ``word_embeddings(cpt_token_ids)``,
  i.e. already scaled, so a CPT row whose delta is zero equals the scaled token embedding.
  The tiny gemma mostly predicts its last input token, so greedy decoding on it is degenerate.
- CPT at inference is plain prompt tuning of the saved rows (labels and type masks only shape
  the training loss). The delta of type-4 ("label") tokens never trains (gradient masked),
  so those rows stay exactly the token embedding. ``cpt_mask`` is unused by PEFT.
- CPT training with labels needs ``max(cpt_tokens_type_mask)`` to be a multiple of 4, or no
  request token is labelled (``cpt_layout`` ends with types 3, 4).
- multitask: PEFT raises without ``task_ids``; its forward writes ``shared *= factor`` in place
  on the looked-up embedding (a copy, harmless).
- transformers 5.24 renamed ``past_key_values`` to ``cache`` (old name deprecated until 5.40);
  PEFT still passes ``past_key_values=``, which works for forward (FutureWarning).

``PeftModel.generate`` (greedy, do_sample=False, max_new_tokens=8) vs ``peft_greedy``, checked on
the tiny llama, gpt2 and qwen2, every kind, three prompts each, with and without an all-ones
attention_mask (same results), peft 0.21.2 + transformers 5.24: it is NOT a valid reference.
PEFT's ``prepare_inputs_for_generation`` still looks for ``model_kwargs["past_key_values"]`` and
``cache_position``, which transformers 5.24's generate no longer sets (it passes ``cache`` and has
dropped cache_position), so PEFT treats every decoding step as the first one:
- prefix_tuning / prefix_tuning_projection / cartridge: differs from token 0 (in 26 of 27 runs;
  the other shared 3 tokens by chance). Each step PEFT passes its prefix as ``past_key_values=``
  next to generate's own ``cache=``; the model keeps ``cache`` ("Both `past_key_values` and
  `cache` are set ... Using `cache`") so the prefix is never seen, while generate's position_ids
  are still shifted by +P (``_adjust_prompt_learning_kwargs``). The output is exactly the base
  model's greedy output on llama/qwen2 (RoPE is relative, the shift cancels) and something else
  on gpt2 (learned absolute positions shifted by P). With ``use_cache=False`` gpt2 and qwen2 match
  peft_greedy, llama still differs from token 1-5: LlamaForCausalLM returns the PEFT prefix cache
  (which the forward has appended the request to) even with use_cache=False, and generate feeds
  it back as ``cache`` at the next step, so the sequence is seen twice.
- prompt_tuning / p_tuning_* / multitask / cpt: token 0 always equal (the prefill is right), then
  each decode step prepends the P virtual tokens again to the one new token (inputs_embeds of
  P+1 rows; the cache grows by P+1 per step), so it differs from token 1 on (first difference
  seen at 1..7; equal over all 8 tokens in a few runs whose output repeats one token). With
  ``use_cache=False`` these kinds match peft_greedy in every run.
- generate also stops at eos_token_id (2 in the tiny configs); peft_greedy never stops.
Use ``peft_greedy`` (full forward per token, no cache) as PEFT's greedy reference.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

KINDS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "multitask", "cpt", "prefix_tuning",
         "prefix_tuning_projection", "cartridge")
EMBEDDING_KINDS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "multitask", "cpt")
PREFIX_KINDS = ("prefix_tuning", "prefix_tuning_projection", "cartridge")
ATTN_IMPLEMENTATION = "eager"
ENCODER_HIDDEN = 32  # P-tuning encoder and prefix-projection MLP width
NUM_RANKS = 2  # multitask: rank of each task's factor cols[t] @ rows[t]
CPT_EPSILON = 2.0  # CPT delta norm bound (times sqrt(E/2048)); PEFT's 0.1 would hide the delta


DTYPE = {"value": torch.float32}  # the references' dtype; `float64()` switches it


@contextlib.contextmanager
def reference_dtype(dtype: torch.dtype):
    """PEFT's references computed in ``dtype`` inside the block (base model loaded in it)."""
    DTYPE["value"] = dtype
    try:
        yield
    finally:
        DTYPE["value"] = torch.float32


def float64():
    """PEFT's references in float64 inside the block: the exact value, for adapters whose
    float32 noise is above the SCORE tolerance (PEFT's N(0, 1) prefix-tuning init on the default
    model gives logits where PEFT's own eager and sdpa float32 forwards differ by 1e-4)."""
    return reference_dtype(torch.float64)


def load_base(model_dir, dtype=None):
    """The base model as PEFT is given it here: float32 (or ``dtype``), eager attention, eval."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32,
                                                 attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()


def cpt_layout(n: int) -> tuple[list[int], list[int]]:
    """(cpt_token_ids, cpt_tokens_type_mask) for ``n`` CPT virtual tokens: one input template
    (type 1), inputs (2), an output template (3) and a label (4); ids are small (< 96)."""
    if n < 4:
        raise ValueError("cpt needs num_virtual_tokens >= 4 (template, input, template, label)")
    return [5 + (7 * i) % 80 for i in range(n)], [1] + [2] * (n - 3) + [3, 4]


def peft_config(kind: str, *, num_virtual_tokens: int = 6, num_tasks: int = 3):
    """The PEFT config (task_type CAUSAL_LM) that ``train_adapter`` uses for ``kind``."""
    import peft

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(**common)
    if kind in ("p_tuning_mlp", "p_tuning_lstm"):
        return peft.PromptEncoderConfig(**common, encoder_hidden_size=ENCODER_HIDDEN,
                                        encoder_reparameterization_type=kind.rsplit("_", 1)[1].upper())
    if kind == "multitask":
        return peft.MultitaskPromptTuningConfig(**common, num_tasks=num_tasks, num_ranks=NUM_RANKS)
    if kind == "cpt":  # num_virtual_tokens is len(cpt_token_ids)
        ids, types = cpt_layout(num_virtual_tokens)
        return peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=ids, cpt_mask=[1] * len(ids),
                              cpt_tokens_type_mask=types, opt_projection_epsilon=CPT_EPSILON,
                              opt_projection_format_epsilon=CPT_EPSILON)
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(**common, prefix_projection=False)
    if kind == "prefix_tuning_projection":
        return peft.PrefixTuningConfig(**common, prefix_projection=True,
                                       encoder_hidden_size=ENCODER_HIDDEN)
    if kind == "cartridge":
        return peft.CartridgeConfig(**common, num_frozen_tokens=1)
    raise ValueError(f"unknown PEFT kind {kind!r}; expected one of {KINDS}")


def train_adapter(model_dir, kind: str, out_dir, *, num_virtual_tokens: int = 6, steps: int = 3,
                  seed: int = 0, num_tasks: int = 3, lr: float = 1e-2) -> Path:
    """Train a PEFT adapter of ``kind`` on the model in ``model_dir`` and save it to ``out_dir``.

    ``steps`` AdamW steps (``lr``) of the LM loss (labels = input ids) on a seeded random batch of
    4 x 10 token ids (multitask: task_ids 0, 1, 2, 0, ...), model in eval mode (no dropout), so
    the result depends only on (model, kind, seed, sizes). The initial seed also depends on the
    kind, so e.g. prefix_tuning and cartridge do not start from the same random K/V. The
    multitask task factors are widened from PEFT's std 0.02 to O(1) before training, so the task
    (and getting shared * (cols @ rows) right) changes the numbers clearly.
    """
    from peft import get_peft_model

    torch.manual_seed(1000 * seed + KINDS.index(kind) if kind in KINDS else seed)
    base = load_base(model_dir)
    model = get_peft_model(base, peft_config(kind, num_virtual_tokens=num_virtual_tokens,
                                             num_tasks=num_tasks))
    model.eval()
    if kind == "multitask":
        encoder = model.prompt_encoder["default"]
        with torch.no_grad():
            encoder.prefix_task_cols.normal_(0.0, 1.0)
            encoder.prefix_task_rows.normal_(0.0, NUM_RANKS ** -0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, base.config.vocab_size, (4, 10), generator=gen)
    kwargs = {"task_ids": torch.arange(4) % num_tasks} if kind == "multitask" else {}
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


@functools.lru_cache(maxsize=64)
def _load_peft(model_dir: str, adapter_dir: str, _stamp: int, dtype: torch.dtype):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_dir, dtype), adapter_dir).eval()


def load_peft(model_dir, adapter_dir):
    """Base model (float32) + ``PeftModel.from_pretrained(base, adapter_dir)``, eval mode; cached
    per (model_dir, adapter_dir, adapter file mtime), so a re-trained adapter is re-read."""
    adapter_dir = Path(adapter_dir).resolve()
    stamp = (adapter_dir / "adapter_model.safetensors").stat().st_mtime_ns
    return _load_peft(str(Path(model_dir).resolve()), str(adapter_dir), stamp, DTYPE["value"])


def is_prefix(model) -> bool:
    """Whether a PeftModel's adapter is a K/V prefix (no logits for its virtual tokens)."""
    return model.active_peft_config.peft_type.value in ("PREFIX_TUNING", "CARTRIDGE")


def _logits(model, seq: list[int], task_id) -> tuple[torch.Tensor, int]:
    """PEFT's forward on one request: float64 logits [positions, V] and how many leading rows
    belong to virtual tokens (P for the embedding kinds, 0 for prefix kinds)."""
    kwargs = {} if task_id is None else {"task_ids": torch.tensor([int(task_id)])}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([seq], dtype=torch.long), **kwargs)
    n_virtual = 0 if is_prefix(model) else model.active_peft_config.num_virtual_tokens
    return out.logits[0].double(), n_virtual


def peft_logprobs(model_dir, adapter_dir, ids, *, task_id=None, prefix_ids=()) -> np.ndarray:
    """float64 [len(ids) - 1]: PEFT's log-prob of ids[j] (j >= 1) given everything before it, on
    the single request ``prefix_ids + ids`` (multitask: ``task_ids=[task_id]``)."""
    model = load_peft(model_dir, adapter_dir)
    ids, prefix_ids = [int(i) for i in ids], [int(i) for i in prefix_ids]
    logits, n_virtual = _logits(model, prefix_ids + ids, task_id)
    start = n_virtual + len(prefix_ids)
    lp = torch.log_softmax(logits[start:start + len(ids) - 1], dim=-1)
    return lp.gather(1, torch.tensor(ids[1:], dtype=torch.long).view(-1, 1))[:, 0].numpy()


def peft_first_logprob(model_dir, adapter_dir, ids, *, task_id=None, prefix_ids=()) -> float:
    """PEFT's log-prob of ids[0]: from the last prefix_ids token, or (no prefix_ids) from the last
    virtual token, which only the embedding kinds have (prefix kinds raise ValueError)."""
    model = load_peft(model_dir, adapter_dir)
    ids, prefix_ids = [int(i) for i in ids], [int(i) for i in prefix_ids]
    if not prefix_ids and is_prefix(model):
        raise ValueError("prefix-tuning kinds give no logits at the virtual tokens; pass prefix_ids")
    logits, n_virtual = _logits(model, prefix_ids + ids, task_id)
    return float(torch.log_softmax(logits[n_virtual + len(prefix_ids) - 1], dim=-1)[ids[0]])


def peft_greedy(model_dir, adapter_dir, ids, n, *, task_id=None, prefix_ids=()) -> list[int]:
    """``n`` greedy new tokens after ``prefix_ids + ids``: PEFT's full forward on the whole
    growing sequence each step (no generate, no cache), argmax of the last position. Never stops
    at EOS. (PeftModel.generate is not a valid reference here; see the module docstring.)"""
    model = load_peft(model_dir, adapter_dir)
    seq = [int(i) for i in prefix_ids] + [int(i) for i in ids]
    new: list[int] = []
    for _ in range(n):
        logits, _ = _logits(model, seq, task_id)
        new.append(int(logits[-1].argmax()))
        seq.append(new[-1])
    return new


def peft_prefix_kv(model_dir, adapter_dir) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values), each float32 [num_layers, num_kv_heads, P, head_dim], exactly as PEFT's
    ``get_prompt(1)`` hands them to the model (read back from the returned cache's layers)."""
    model = load_peft(model_dir, adapter_dir)
    if not is_prefix(model):
        raise ValueError(f"peft_prefix_kv is for the prefix kinds {PREFIX_KINDS}")
    with torch.no_grad():
        cache = model.get_prompt(1)
    keys = np.stack([layer.keys[0].numpy() for layer in cache.layers]).astype(np.float32)
    values = np.stack([layer.values[0].numpy() for layer in cache.layers]).astype(np.float32)
    return keys, values
