"""K/V prompts, text, composed prompts, and the one check of any prompt against a model.

- ``KVPrompt``: per-layer keys and values ``[N, Hkv, P, D]`` (PEFT's PREFIX_TUNING, with or
  without ``prefix_projection`` — PEFT saves the projected K/V — and CARTRIDGE). They go into
  the prefix cache as they are: no forward, and no rotary embedding is applied to the learned
  keys; the request's tokens sit at positions P.., exactly as PEFT hands the K/V to the model
  as ``past_key_values``.
- ``Text``: a text segment, tokenised on its own without special tokens.
- ``ComposedPrompt``: segments of any prompts and text, computed once in order (a soft prompt
  followed by an instruction or few-shot examples; text alone, a shared system prompt). Its
  reference is PEFT with the text's ids placed before each request's.

``check_prompt`` is the one validation of a prompt against a model (registered or inline).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .prompts import (KV, Embeds, Prompt, Segment, SoftPrompt, SoftPromptError, TokenIds,
                      DEFAULT_MAX_VIRTUAL_TOKENS, check_rows)

if TYPE_CHECKING:
    from .requests import ModelInfo, Tokenizer

KV_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def _frozen(a, what: str, name: str) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.ndim != 4:
        raise SoftPromptError(f"K/V prompt {name!r}: {what} must be a 4-D floating-point array "
                              f"[N, Hkv, P, D], got {getattr(a, 'shape', type(a).__name__)}")
    out = np.array(a, dtype=np.float32, order="C")
    out.flags.writeable = False
    return out


@dataclass
class KVPrompt:
    """A K/V prompt: keys / values ``[N, Hkv, P, D]`` float32 (read-only copies).

    peft_type: ``PREFIX_TUNING`` or ``CARTRIDGE``; metadata: what it was read from (its PEFT
    config under ``peft_config``, which ``save_peft`` writes back).
    """

    keys: np.ndarray
    values: np.ndarray
    name: str = "prompt"
    peft_type: str = "PREFIX_TUNING"
    base_model: str | None = None
    base_fingerprint: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.keys = _frozen(self.keys, "keys", self.name)
        self.values = _frozen(self.values, "values", self.name)
        if self.keys.shape != self.values.shape:
            raise SoftPromptError(f"K/V prompt {self.name!r}: keys {list(self.keys.shape)} and "
                                  f"values {list(self.values.shape)} differ in shape")
        if self.peft_type not in KV_TYPES:
            raise SoftPromptError(f"K/V prompt {self.name!r}: peft_type {self.peft_type!r}; "
                                  f"expected one of {KV_TYPES}")
        h = hashlib.sha256(f"kv|{self.keys.shape}|".encode())
        h.update(self.keys.tobytes())
        h.update(self.values.tobytes())
        self._digest = h.hexdigest()

    @classmethod
    def from_peft_layout(cls, flat: np.ndarray, num_layers: int, num_heads: int, **kw) -> "KVPrompt":
        """From PEFT's saved ``prompt_embeddings`` ``[P, N * 2 * Hkv * D]``, viewed as PEFT's
        ``get_prompt`` does: ``[P, 2N, Hkv, D]`` permuted to ``[2N, Hkv, P, D]``, layer i's keys
        at 2i and values at 2i + 1."""
        P, width = flat.shape
        if width % (2 * num_layers * num_heads):
            raise SoftPromptError(f"K/V prompt {kw.get('name', 'prompt')!r}: width {width} is not "
                                  f"2 x {num_layers} layers x {num_heads} heads x head_dim")
        kv = np.asarray(flat, np.float32).reshape(P, 2 * num_layers, num_heads, -1).transpose(1, 2, 0, 3)
        return cls(kv[0::2], kv[1::2], **kw)

    def peft_layout(self) -> np.ndarray:
        """The inverse of ``from_peft_layout``: ``[P, N * 2 * Hkv * D]``."""
        N, H, P, D = self.keys.shape
        kv = np.empty((2 * N, H, P, D), np.float32)
        kv[0::2], kv[1::2] = self.keys, self.values
        return np.ascontiguousarray(kv.transpose(2, 0, 1, 3).reshape(P, -1))

    @property
    def kind(self) -> str:
        return self.peft_type.lower()

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(N layers, Hkv, D)."""
        N, H, _, D = self.keys.shape
        return int(N), int(H), int(D)

    scores_first = False  # nothing is computed at the last prefix position

    def segments(self) -> tuple[Segment, ...]:
        return (KV(self.keys, self.values),)

    check_base_model = SoftPrompt.check_base_model

    def save_peft(self, path, base_model_name_or_path: str | None = None,
                  tokenizer_name_or_path: str | None = None):
        """Write the PEFT adapter back as the type it was (lossless: PEFT in inference mode
        reads the K/V from ``prompt_embeddings`` whatever ``prefix_projection`` was)."""
        from pathlib import Path

        from .prompts import write_adapter

        N, H, D = self.geometry
        config = dict(self.metadata.get("peft_config") or {})
        config.update(peft_type=self.peft_type, task_type=config.get("task_type") or "CAUSAL_LM",
                      num_virtual_tokens=self.num_virtual_tokens, num_layers=N,
                      num_attention_heads=H, token_dim=H * D, num_transformer_submodules=1,
                      inference_mode=True,
                      base_model_name_or_path=base_model_name_or_path or self.base_model)
        if tokenizer_name_or_path is not None:
            config["tokenizer_name_or_path"] = tokenizer_name_or_path
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_adapter(path, config, {"prompt_embeddings": self.peft_layout()}, self.name,
                      self.base_fingerprint)
        return path


@dataclass(frozen=True)
class Text:
    """A text segment: ``text`` and its ``ids`` (tokenised alone, no special tokens)."""

    text: str
    ids: tuple[int, ...]

    @classmethod
    def encode(cls, text: str, tokenizer: Tokenizer) -> "Text":
        ids = tuple(tokenizer.encode(text, False))
        if not ids:
            raise SoftPromptError(f"text segment {text[:40]!r} tokenises to nothing")
        return cls(text, ids)


@dataclass
class ComposedPrompt:
    """Parts (prompts of any kind and ``Text``) computed once, in order, as one prefix.

    Its P is the sum of the parts' lengths; part k's tokens sit at positions after the parts
    before it; it predicts the request's first token unless it ends in K/V.
    """

    parts: tuple
    name: str = "prompt"
    base_model: str | None = None
    base_fingerprint: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        flat: list = []
        for p in self.parts:  # a composed part is spliced in: one flat list of parts
            flat += list(p.parts) if isinstance(p, ComposedPrompt) else [p]
        if not flat:
            raise SoftPromptError(f"composed prompt {self.name!r} has no parts")
        for p in flat:
            if not isinstance(p, (SoftPrompt, KVPrompt, Text)):
                raise SoftPromptError(f"composed prompt {self.name!r}: a part must be a prompt or "
                                      f"text, got {type(p).__name__}")
        self.parts = tuple(flat)
        h = hashlib.sha256(b"composed")
        for p in self.parts:
            h.update(f"|text:{list(p.ids)}" .encode() if isinstance(p, Text) else f"|{p.digest}".encode())
        self._digest = h.hexdigest()

    kind = "composed"

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def num_virtual_tokens(self) -> int:
        return sum(len(p.ids) if isinstance(p, Text) else p.num_virtual_tokens for p in self.parts)

    @property
    def scores_first(self) -> bool:
        return not isinstance(self.segments()[-1], KV)

    def segments(self) -> tuple[Segment, ...]:
        out: list[Segment] = []
        for p in self.parts:
            out += [TokenIds(p.ids)] if isinstance(p, Text) else list(p.segments())
        return tuple(out)

    def check_base_model(self, fingerprint, model_name, strict: bool = False) -> None:
        for p in self.parts:
            if not isinstance(p, Text):
                p.check_base_model(fingerprint, model_name, strict)

    def describe(self) -> list[dict]:
        """The parts as JSON-able dicts (``/v1/models``, ``softprompt info``)."""
        return [{"text": p.text, "tokens": len(p.ids)} if isinstance(p, Text) else
                {"kind": p.kind, "name": p.name, "num_virtual_tokens": p.num_virtual_tokens}
                for p in self.parts]


def compose(parts: Sequence, tokenizer: Tokenizer, name: str = "prompt",
            resolve=None) -> ComposedPrompt:
    """A ComposedPrompt from ``parts``: a ``str`` is text (tokenised on its own, no special
    tokens), a prompt of any kind is itself, anything else goes through ``resolve`` (e.g. a
    registered prompt's name in a JSON segment, or a path; see ``Runtime.add_prompt``)."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(Text.encode(p, tokenizer))
        elif isinstance(p, (SoftPrompt, KVPrompt, Text, ComposedPrompt)):
            out.append(p)
        elif resolve is not None:
            out.append(resolve(p))
        else:
            raise SoftPromptError(f"composed prompt {name!r}: a part must be a str or a prompt, "
                                  f"got {type(p).__name__}")
    return ComposedPrompt(tuple(out), name=name)


def check_prompt(prompt: Prompt, model: ModelInfo,
                 max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS) -> Prompt:
    """Raise SoftPromptError unless ``prompt`` fits ``model``: P >= 1 and below both the
    maximum and the model's positions, finite values, the model's hidden size for embeddings,
    its layers / K/V heads / head size for K/V, its vocabulary for text."""
    name, P = prompt.name, prompt.num_virtual_tokens
    for seg in prompt.segments():
        if isinstance(seg, Embeds):
            check_rows(name, seg.rows, model.hidden_size)
        elif isinstance(seg, KV):
            want = (model.num_layers, model.num_kv_heads, model.head_dim)
            N, H, n, D = seg.keys.shape
            if (N, H, D) != want:
                raise SoftPromptError(f"K/V prompt {name!r} has {N} layers x {H} K/V heads x head "
                                      f"size {D} but the model has {want[0]} x {want[1]} x {want[2]}")
            if n == 0:
                raise SoftPromptError(f"K/V prompt {name!r} has 0 virtual tokens; expected P >= 1")
            if not (np.isfinite(seg.keys).all() and np.isfinite(seg.values).all()):
                raise SoftPromptError(f"K/V prompt {name!r} contains NaN/Inf values")
        else:
            bad = [i for i in seg.ids if not 0 <= i < model.vocab_size]
            if bad:
                raise SoftPromptError(f"prompt {name!r}: text ids outside the vocabulary "
                                      f"[0, {model.vocab_size}): {bad[:5]}")
    if P > max_virtual_tokens:
        what = "soft prompt" if isinstance(prompt, SoftPrompt) else "prompt"
        raise SoftPromptError(f"{what} {name!r} has {P} virtual tokens, above the maximum of "
                              f"{max_virtual_tokens} (max_virtual_tokens)")
    if P >= model.max_positions:
        raise SoftPromptError(f"prompt {name!r} has {P} virtual tokens but the model has only "
                              f"{model.max_positions} positions")
    return prompt


def as_prompt(value, name: str = "inline") -> Prompt:
    """A request's inline prompt: a prompt of any kind as it is, a ``[P, E]`` array or tensor
    as a SoftPrompt; anything else is a SoftPromptError."""
    if isinstance(value, (SoftPrompt, KVPrompt, ComposedPrompt)):
        return value
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return SoftPrompt(value, name=name, init="inline")
    raise SoftPromptError(f"prompt must be a name, a prompt or a [P, E] array, got "
                          f"{type(value).__name__}")
