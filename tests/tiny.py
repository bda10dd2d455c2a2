"""Tiny randomly initialised causal LMs saved to temporary directories (no hub access).

Each family exercises one thing the runtime must get right:
- llama: grouped-query attention (4 query heads over 2 key/value heads) and RoPE;
- gpt2: learned absolute positions (position_ids must start at P for request tokens);
- qwen2: bias on the q/k/v projections;
- gemma: the embedding module scales by sqrt(E) (PEFT does not scale virtual tokens).

The tokenizer is the default model's when it is converted, else a tiny word-level one.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "gpt2", "qwen2", "gemma")
VOCAB = 96
HIDDEN = 64


def tiny_config(family: str):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=family in ("gpt2", "gemma"))
    if family == "llama":
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=512, **common)
    if family == "gemma":
        return GemmaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                           max_position_embeddings=512, **common)
    raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")


def tiny_tokenizer():
    """A word-level tokenizer over a fixed small vocabulary (ids < VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [
        w for w in ("the a an is was good bad great terrible movie film food service i you it "
                    "this that and or not very really love hate liked sports politics tech "
                    "science game team election vote phone chip model market price stock "
                    "positive negative neutral yes no hello world . , ! ? : ;").split()
    ]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_tiny_model(family: str, path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model + tokenizer into ``path`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # Random init of some families is almost uniform; widen it so differences show in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
