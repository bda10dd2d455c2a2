"""Load and run an exported bundle with onnxruntime, numpy and tokenizers only (no torch).

A bundle is a directory:

- ``model.onnx`` + ``model.onnx.data`` (external weights): one graph for all three uses —
  a soft prompt's prefix alone (past length 0), request tokens on top of a cached prefix,
  and one decode token on top of prefix + generated tokens.
- ``embeddings.npy`` ``[V, E]`` float32: the model's input-embedding module applied to every
  token id (so Gemma's √E scaling is inside, as PEFT's ``word_embeddings(input_ids)``);
  virtual tokens go into the graph as given, unscaled. A 4-bit bundle of a model whose tied
  table is GGUF Q8_0 (the default model) instead holds it once, exactly, as Q8_0 blocks
  (``"embeddings": "q8_0"`` in ``bundle.json``): ``embeddings_q8.npy`` ``[V, E]`` int8 codes
  and ``embeddings_scales.npy`` ``[V, E / 32]`` float16 scales, ``table = codes * scale`` per
  block of 32 (exact in float32). The graph's vocabulary projection reads the same two files
  (ONNX external data at the arrays' offsets) and ONNX Runtime folds their dequantisation
  into a float32 weight when the session is created.
- tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...).
- ``bundle.json``: dimensions, dtype, opset, input/output names, source fingerprint, eos/bos
  ids, library versions, ``files`` {name: {size, sha256}}, validation figures (with
  ``validation.bfloat16``: the graph under OpenVINO in bfloat16 against PyTorch in float32, mean
  and max |delta| of top-1 log-probs per use, the vocabulary projection's dtype and the CPU
  measured on, where OpenVINO and the CPU's bfloat16 units were present at export).

Loading trusts nothing it has not checked: ``bundle.json`` is type-checked (one-line
``BundleError`` naming the key), every listed file must match its size and sha256 — the
weights included — and the graph's inputs, outputs and static sizes must match the manifest.
Hashing ~540 MB of weights takes seconds, so a successful check is recorded under
``$SOFTPROMPT_HOME/verified/`` keyed by each file's path, size, mtime, ctime and inode; a
later load of the unchanged files skips the hash (``verify="full"`` always hashes).

Graph contract (names as Optimum names them):

    inputs_embeds                [B, L, E]         float (bundle dtype)
    attention_mask               [B, T]            int64, 1 = real key; T = past + L
    position_ids                 [B, L]            int64 (row b's token i sits at P_b + i)
    past_key_values.{i}.key|value [B, Hkv, past, D] float, i = 0..N-1 (past may be 0)
    logits_index                 [B, K]            int64 positions on L whose logits are wanted
    ->  logits                   [B, K, V]         float32
        present.{i}.key|value    [B, Hkv, T, D]    past concatenated with the new keys/values

Query i of row b (absolute key index past + i) attends key j iff j <= past + i and
attention_mask[b, j] == 1. The vocabulary projection runs only at ``logits_index``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from softprompt.models import read_json_object

from .errors import BundleError
from .ov_session import OpenVinoSession

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_Q8 = ("embeddings_q8.npy", "embeddings_scales.npy")  # codes, scales ("q8_0")
Q8_BLOCK = 32
EMBEDDING_FORMATS = ("float32", "q8_0")
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
VERIFY_MODES = ("fast", "full")
TOKENIZER_FILE = "tokenizer.json"
# read beside tokenizer.json: BOS/EOS and the chat template (``runtime/chat.py``)
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "chat_template.jinja")
MAX_MANIFEST_BYTES = 16 << 20
_DIMS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past, "logits_index"]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path, weights: bool = False) -> dict:
    """The manifest entry of one bundle file: size, sha256, and whether it is the big
    external-weights file."""
    entry = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if weights:
        entry["weights"] = True
    return entry


def check_files(root: Path, manifest: dict, verify: str = "fast") -> None:
    """Raise BundleError unless every file listed in the manifest is present with the
    recorded size and sha256.

    ``verify="fast"`` skips hashing a file whose path, size, mtime, ctime and inode equal
    those recorded when it last hashed to the manifest's sha256 (``$SOFTPROMPT_HOME/
    verified/``); ``"full"`` hashes every file every time. Files the loader reads
    (``model.onnx.data``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``) must be listed when present.
    """
    if verify not in VERIFY_MODES:
        raise BundleError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    files = manifest["files"]
    required = (MODEL_FILE, *embedding_files(manifest))
    for name in (*required, WEIGHTS_FILE, TOKENIZER_FILE, *TOKENIZER_SIDE_FILES):
        if name not in files and (name in required or (root / name).exists()):
            raise BundleError(f"{root / MANIFEST}: 'files' does not list {name}; every file "
                              "the loader reads must be listed with its sha256")
    record_file = _record_path(root)
    record = _read_record(record_file) if verify == "fast" else {}
    new_record, changed = {}, False
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path}: file missing (listed in {MANIFEST})")
        st = path.stat()
        if st.st_size != entry["size"]:
            raise BundleError(f"{path}: size {st.st_size} bytes differs from {entry['size']} in "
                              f"{MANIFEST}")
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                 "ino": st.st_ino, "sha256": entry["sha256"]}
        if record.get(name) == stamp:
            new_record[name] = stamp
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{path}: sha256 {digest[:16]}... differs from "
                              f"{entry['sha256'][:16]}... in {MANIFEST}; the file is corrupt "
                              "or was changed after export")
        new_record[name], changed = stamp, True
    if changed or record != new_record:
        _write_record(record_file, root, new_record)


def embedding_files(manifest: dict) -> tuple[str, ...]:
    """The files holding the bundle's token-embedding table, by ``manifest["embeddings"]``."""
    return EMBEDDINGS_Q8 if manifest.get("embeddings") == "q8_0" else (EMBEDDINGS_FILE,)


def dequantize_q8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 blocks -> float32: ``codes [..., E]`` int8 times ``scales [..., E / 32]`` float16
    per block of 32 along E. Exact: an fp16 scale (11 significant bits) times an int8 code
    (8) fits float32's 24."""
    codes, scales = np.asarray(codes), np.asarray(scales)
    table = codes.reshape(*codes.shape[:-1], -1, Q8_BLOCK).astype(np.float32)
    table *= scales.astype(np.float32)[..., None]
    return table.reshape(codes.shape)


class Q8Table:
    """A ``[V, E]`` float32 table held as Q8_0 blocks (memory-mapped): indexing rows
    (``table[ids]``, ``table[a:b]``) dequantises just those rows, exactly, so a process keeps
    29 MiB of shared pages instead of a private 108 MiB float32 copy. ``np.asarray(table)``
    gives the whole float32 table."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, codes: np.ndarray, scales: np.ndarray):
        self.codes, self.scales = codes, scales  # [V, E] int8, [V, E / 32] float16
        self.shape = tuple(codes.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, tuple):
            raise TypeError("a Q8_0 table is indexed by rows only (table[ids]); got a tuple")
        return dequantize_q8(self.codes[rows], self.scales[rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        table = self[:]
        return table if dtype is None else table.astype(dtype)


def _read_npy(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A plain ``.npy`` array (memory-mapped, never unpickled) of exactly ``dtype`` ``shape``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BundleError(f"{path}: not a plain .npy array ({e})") from None
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise BundleError(f"{path}: {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return arr


def load_table(root: Path, manifest: dict) -> np.ndarray | Q8Table:
    """The bundle's ``[V, E]`` float32 token-embedding table, read-only: ``embeddings.npy``
    memory-mapped, or a ``Q8Table`` over the memory-mapped Q8_0 files."""
    v, e = int(manifest["vocab_size"]), int(manifest["hidden_size"])
    if manifest.get("embeddings") != "q8_0":
        return _read_npy(root / EMBEDDINGS_FILE, np.float32, (v, e))
    codes = _read_npy(root / EMBEDDINGS_Q8[0], np.int8, (v, e))
    scales = _read_npy(root / EMBEDDINGS_Q8[1], np.float16, (v, e // Q8_BLOCK))
    return Q8Table(codes, scales)


def _record_path(root: Path) -> Path:
    from softprompt.models import softprompt_home  # torch-free

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return softprompt_home() / "verified" / f"{key}.json"


def _read_record(path: Path) -> dict:
    """{file name: stamp} of a bundle's last successful verification; {} if none or unreadable."""
    try:
        record = read_json_object(path, MAX_MANIFEST_BYTES, ValueError, "a verification record")
        return record["files"] if isinstance(record.get("files"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}


def _write_record(path: Path, root: Path, files: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bundle": str(root.resolve()), "files": files}))
        tmp.replace(path)
    except OSError:  # a read-only home only costs the hash again next time
        pass


def _is_int(x, minimum: int = 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _check_manifest(path: Path, m: dict) -> None:
    """One-line BundleError naming the first key of ``bundle.json`` with a wrong type or value."""
    missing = [k for k in ("model_type", *_DIMS, "dtype", "input_names", "output_names", "files")
               if k not in m]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}")

    def bad(key, expected):
        raise BundleError(f"{path}: {key} must be {expected}, got {m[key]!r:.80}")

    if not isinstance(m["model_type"], str):
        bad("model_type", "a string")
    for k in _DIMS:
        if not _is_int(m[k]):
            bad(k, "an integer >= 1")
    if m["num_heads"] % m["num_kv_heads"]:
        raise BundleError(f"{path}: num_heads {m['num_heads']} is not a multiple of "
                          f"num_kv_heads {m['num_kv_heads']}")
    if not isinstance(m["dtype"], str) or m["dtype"] not in NP_DTYPES:
        raise BundleError(f"{path}: dtype {m['dtype']!r} is not one of {sorted(NP_DTYPES)}")
    for k in ("input_names", "output_names"):
        if not isinstance(m[k], list) or not all(isinstance(n, str) for n in m[k]):
            bad(k, "a list of strings")
    for k, ok, expected in (
            ("max_position_embeddings", _is_int, "an integer >= 1 or null"),
            ("fingerprint", lambda v: isinstance(v, str), "a string or null"),
            ("bos_token_id", lambda v: _is_int(v, 0), "an integer >= 0 or null"),
            ("eos_token_ids", lambda v: isinstance(v, list) and all(_is_int(i, 0) for i in v),
             "a list of integers >= 0 or null"),
            ("validation", lambda v: isinstance(v, dict), "an object or null")):
        if m.get(k) is not None and not ok(m[k]):
            bad(k, expected)
    if m.get("embeddings", "float32") not in EMBEDDING_FORMATS:
        bad("embeddings", f"one of {EMBEDDING_FORMATS}")
    if m.get("embeddings") == "q8_0" and m["hidden_size"] % Q8_BLOCK:
        raise BundleError(f"{path}: embeddings 'q8_0' needs hidden_size a multiple of "
                          f"{Q8_BLOCK}, got {m['hidden_size']}")
    if not isinstance(m["files"], dict):
        bad("files", "an object {name: {size, sha256}}")
    for name, entry in m["files"].items():
        if not name or name != os.path.basename(name) or name in (".", "..", MANIFEST):
            raise BundleError(f"{path}: files lists {name!r}; expected a plain file name "
                              "inside the bundle directory")
        if not (isinstance(entry, dict) and _is_int(entry.get("size"), 0)
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and isinstance(entry.get("weights", False), bool)):
            raise BundleError(f"{path}: files[{name!r}] must be {{size: int >= 0, sha256: 64 "
                              f"hex digits}}, got {entry!r:.100}")


def read_manifest(root: Path) -> dict:
    """Parse and type-check ``bundle.json``; BundleError (one line) on anything malformed."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: file missing; {root} is not an exported bundle")
    manifest = read_json_object(path, MAX_MANIFEST_BYTES, BundleError, "a manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"{path}: format_version {version!r} is not supported (expected "
                          f"{FORMAT_VERSION}); re-export the model with this softprompt")
    _check_manifest(path, manifest)
    return manifest


def check_graph(root: Path, manifest: dict, session) -> None:
    """BundleError unless the graph's input/output names and static sizes match the manifest."""
    got_in, got_out = session.get_inputs(), session.get_outputs()
    if [i.name for i in got_in] != manifest["input_names"] or \
            [o.name for o in got_out] != manifest["output_names"]:
        raise BundleError(f"{root / MODEL_FILE}: graph inputs/outputs differ from {MANIFEST} "
                          f"(got {len(got_in)} inputs, {len(got_out)} outputs)")
    m = manifest
    kv = {1: ("num_kv_heads", m["num_kv_heads"]), 3: ("head_dim", m["head_dim"])}
    for value in (*got_in, *got_out):
        want = (kv if value.name.startswith(("past_key_values.", "present.")) else
                {2: ("hidden_size", m["hidden_size"])} if value.name == "inputs_embeds" else
                {2: ("vocab_size", m["vocab_size"])} if value.name == "logits" else {})
        for axis, (key, size) in want.items():
            got = value.shape[axis] if len(value.shape) > axis else None
            if got != size:
                raise BundleError(f"{root / MODEL_FILE}: graph {value.name!r} has size {got!r} "
                                  f"on axis {axis} but {MANIFEST} says {key}={size}")


@dataclass
class Bundle:
    """An exported model ready to run under ONNX Runtime.

    manifest: the parsed ``bundle.json``.
    session: the ``onnxruntime.InferenceSession`` over ``model.onnx``, or an
        ``OpenVinoSession`` (``compute_dtype="bfloat16"`` on CPU, ``export/ov_session.py``).
    embeddings: ``[V, E]`` float32 table, read-only: memory-mapped ``embeddings.npy``, or a
        ``Q8Table`` (rows dequantised on indexing).
    tokenizer: a ``tokenizers.Tokenizer`` from ``tokenizer.json``.
    """

    path: Path
    manifest: dict
    session: ort.InferenceSession | OpenVinoSession
    embeddings: np.ndarray | Q8Table
    tokenizer: Tokenizer | None
    input_names: list[str] = field(init=False)
    output_names: list[str] = field(init=False)

    def __post_init__(self):
        m = self.manifest
        self.num_layers = int(m["num_layers"])
        self.num_heads = int(m["num_heads"])
        self.num_kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.hidden_size = int(m["hidden_size"])
        self.vocab_size = int(m["vocab_size"])
        self.max_position_embeddings = m.get("max_position_embeddings")
        self.fingerprint = m.get("fingerprint")
        self.model_type = m["model_type"]
        self.dtype = m["dtype"]
        # the dtype the graph computes in: the manifest's, or bfloat16 under OpenVINO
        self.compute_dtype = getattr(self.session, "dtype", None) or self.dtype
        self.np_dtype = np.dtype(NP_DTYPES[self.dtype])
        self.eos_token_ids = [int(i) for i in m.get("eos_token_ids") or []]
        self.bos_token_id = m.get("bos_token_id")
        self.input_names = list(m["input_names"])
        self.output_names = list(m["output_names"])
        self.use_io_binding = "CUDAExecutionProvider" in self.session.get_providers()

    # ------------------------------------------------------------------------- helpers
    def embed(self, token_ids) -> np.ndarray:
        """Token ids ``[..., L]`` -> embeddings ``[..., L, E]`` in the bundle's dtype."""
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)],
                          dtype=self.np_dtype)

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer (key, value) of past length 0 ``[B, Hkv, 0, D]``: the prefix-only use."""
        z = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.np_dtype)
        return [(z, z) for _ in range(self.num_layers)]

    # ----------------------------------------------------------------------------- run
    def run(self, inputs_embeds, attention_mask, position_ids, past, logits_index,
            return_ortvalues: bool = False):
        """One forward pass of the graph.

        Args:
            inputs_embeds: ``[B, L, E]`` (cast to the bundle dtype).
            attention_mask: ``[B, T]`` with T = past + L, 1 for a real key, 0 for padding.
            position_ids: ``[B, L]``.
            past: N (key, value) pairs ``[B, Hkv, past, D]`` (``empty_past(B)`` for none);
                numpy arrays, or ``ort.OrtValue`` already on the device with CUDA.
            logits_index: ``[B, K]`` positions on L whose logits are returned.
            return_ortvalues: with the CUDA provider, return logits and presents as device
                ``OrtValue`` objects (no copy back to host), to be fed as the next past.

        Returns:
            ``(logits [B, K, V] float32, presents)`` with presents N (key, value) pairs
            ``[B, Hkv, T, D]``.
        """
        if len(past) != self.num_layers:
            raise ValueError(f"past has {len(past)} layers; the model has {self.num_layers}")
        feed = {"inputs_embeds": _as(inputs_embeds, self.np_dtype),
                "attention_mask": _as(attention_mask, np.int64),
                "position_ids": _as(position_ids, np.int64),
                "logits_index": _as(logits_index, np.int64)}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = _as(k, self.np_dtype)
            feed[f"past_key_values.{i}.value"] = _as(v, self.np_dtype)
        if self.use_io_binding:
            outs = self._run_cuda(feed, return_ortvalues)
        else:
            outs = self.session.run(self.output_names, feed)
        return outs[0], [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.num_layers)]

    def _run_cuda(self, feed: dict, return_ortvalues: bool) -> list:
        # IOBinding: host arrays are copied to the GPU once, device OrtValues (a previous
        # call's presents) are bound in place, and every output is allocated on the GPU, so a
        # cached prefix never makes a round trip through host memory between calls.
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs() if return_ortvalues else binding.copy_outputs_to_cpu()


def _as(x, dtype):
    if isinstance(x, ort.OrtValue):
        return x
    return np.ascontiguousarray(x, dtype=dtype)


def session_defaults() -> ort.SessionOptions:
    """ONNX Runtime session options for a bundle's sessions: ``session.force_spinning_stop``,
    so a session's thread pool stops spinning when its run ends. The onnx backend runs scores,
    prefills and decode steps on different sessions (the bundle's, its decode graph's, a 4-bit
    sibling's); a session run right after another's otherwise competes with that one's spinning
    threads for the cores (measured on 2 cores: a decode step 1.5-1.8x slower, a B=1 prefill
    41 -> 70 ms), while spinning within a run (between its ops) is kept."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def load_bundle(path, providers=None, verify: str = "fast",
                session_options: ort.SessionOptions | None = None,
                compute_dtype: str | None = None) -> Bundle:
    """Open an exported bundle directory.

    Args:
        path: the bundle directory (holding ``bundle.json``).
        providers: onnxruntime execution providers, e.g. ``["CUDAExecutionProvider",
            "CPUExecutionProvider"]``; default CPU. With CUDA, ``Bundle.run`` uses IOBinding.
        verify: ``"fast"`` checks every listed file's size and sha256, the weights included,
            but skips hashing files unchanged (path, size, mtime, ctime, inode) since they
            last passed, as recorded under ``$SOFTPROMPT_HOME/verified/``; ``"full"`` hashes
            every file every time.
        session_options: optional ``onnxruntime.SessionOptions`` (threads, logging); default
            ``session_defaults()``.
        compute_dtype: None (the bundle's own dtype, under onnxruntime) or ``"bfloat16"``: a
            float32 bundle's graph under OpenVINO in bfloat16 on the CPU's matrix units
            (``OpenVinoSession``; inputs and outputs stay float32).

    Raises:
        BundleError: a file missing or differing from ``bundle.json``, or a graph whose
            inputs/outputs differ from the manifest (one line naming the file).
    """
    root = Path(path)
    if verify not in VERIFY_MODES:
        raise BundleError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    manifest = read_manifest(root)
    validation = manifest.get("validation") or {}
    if validation.get("passed") is False:
        raise BundleError(f"{root / MANIFEST}: this export failed its validation "
                          f"({validation.get('error', 'see validation')}); re-export it")
    check_files(root, manifest, verify)
    n = int(manifest["num_layers"])
    if manifest["input_names"] != input_names(n) or manifest["output_names"] != output_names(n):
        raise BundleError(f"{root / MANIFEST}: input/output names do not follow the "
                          f"{n}-layer contract")
    if compute_dtype not in (None, manifest["dtype"], "bfloat16"):
        raise BundleError(f"compute_dtype={compute_dtype!r} for a {manifest['dtype']} bundle; "
                          "expected None or 'bfloat16'")
    if compute_dtype == "bfloat16":
        if manifest["dtype"] != "float32" or providers:
            raise BundleError(f"{root}: bfloat16 runs a float32 bundle under OpenVINO on the CPU "
                              f"(got a {manifest['dtype']} bundle, providers {providers})")
        if (validation.get("bfloat16") or {}).get("passed") is False:
            raise BundleError(f"{root / MANIFEST}: this graph failed its bfloat16 validation under "
                              f"OpenVINO ({validation['bfloat16'].get('error')}); serve it in float32")
        if manifest.get("quantization"):
            raise BundleError(f"{root}: bfloat16 runs a float32 bundle's graph; this one has "
                              f"{manifest['quantization']} weights")
    providers = providers or ["CPUExecutionProvider"]
    session: ort.InferenceSession | OpenVinoSession
    try:
        session = OpenVinoSession(root / MODEL_FILE, "bfloat16") if compute_dtype == "bfloat16" \
            else ort.InferenceSession(str(root / MODEL_FILE), providers=providers,
                                       sess_options=session_options or session_defaults())
    except BundleError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"{root / MODEL_FILE}: onnxruntime cannot load it "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    check_graph(root, manifest, session)
    embeddings = load_table(root, manifest)
    tok_file = root / TOKENIZER_FILE
    try:
        tokenizer = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
    except Exception as e:  # tokenizers raises its own exception type
        raise BundleError(f"{tok_file}: tokenizers cannot load it ({str(e)[:100]})") from None
    return Bundle(path=root, manifest=manifest, session=session, embeddings=embeddings,
                  tokenizer=tokenizer)
