"""Soft prompts: P learned input embeddings ``[P, E]`` (PEFT's prompt-tuning family), and the
one interface every kind of prompt offers the runtime (``Prompt``, its ``Segment`` parts).

Every prompt, whatever its kind (``runtime/prompt_kinds.py`` has the K/V and composed ones,
``runtime/adapters.py`` reads PEFT's six prompt-learning types), is a sequence of segments that
yields a per-layer K/V prefix: ``Embeds`` (``[n, E]`` rows run through the model), ``TokenIds``
(text, embedded by the model's own embedding module, then run) and ``KV`` (per-layer keys and
values inserted as they are, no forward). Backends compute a prefix from the segments, in
order, once per digest; nothing else in the runtime looks inside a prompt.

Sources, in order of trust:
- a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` holding
  ``prompt_embeddings``), as ``PeftModel.save_pretrained`` writes it;
- a raw ``.safetensors`` file (first tensor, or ``prompt_embeddings``) or ``.npy`` array;
- ``.bin`` / ``.pt`` only with ``allow_pickle=True``, and then ``torch.load(weights_only=True)``;
- text (PEFT's ``PromptTuningInit.TEXT``) or random with a seed.

Files are checked before they are trusted: ``adapter_config.json`` values are type-checked
(one-line errors), safetensors and ``.npy`` headers are parsed and bounded before any data is
read (no pickle, no trailing bytes, sizes that match shapes), only the prompt tensor is
read, and a prompt from a file must have P >= 1 finite ``[P, E]`` floating-point values.

``SoftPrompt.save_peft`` writes a directory that ``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union

import numpy as np

from softprompt.models import hub, read_json_object

from . import safetensors_np

DEFAULT_MAX_VIRTUAL_TOKENS = 4096  # a 2,048-token cartridge fits; the model's positions bound P
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class SoftPromptError(ValueError):
    """An invalid soft prompt or prompt file; the message names the problem."""


class BaseModelMismatchWarning(UserWarning):
    """A soft prompt trained for another base model is being used."""


# ------------------------------------------------------------------------------- segments
@dataclass(frozen=True, eq=False)
class Embeds:
    """``[n, E]`` float32 input embeddings, run through the model like PEFT's virtual tokens."""

    rows: np.ndarray


@dataclass(frozen=True)
class TokenIds:
    """Token ids (a text segment), embedded by the model's own embedding module, then run."""

    ids: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class KV:
    """Per-layer keys and values ``[N, Hkv, n, D]`` float32, inserted into the prefix as they
    are: no forward, no rotary embedding (PEFT's prefix tuning and cartridges)."""

    keys: np.ndarray
    values: np.ndarray


Segment = Union[Embeds, TokenIds, KV]


def check_rows(name: str, rows: np.ndarray, hidden_size: int | None = None) -> None:
    """Raise SoftPromptError unless ``rows`` ``[P, E]`` has P >= 1, E = ``hidden_size`` (when
    given) and only finite values (the message names the first bad virtual tokens)."""
    if rows.shape[0] == 0:
        raise SoftPromptError(f"soft prompt {name!r} has 0 virtual tokens; expected P >= 1")
    if hidden_size is not None and rows.shape[1] != hidden_size:
        raise SoftPromptError(f"soft prompt {name!r} has hidden size {rows.shape[1]} "
                              f"but the model's hidden size is {hidden_size}")
    bad = ~np.isfinite(rows)
    if bad.any():
        bad_rows = np.flatnonzero(bad.any(axis=1)).tolist()
        raise SoftPromptError(f"soft prompt {name!r} contains NaN/Inf values (virtual tokens "
                              f"{bad_rows[:5]}{'...' if len(bad_rows) > 5 else ''})")


class Prompt(Protocol):
    """What the runtime needs of a prompt of any kind.

    name: the name requests use; kind: ``prompt_tuning``, ``p_tuning``,
    ``multitask_prompt_tuning``, ``cpt``, ``prefix_tuning``, ``cartridge`` or ``composed``;
    digest: sha256 of everything that determines its K/V (the prefix-cache key, with the model
    fingerprint and dtype); num_virtual_tokens: P, the prefix length in positions;
    scores_first: whether the prefix predicts the request's first token (False when it ends in
    K/V: nothing is computed at its last position, as in PEFT's prefix tuning).
    """

    name: str

    @property
    def kind(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def num_virtual_tokens(self) -> int: ...

    @property
    def scores_first(self) -> bool: ...

    def segments(self) -> tuple[Segment, ...]: ...

    def check_base_model(self, fingerprint: str | None, model_name: str | None,
                         strict: bool = False) -> None: ...


@dataclass
class SoftPrompt:
    """P virtual-token embeddings for one task.

    embeddings: ``[P, E]`` float32 numpy array (torch tensors are accepted and converted;
        this module never needs torch, so a torch-free ONNX server can load prompts).
    name: the name requests use to pick it.
    base_model: the base model it was trained for (PEFT's ``base_model_name_or_path``).
    base_fingerprint: the softprompt model fingerprint it was made with, when known.
    init: how it was made (``"random"``, ``"text"``, ``"peft"``, ``"file"``, ...).
    peft_type: the PEFT type it was read from (``PROMPT_TUNING``, ``P_TUNING`` with its encoder
        already applied, ``MULTITASK_PROMPT_TUNING`` for one task, ``CPT`` with its deltas
        added); ``save_peft`` writes it back as that type where that is lossless.
    """

    embeddings: np.ndarray
    name: str = "prompt"
    base_model: str | None = None
    base_fingerprint: str | None = None
    init: str | None = None
    metadata: dict = field(default_factory=dict)
    peft_type: str = "PROMPT_TUNING"

    def __post_init__(self):
        emb = self.embeddings
        if hasattr(emb, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
            emb = emb.detach().float().cpu().numpy()
        if not isinstance(emb, np.ndarray):
            raise SoftPromptError(f"soft prompt {self.name!r}: embeddings must be an array or "
                                  f"tensor, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise SoftPromptError(f"soft prompt {self.name!r}: embeddings must be 2-D [P, E], "
                                  f"got shape {tuple(emb.shape)}")
        if emb.dtype.kind != "f":
            raise SoftPromptError(f"soft prompt {self.name!r}: embeddings must be floating "
                                  f"point, got {emb.dtype}")
        emb = np.array(emb, dtype=np.float32, order="C")  # our own copy, then frozen:
        emb.flags.writeable = False  # the digest below stays true for the object's lifetime
        self.embeddings = emb
        h = hashlib.sha256(repr(tuple(emb.shape)).encode())
        h.update(emb.tobytes())
        self._digest = h.hexdigest()

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def kind(self) -> str:
        return self.peft_type.lower()

    scores_first = True  # the last virtual token predicts the request's first token

    def segments(self) -> tuple[Segment, ...]:
        return (Embeds(self.embeddings),)

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def digest(self) -> str:
        """sha256 of the float32 bytes and shape: the prompt's content key in the prefix cache
        (computed once: the embeddings are a read-only copy)."""
        return self._digest

    # ----------------------------------------------------------------------------- checks
    def validate(self, hidden_size: int | None = None,
                 max_virtual_tokens: int = DEFAULT_MAX_VIRTUAL_TOKENS) -> "SoftPrompt":
        """Raise SoftPromptError on P = 0, P above the maximum, NaN/Inf or a hidden-size mismatch."""
        p = self.num_virtual_tokens
        if p > max_virtual_tokens:
            raise SoftPromptError(f"soft prompt {self.name!r} has {p} virtual tokens, above the "
                                  f"maximum of {max_virtual_tokens} (max_virtual_tokens)")
        check_rows(self.name, self.embeddings, hidden_size)
        return self

    def check_base_model(self, fingerprint: str | None, model_name: str | None,
                         strict: bool = False) -> None:
        """Warn (or raise when ``strict``) if the prompt was made for another base model."""
        mismatch = None
        if self.base_fingerprint and fingerprint and self.base_fingerprint != fingerprint:
            mismatch = (f"model fingerprint {self.base_fingerprint[:12]}", f"{fingerprint[:12]}")
        elif not self.base_fingerprint and self.base_model and model_name and \
                Path(str(self.base_model)).name != Path(str(model_name)).name:
            mismatch = (repr(self.base_model), repr(model_name))
        if mismatch:
            msg = (f"soft prompt {self.name!r} was made for base model {mismatch[0]} but is used "
                   f"with {mismatch[1]}")
            if strict:
                raise SoftPromptError(msg + " (strict mode)")
            warnings.warn(msg, BaseModelMismatchWarning, stacklevel=3)

    # ---------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source, name: str | None = None, allow_pickle: bool = False,
             task: int | None = None) -> "Prompt":
        """Load a prompt of any kind: a PEFT adapter directory of any prompt-learning type
        (``runtime/adapters.py``: a ``SoftPrompt`` for PROMPT_TUNING, P_TUNING, CPT and one task
        of MULTITASK_PROMPT_TUNING (``task``), a ``KVPrompt`` for PREFIX_TUNING and CARTRIDGE),
        a ``.safetensors``, ``.npy`` or (opt-in) ``.bin``/``.pt`` ``[P, E]`` file, or a hub id
        ``owner/name[@revision]`` that is not a local path (a PEFT adapter fetched through
        huggingface_hub's cache, see ``softprompt.models.hub``). A multitask adapter needs
        ``task`` here; ``load_all`` (and ``Runtime.add_prompt``) take every task."""
        prompts = cls.load_all(source, name, allow_pickle, task)
        if len(prompts) != 1:
            raise SoftPromptError(f"{source} holds a MULTITASK_PROMPT_TUNING adapter of "
                                  f"{len(prompts)} tasks; pass task=0..{len(prompts) - 1}, or add it "
                                  "to a runtime, which registers NAME/0 .. NAME/T-1")
        return prompts[0]

    @classmethod
    def load_all(cls, source, name: str | None = None, allow_pickle: bool = False,
                 task: int | None = None) -> list["Prompt"]:
        """Every prompt ``source`` holds (as ``load``): one, or one per task of a multitask
        adapter, named ``name/0`` .. ``name/<T-1>``."""
        from .adapters import load_adapter
        from .prompt_kinds import ComposedPrompt, KVPrompt

        if isinstance(source, (SoftPrompt, KVPrompt, ComposedPrompt)):
            return [source]
        if isinstance(source, np.ndarray) or hasattr(source, "detach"):
            return [cls(source, name=name or "prompt", init="tensor")]
        path = Path(source)
        if hub.is_hub_id(source):
            name = name or hub.parse(source)[0].rpartition("/")[2]
            path = hub.resolve(source, kind="adapter", error=SoftPromptError, allow_patterns=(
                hub.ADAPTER_FILES + ["adapter_model.bin"] * allow_pickle))
        name = name or path.stem
        if path.is_dir():
            return load_adapter(path, name, allow_pickle=allow_pickle, task=task)
        if not path.is_file():
            raise SoftPromptError(f"soft prompt source not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            tensors, meta = _read_safetensors(path)
            return [_checked(cls(_pick_tensor(tensors, path), name=name, init="file",
                                 base_fingerprint=meta.get("base_fingerprint"),
                                 base_model=meta.get("base_model")), path)]
        if suffix == ".npy":
            return [_checked(cls(_read_npy(path), name=name, init="file"), path)]
        if suffix in (".bin", ".pt", ".pth"):
            return [_checked(cls(_pick_tensor(_torch_load(path, allow_pickle), path), name=name,
                                 init="file"), path)]
        raise SoftPromptError(f"unsupported soft prompt file {path.name}; expected a PEFT adapter "
                              "directory, .safetensors, .npy, or .bin/.pt with allow_pickle=True")

    @classmethod
    def from_peft(cls, path, name: str | None = None, allow_pickle: bool = False,
                  task: int | None = None) -> "Prompt":
        """A PEFT prompt-learning adapter directory of any served type (``adapters.load_adapter``);
        a multitask adapter needs ``task`` (or ``Runtime.add_prompt``, which registers every task)."""
        path = Path(path)
        return cls.load(path, name or path.name, allow_pickle, task)

    @classmethod
    def from_text(cls, text: str, model, num_virtual_tokens: int, name: str = "prompt",
                  base_fingerprint: str | None = None) -> "SoftPrompt":
        """PEFT's TEXT init: embed the text's tokens, truncated or repeated to P tokens.

        model: a LoadedModel (or anything with ``.model`` and ``.tokenizer``).
        """
        import torch

        ids = model.tokenizer(text)["input_ids"]
        if not ids:
            raise SoftPromptError(f"init text {text!r} tokenizes to nothing")
        ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
        emb_module = model.model.get_input_embeddings()
        with torch.no_grad():
            emb = emb_module(torch.tensor(ids, device=emb_module.weight.device))
        return cls(emb.float().cpu(), name=name, init="text", metadata={"init_text": text},
                   base_model=getattr(model, "source", None),
                   base_fingerprint=base_fingerprint or getattr(model, "fingerprint", None))

    @classmethod
    def random(cls, num_virtual_tokens: int, hidden_size: int, seed: int = 0,
               std: float = 1.0, name: str = "prompt") -> "SoftPrompt":
        """Gaussian embeddings ``N(0, std^2)`` from a seeded generator."""
        rng = np.random.default_rng(seed)
        emb = rng.standard_normal((num_virtual_tokens, hidden_size), dtype=np.float32) * std
        return cls(emb, name=name, init="random", metadata={"seed": seed, "std": std})

    # ----------------------------------------------------------------------------- saving
    def save_peft(self, path, base_model_name_or_path: str | None = None,
                  tokenizer_name_or_path: str | None = None) -> Path:
        """Write a PEFT adapter directory that ``PeftModel.from_pretrained(base, path)`` loads:
        as the type it was read from when PEFT loads that losslessly (PROMPT_TUNING, P_TUNING
        and CPT keep their saved config, in inference mode), else as PROMPT_TUNING (one task of
        a multitask adapter: exactly that task's ``[P, E]``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.metadata.get("peft_config")
        if self.peft_type in ("P_TUNING", "CPT") and isinstance(config, dict):
            config = dict(config, inference_mode=True)
        else:
            config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                      "num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.hidden_size,
                      "num_transformer_submodules": 1, "inference_mode": True,
                      "prompt_tuning_init": "RANDOM"}
        config["base_model_name_or_path"] = base_model_name_or_path or self.base_model
        if tokenizer_name_or_path is not None:
            config["tokenizer_name_or_path"] = tokenizer_name_or_path
        write_adapter(path, config, {"prompt_embeddings": self.embeddings}, self.name,
                      self.base_fingerprint)
        return path


def write_adapter(path: Path, config: dict, tensors: dict, name: str,
                  base_fingerprint: str | None) -> None:
    """``adapter_config.json`` (through PEFT's own config class, so PEFT reads it back) and
    ``adapter_model.safetensors`` into directory ``path``."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    known = set(cls.__dataclass_fields__)
    cls(**{k: v for k, v in config.items() if k in known}).save_pretrained(str(path))
    meta = {"format": "pt", "name": name}
    if base_fingerprint:
        meta["base_fingerprint"] = base_fingerprint
    safetensors_np.save_file(tensors, path / _PEFT_WEIGHTS[0], metadata=meta)


MAX_CONFIG_BYTES = 1 << 20
# adapter_config.json keys the runtime reads -> accepted types (None is always accepted)
_CONFIG_TYPES = {"peft_type": str, "num_virtual_tokens": int, "token_dim": int,
                 "num_transformer_submodules": int, "base_model_name_or_path": str,
                 "prompt_tuning_init": str, "prompt_tuning_init_text": str, "task_type": str}


def _read_adapter_config(path: Path) -> dict:
    """adapter_config.json as a dict whose keys the runtime reads have the right types."""
    cfg = read_json_object(path, MAX_CONFIG_BYTES, SoftPromptError, "an adapter config")
    for key, typ in _CONFIG_TYPES.items():
        value = cfg.get(key)
        if value is not None and (not isinstance(value, typ) or isinstance(value, bool)):
            raise SoftPromptError(f"{path}: {key} must be {typ.__name__} or null, got "
                                  f"{type(value).__name__} {value!r:.60}")
        if typ is int and value is not None and value < 1:
            raise SoftPromptError(f"{path}: {key} must be >= 1, got {value}")
    return cfg


def _checked(sp: "SoftPrompt", path: Path) -> "SoftPrompt":
    """A prompt read from a file: at least one virtual token, every value finite."""
    try:
        return sp.validate(max_virtual_tokens=sp.num_virtual_tokens)
    except SoftPromptError as e:
        raise SoftPromptError(f"{path}: {e}") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """The prompt tensor (``prompt_embeddings``, or the only tensor) and the metadata; the
    header is checked first and no other tensor is read."""
    try:
        with open(path, "rb") as f:
            names = list(safetensors_np.read_header(f).tensors)
        if "prompt_embeddings" in names:
            names = ["prompt_embeddings"]
        elif len(names) != 1:  # _pick_tensor names the problem
            return dict.fromkeys(names), {}
        return safetensors_np.load_file(path, names=names)
    except safetensors_np.SafetensorsError as e:
        raise SoftPromptError(f"cannot read {path}: corrupt or truncated safetensors file "
                              f"({e})") from None


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` floating-point array, header checked first: never a pickle or an object
    array, and the file holds exactly the bytes the header's shape needs."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
            shape, fortran, dtype = read(f)
        except (ValueError, KeyError, SyntaxError, EOFError) as e:
            raise SoftPromptError(f"cannot read {path}: corrupt or truncated .npy (bad header: "
                                  f"{e or 'unsupported version'})") from None
        if dtype.hasobject or dtype.kind != "f":
            raise SoftPromptError(f"cannot read {path}: a .npy soft prompt must hold floating "
                                  f"point values, got {dtype} (pickled objects are never loaded)")
        need = math.prod(shape) * dtype.itemsize
        have = path.stat().st_size - f.tell()
        if have != need:
            what = "truncated" if have < need else f"{have - need} trailing bytes"
            raise SoftPromptError(f"cannot read {path}: corrupt or truncated .npy ({what}: "
                                  f"{dtype} {list(shape)} needs {need} data bytes, file has {have})")
        arr = np.fromfile(f, dtype=dtype, count=math.prod(shape))
    return arr.reshape(shape, order="F" if fortran else "C")


def _torch_load(path: Path, allow_pickle: bool) -> dict:
    if not allow_pickle:
        raise SoftPromptError(f"refusing to unpickle {path.name}: .bin/.pt files run code when "
                              "loaded; pass allow_pickle=True to load it with weights_only=True")
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SoftPromptError(f"cannot read {path}: corrupt, truncated or not a weights-only "
                              f"file ({type(e).__name__})") from None
    return obj if isinstance(obj, dict) else {"prompt_embeddings": obj}


def _pick_tensor(tensors: dict, path: Path):
    if "prompt_embeddings" in tensors:
        return tensors["prompt_embeddings"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise SoftPromptError(f"{path} holds {len(tensors)} tensors and none is named "
                          "'prompt_embeddings'; expected one [P, E] tensor")
