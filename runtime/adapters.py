"""PEFT adapters of every prompt-learning type, read as the prompts the runtime serves.

What PEFT 0.21's ``save_pretrained`` writes (``adapter_model.safetensors``) and what it becomes:

===========================  ==========================================  =========================
peft_type                    tensors saved                               served as
===========================  ==========================================  =========================
PROMPT_TUNING                ``prompt_embeddings [P, E]``                SoftPrompt ``[P, E]``
P_TUNING                     ``prompt_embeddings [P, E]``: the encoder   SoftPrompt (the encoder
                             (MLP or LSTM) already applied by PEFT       ran once, at save time)
CPT                          ``prompt_embeddings [P, E]``: embeddings    SoftPrompt
                             plus their projected deltas
MULTITASK_PROMPT_TUNING      ``prompt_embeddings [P, E]``, ``prefix_     one SoftPrompt per task:
                             task_cols [T, P, r]``, ``prefix_task_rows   shared * (cols[t] @
                             [T, r, E]``                                 rows[t])
PREFIX_TUNING                ``prompt_embeddings [P, N * 2 * Hkv * D]``  KVPrompt (the projection
                             (with ``prefix_projection`` the MLP's       MLP, if any, already
                             output)                                     applied)
CARTRIDGE                    ``prompt_embeddings [P, N * 2 * Hkv * D]``  KVPrompt
===========================  ==========================================  =========================

Every other PEFT type (ADAPTION_PROMPT, LoRA, IA3, ...) changes the model's weights or layers,
not its input, and is refused in one line naming the served types. Files are checked before
they are trusted (typed config values, bounded safetensors headers, shapes against the config,
finite values); ``.bin`` weights only with ``allow_pickle=True`` (then ``weights_only``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import safetensors_np
from .prompt_kinds import KV_TYPES, KVPrompt
from .prompts import (_PEFT_WEIGHTS, Prompt, SoftPrompt, SoftPromptError, _checked,
                      _read_adapter_config, _torch_load)

EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
SERVED_TYPES = EMBEDDING_TYPES + KV_TYPES
_MULTITASK = ("prefix_task_cols", "prefix_task_rows")


def refuse_type(peft_type, where) -> SoftPromptError:
    """The one-line refusal of an adapter type the runtime does not serve."""
    why = ("its prompts are gated inside every attention layer, not a prefix"
           if peft_type == "ADAPTION_PROMPT" else "it changes the model's layers, not its input")
    return SoftPromptError(f"{where} holds a {peft_type!r} adapter, which is not served ({why}); "
                           f"served peft_type values: {', '.join(SERVED_TYPES)}")


def _weights(path: Path, names: tuple[str, ...], allow_pickle: bool) -> tuple[dict, dict]:
    """The named tensors (those present) of the adapter in directory ``path``, and metadata."""
    st, pt = path / _PEFT_WEIGHTS[0], path / _PEFT_WEIGHTS[1]
    if st.is_file():
        try:
            with open(st, "rb") as f:
                present = [n for n in names if n in safetensors_np.read_header(f).tensors]
            tensors, meta = safetensors_np.load_file(st, names=present)
        except safetensors_np.SafetensorsError as e:
            raise SoftPromptError(f"cannot read {st}: corrupt or truncated safetensors file "
                                  f"({e})") from None
    elif pt.is_file():
        loaded, meta = _torch_load(pt, allow_pickle), {}
        tensors = {n: np.asarray(loaded[n].float().numpy() if hasattr(loaded[n], "detach")
                                 else loaded[n], np.float32) for n in names if n in loaded}
    else:
        raise SoftPromptError(f"{path}: no {_PEFT_WEIGHTS[0]} next to adapter_config.json")
    if "prompt_embeddings" not in tensors:
        raise SoftPromptError(f"{path}: adapter weights have no 'prompt_embeddings' tensor")
    return tensors, meta


def _int(cfg: dict, key: str, path: Path, low: int = 1) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise SoftPromptError(f"{path}: {key} must be an integer >= {low}, got {v!r}")
    return v


def load_adapter(path: Path, name: str, *, allow_pickle: bool = False,
                 task: int | None = None) -> list[Prompt]:
    """The prompts of the PEFT adapter in directory ``path``: one, or for a multitask adapter
    one per task named ``name/0`` .. ``name/<T-1>`` (only task ``task`` when given)."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise SoftPromptError(f"{path} is not a PEFT adapter directory: adapter_config.json missing")
    cfg = _read_adapter_config(cfg_file)
    kind = cfg.get("peft_type")
    if kind not in SERVED_TYPES:
        raise refuse_type(kind, path)
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise SoftPromptError(f"{path}: num_transformer_submodules is {subs}; expected 1 "
                              "(a decoder-only model; encoder-decoder prompts are not served)")
    common = dict(base_model=cfg.get("base_model_name_or_path"))
    tensors, meta = _weights(path, ("prompt_embeddings",) + _MULTITASK * (kind == "MULTITASK_PROMPT_TUNING"),
                             allow_pickle)
    common["base_fingerprint"] = meta.get("base_fingerprint")
    for n, t in tensors.items():
        if np.asarray(t).dtype.kind != "f":
            raise SoftPromptError(f"{path}: {n} must be floating point, got {np.asarray(t).dtype}")
    flat = np.asarray(tensors["prompt_embeddings"], np.float32)
    if flat.ndim != 2 or flat.shape[0] == 0:
        raise SoftPromptError(f"{path}: prompt_embeddings must be [P, width] with P >= 1, got "
                              f"{list(flat.shape)}")
    P = _int(cfg, "num_virtual_tokens", path)
    if flat.shape[0] != P:
        raise SoftPromptError(f"{path}: prompt_embeddings has {flat.shape[0]} rows but "
                              f"adapter_config.json says num_virtual_tokens={P}")
    if not np.isfinite(flat).all():
        raise SoftPromptError(f"{path}: prompt_embeddings contains NaN/Inf values")
    metadata = {"peft_config": cfg}
    if kind in KV_TYPES:
        N, H = _int(cfg, "num_layers", path), _int(cfg, "num_attention_heads", path)
        width = 2 * N * _int(cfg, "token_dim", path)
        if flat.shape[1] != width or cfg["token_dim"] % H:
            raise SoftPromptError(f"{path}: prompt_embeddings is {list(flat.shape)} but "
                                  f"adapter_config.json says [num_virtual_tokens, 2 x num_layers x "
                                  f"token_dim] = [{P}, {width}] with token_dim divisible by "
                                  f"num_attention_heads={H}")
        return [KVPrompt.from_peft_layout(flat, N, H, name=name, peft_type=kind,
                                          metadata=metadata, **common)]
    if cfg.get("token_dim") is not None and flat.shape[1] != cfg["token_dim"]:
        raise SoftPromptError(f"{path}: prompt_embeddings has {flat.shape[1]} columns but "
                              f"adapter_config.json says token_dim={cfg['token_dim']}")
    if kind == "MULTITASK_PROMPT_TUNING":
        return _tasks(path, name, tensors, cfg, task, metadata, common)
    if task is not None:
        raise SoftPromptError(f"{path}: task={task} given but it holds a {kind} adapter (one "
                              "prompt, no tasks)")
    init = {"prompt_tuning_init": cfg.get("prompt_tuning_init"),
            "prompt_tuning_init_text": cfg.get("prompt_tuning_init_text")}
    return [_checked(SoftPrompt(flat, name=name, init="peft", peft_type=kind,
                                metadata=metadata | init, **common), path)]


def _tasks(path: Path, name: str, tensors: dict, cfg: dict, task: int | None,
           metadata: dict, common: dict) -> list[Prompt]:
    """One SoftPrompt per task of a MULTITASK_PROMPT_TUNING adapter, as PEFT's
    ``MultitaskPromptEmbedding.forward``: ``shared * (prefix_task_cols[t] @ prefix_task_rows[t])``."""
    missing = [n for n in _MULTITASK if n not in tensors]
    if missing:
        raise SoftPromptError(f"{path}: a MULTITASK_PROMPT_TUNING adapter without {missing[0]!r}")
    shared = np.asarray(tensors["prompt_embeddings"], np.float32)
    cols = np.asarray(tensors["prefix_task_cols"], np.float32)
    rows = np.asarray(tensors["prefix_task_rows"], np.float32)
    P, E = shared.shape
    T = _int(cfg, "num_tasks", path)
    if cols.ndim != 3 or rows.ndim != 3 or cols.shape[:2] != (T, P) or rows.shape[0] != T \
            or rows.shape[2] != E or cols.shape[2] != rows.shape[1]:
        raise SoftPromptError(f"{path}: prefix_task_cols {list(cols.shape)} and prefix_task_rows "
                              f"{list(rows.shape)} do not fit [T, P, r] and [T, r, E] with "
                              f"T={T}, P={P}, E={E}")
    if not (np.isfinite(cols).all() and np.isfinite(rows).all()):
        raise SoftPromptError(f"{path}: the task factors contain NaN/Inf values")
    tasks = range(T) if task is None else [task]
    if task is not None and not (isinstance(task, int) and 0 <= task < T):
        raise SoftPromptError(f"{path}: task must be an integer in [0, {T}), got {task!r}")
    many = task is None
    return [_checked(SoftPrompt(shared * (cols[t] @ rows[t]), name=f"{name}/{t}" if many else name,
                                init="peft", peft_type="MULTITASK_PROMPT_TUNING",
                                metadata=metadata | {"task": t}, **common), path)
            for t in tasks]


MAX_INLINE_BYTES = 64 << 20  # an inline prompt's safetensors bytes (a 2,048 x 30-layer K/V is ~47 MB)


def prompt_from_bytes(data: bytes, model, name: str = "inline",
                      max_bytes: int = MAX_INLINE_BYTES) -> Prompt:
    """An inline prompt sent with a request as safetensors bytes: one ``[P, E]`` tensor (or a
    PEFT adapter's ``prompt_embeddings``) is a SoftPrompt; a ``prompt_embeddings`` of PEFT's
    prefix-tuning width ``N * 2 * Hkv * D`` for ``model`` (a ``ModelInfo``) is a KVPrompt (when
    the two widths are equal, metadata ``peft_type`` PREFIX_TUNING or CARTRIDGE says K/V).
    Checked like a file: bounded header, no trailing bytes, finite values."""
    try:
        tensors, meta = safetensors_np.load_bytes(data, max_bytes)
    except safetensors_np.SafetensorsError as e:
        raise SoftPromptError(f"inline prompt {name!r}: not a valid safetensors payload ({e})") from None
    if any(n in tensors for n in _MULTITASK):
        raise SoftPromptError(f"inline prompt {name!r}: a multitask adapter holds several task "
                              "prompts; send one task's [P, E] tensor")
    if "prompt_embeddings" in tensors:
        flat = tensors["prompt_embeddings"]
    elif len(tensors) == 1:
        flat = next(iter(tensors.values()))
    else:
        raise SoftPromptError(f"inline prompt {name!r}: {len(tensors)} tensors and none is named "
                              "'prompt_embeddings'; expected one [P, E] tensor")
    if flat.ndim != 2 or flat.dtype.kind != "f" or flat.shape[0] == 0:
        raise SoftPromptError(f"inline prompt {name!r}: expected a [P, E] floating-point tensor "
                              f"with P >= 1, got {flat.dtype} {list(flat.shape)}")
    kv_width = 2 * model.num_layers * model.num_kv_heads * model.head_dim
    kind = meta.get("peft_type")  # decides when both widths fit (e.g. E = 2 N Hkv D)
    if flat.shape[1] == kv_width and (kind in KV_TYPES or flat.shape[1] != model.hidden_size):
        return KVPrompt.from_peft_layout(flat, model.num_layers, model.num_kv_heads, name=name,
                                         peft_type=kind if kind in KV_TYPES else "PREFIX_TUNING",
                                         base_fingerprint=meta.get("base_fingerprint"))
    if flat.shape[1] == model.hidden_size:
        return SoftPrompt(flat, name=name, init="inline", base_fingerprint=meta.get("base_fingerprint"))
    raise SoftPromptError(f"inline prompt {name!r} is [{flat.shape[0]}, {flat.shape[1]}]; expected "
                          f"[P, {model.hidden_size}] embeddings or [P, {kv_width}] prefix-tuning K/V")
