"""Export a causal LM to a bundle (see ``bundle.py`` for the layout and graph contract).

``export()`` loads the model, traces ``ExportWrapper`` with ``torch.onnx.export(dynamo=True)``,
writes the bundle, and ends by running ONNX Runtime and PyTorch side by side on fresh
shapes for the three uses (prefix, request on a cached prefix, decode; ``validate.py``); any mismatch of
names, axes or values raises ExportValidationError. ``int4_bundle()`` derives the 4-bit bundle
of an exported float32 bundle with the same rewrite (``quantize.py``) and checks, without
tracing the model again.

Why the dynamo exporter: it is the supported path in torch >= 2.9 (the TorchScript exporter
is deprecated), it stores a tied embedding/lm_head weight once, and with named dynamic dims
it exports every supported family here. Its one limit that shapes the contract: a dim cannot
be declared as a sum of two others, so the mask length (``total_sequence``) is a dim of its
own and the present K/V axis is renamed to it after export.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from softprompt.machine import cpu_model
from softprompt.models import (LoadedModel, ModelError, check_architecture, eos_token_ids,
                               load_model)

from .bundle import (EMBEDDINGS_FILE, FORMAT_VERSION, MANIFEST, MODEL_FILE, WEIGHTS_FILE,
                     file_entry, input_names, load_bundle, output_names, read_manifest)
from .errors import ExportValidationError
from .validate import ROUNDED_DRIFT_RATIO, expected_axes, validate_bundle, validate_cpu_bf16
from .wrapper import ExportWrapper, ModelSpec

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
WEIGHTS = ("float", "int4")



# ------------------------------------------------------------------------------- export
def export(model, out_dir, dtype: str = "fp32", opset: int | None = None,
           optimize: bool = False, validate: bool = True,
           progress: bool = True, weights: str = "float") -> Path:
    """Export a causal LM to an ONNX bundle directory a torch-free server can run.

    Args:
        model: ``"default"`` (SmolLM2-135M-Instruct), a Hugging Face model directory or hub
            id, a ``.gguf`` file, or a ``LoadedModel``. Supported families: llama, gpt2,
            qwen2, gemma.
        out_dir: the bundle directory to write. The bundle is written aside and moved there
            only once validation has passed, replacing a bundle already there; a failed export
            leaves nothing behind (and an old bundle untouched). An existing non-empty
            directory that is not a bundle is refused.
        dtype: ``"fp32"`` (default) or ``"fp16"`` (for GPU execution providers; on CPU it
            runs but is not faster).
        opset: ONNX opset; default the exporter's.
        optimize: save the ORT-optimised graph (see bench/EXPORT_RESULTS.md for what it buys).
        validate: run ORT vs PyTorch on ``validate.VALIDATION_CASES`` for the three uses and raise
            ExportValidationError on any mismatch (figures go into ``bundle.json``).
        weights: ``"float"`` (the graph's dtype) or ``"int4"``: the linear layers become
            4-bit ``MatMulNBits`` blocks of 32 (fp32 only; see export/quantize.py), carried
            over exactly from a GGUF Q4_0/Q4_1 source, else round-to-nearest. The score drift
            against the float32 graph goes into ``bundle.json`` (``validation.scores``).
        progress: print step messages and a progress bar to stderr.

    Returns:
        The bundle directory.

    Raises:
        ModelError: unsupported architecture or unloadable model.
        ExportValidationError: the exported graph disagrees with PyTorch.
    """
    dtype_name = DTYPE_NAMES.get(str(dtype).removeprefix("torch."))
    if dtype_name is None:
        raise ValueError(f"dtype {dtype!r} is not supported; expected 'fp32' or 'fp16'")
    if weights not in WEIGHTS or (weights == "int4" and dtype_name != "float32"):
        raise ValueError(f"weights={weights!r} is not supported with dtype={dtype!r}; expected "
                         "'float', or 'int4' with dtype='fp32'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {MANIFEST}; "
                              "refusing to overwrite it")

    steps = ["load model", "trace and convert to ONNX", "write embeddings and tokenizer"]
    steps += ["optimize graph"] * optimize + ["validate ORT vs PyTorch"] * validate
    steps += ["4-bit weights and their check"] * (weights == "int4")
    bar = _Steps(steps, progress)
    t_start = time.perf_counter()

    bar.next()
    loaded = _resolve(model)
    check_architecture(loaded.model.config)
    model32 = loaded.model  # the float32 model is the reference every bundle is checked against
    if next(model32.parameters()).dtype != torch.float32:
        model32 = copy.deepcopy(model32).float()
    torch_model = model32 if dtype_name == "float32" else copy.deepcopy(model32).half()
    wrapper = ExportWrapper(torch_model)  # traced
    reference = wrapper if torch_model is model32 else ExportWrapper(model32)
    spec = wrapper.spec

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        params = sum(p.numel() for p in torch_model.parameters())
        bar.next(f"{params / 1e6:.0f}M parameters, about a minute per 100M on CPU")
        t0 = time.perf_counter()
        used_opset = _export_graph(wrapper, tmp / MODEL_FILE, opset)
        export_s = time.perf_counter() - t0

        bar.next()
        _write_embeddings(model32, tmp / EMBEDDINGS_FILE)
        if loaded.tokenizer is not None:  # a tokenizer-less bundle serves token ids only
            loaded.tokenizer.save_pretrained(str(tmp))  # the chat template: chat_template.jinja
            # a bundle is flat (every file listed and hashed); chat serves the default template
            shutil.rmtree(tmp / "additional_chat_templates", ignore_errors=True)
        if loaded.tokenizer is not None and not (tmp / "tokenizer.json").is_file():
            raise ModelError(f"the tokenizer of {loaded.source} has no fast version "
                             "(tokenizer.json); the torch-free bundle needs one")

        if optimize:
            bar.next()
            optimize_graph(tmp / MODEL_FILE)

        manifest = _manifest(loaded, spec, dtype_name, used_opset, tmp, optimized=optimize,
                             quantized=None)
        manifest["export_seconds"] = round(export_s, 1)
        _write_manifest(tmp, manifest)
        error = None
        if validate:
            bar.next()
            figures, error = _validate(reference, tmp)
            if error is None and dtype_name == "float32":  # bfloat16 on this CPU, where it has it
                figures["bfloat16"] = validate_cpu_bf16(reference, tmp)
            manifest["validation"] = figures
        if weights == "int4" and error is None:
            bar.next()
            manifest, error = _weights_int4(loaded, reference, tmp, manifest, validate)
        _commit(tmp, out_dir, manifest, error, "total_seconds", t_start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.close()
    if progress:
        size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
        print(f"softprompt export: wrote {out_dir} ({size:.0f} MiB) in "
              f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    return out_dir


def _commit(tmp: Path, out_dir: Path, manifest: dict, error: Exception | None, timer: str,
            t0: float) -> None:
    """Raise the validation ``error`` if there is one (the attempt in ``tmp`` is then removed
    by the caller and ``out_dir`` was never touched); else record the time under ``timer``,
    write the manifest and move the bundle into place."""
    if error is not None:
        raise error
    manifest[timer] = round(time.perf_counter() - t0, 1)
    _write_manifest(tmp, manifest)
    _move_into_place(tmp, out_dir)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Make the validated bundle ``tmp`` the directory ``out_dir`` (a sibling, so a rename):
    a bundle already there is moved aside first and deleted only once the new one is in
    place, so ``out_dir`` holds either the old bundle or the new one, never a part."""
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _validate(wrapper: ExportWrapper, root: Path, **kwargs) -> tuple[dict, Exception | None]:
    bundle = load_bundle(root)
    try:
        return validate_bundle(wrapper, bundle, **kwargs), None
    except ExportValidationError as e:
        return {"passed": False, "error": str(e)}, e
    finally:
        del bundle


def _resolve(model) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        raise TypeError("pass a model directory, 'default', a .gguf file or a LoadedModel "
                        "(a bare module has no tokenizer or fingerprint)")
    return load_model(model, dtype="float32")


def example_inputs(spec: ModelSpec, dtype: torch.dtype):
    """Trace inputs. Every dynamic size is >= 2 and distinct from the others, so torch.export
    neither specialises a dim to 0/1 nor unifies two dims that merely happen to be equal."""
    b, seq, past = 2, 5, 3  # total_sequence = 8
    g = torch.Generator().manual_seed(0)
    kv = lambda: torch.randn(b, spec.num_kv_heads, past, spec.head_dim, generator=g).to(dtype)
    return (torch.randn(b, seq, spec.hidden_size, generator=g).to(dtype),
            torch.ones(b, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(b, seq).contiguous(),
            [(kv(), kv()) for _ in range(spec.num_layers)],
            torch.tensor([[seq - 1, 0, 2, seq - 1]] * b))


def _export_graph(wrapper: ExportWrapper, path: Path, opset: int | None) -> int:
    import onnx
    from torch.export import Dim

    spec = wrapper.spec
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    total, num_logits = Dim("total_sequence"), Dim("num_logits")
    kv = {0: batch, 2: past}
    dynamic_shapes = {"inputs_embeds": {0: batch, 1: seq},
                      "attention_mask": {0: batch, 1: total},
                      "position_ids": {0: batch, 1: seq},
                      "past": [(kv, kv) for _ in range(spec.num_layers)],
                      "logits_index": {0: batch, 1: num_logits}}
    dtype = next(wrapper.parameters()).dtype
    with _quiet_exporter(), wrapper.grouped():  # GQA traced without repeated K/V
        program = torch.onnx.export(
            wrapper, example_inputs(spec, dtype), dynamic_shapes=dynamic_shapes, dynamo=True,
            input_names=input_names(spec.num_layers),
            output_names=output_names(spec.num_layers), opset_version=opset,
            external_data=True, verbose=False)
        program.save(str(path), external_data=True)
    # Name the axes of the contract. The exporter calls the present length
    # "past_sequence + sequence"; an axis that came out static means a dim was specialised.
    model = onnx.load(str(path), load_external_data=False)
    axes = expected_axes(spec)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        want = axes.get(value.name)
        if want is None or len(dims) != len(want):
            raise ExportValidationError(f"graph {value.name!r} has {len(dims)} axes; the "
                                        f"contract expects {want}")
        for d, w in zip(dims, want):
            if isinstance(w, str):
                if not d.dim_param:
                    raise ExportValidationError(f"graph {value.name!r} axis {w!r} was exported "
                                                f"as the static size {d.dim_value}")
                d.dim_param = w
            elif d.dim_value != w:
                raise ExportValidationError(f"graph {value.name!r} has axes "
                                            f"{_dims(dims)}; expected {want}")
    _check_weights_file(model, path)
    onnx.save(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _dims(dims) -> list:
    return [d.dim_param or d.dim_value for d in dims]


def _check_weights_file(model, path: Path) -> None:
    locations = {e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"}
    if locations - {WEIGHTS_FILE}:
        raise ExportValidationError(f"{path.name} stores weights in {sorted(locations)}; "
                                    f"expected {WEIGHTS_FILE}")


@contextmanager
def _quiet_exporter():
    # The exporter warns about torchvision ops and axis names it merges; none of it concerns
    # this graph, and the step messages say what is happening.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for cat in (UserWarning, FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", cat)
            yield
    finally:
        logger.setLevel(level)


def _write_embeddings(model: torch.nn.Module, path: Path) -> None:
    emb = model.get_input_embeddings()
    rows = int(emb.weight.shape[0])
    with torch.no_grad():  # the module itself, so Gemma's sqrt(E) scaling is included
        table = emb(torch.arange(rows, device=emb.weight.device)).float().cpu().numpy()
    np.save(path, np.ascontiguousarray(table, dtype=np.float32), allow_pickle=False)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    try:
        own = importlib.metadata.version("softprompt-runtime")
    except importlib.metadata.PackageNotFoundError:
        own = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "softprompt": own}


def _manifest(loaded: LoadedModel, spec: ModelSpec, dtype_name: str, opset: int, root: Path,
              optimized: bool, quantized: str | None) -> dict:
    cfg = loaded.model.config
    gen = getattr(loaded.model, "generation_config", None)
    eos = eos_token_ids(loaded.model)
    bos = getattr(gen, "bos_token_id", None)
    bos = bos if bos is not None else getattr(cfg, "bos_token_id", None)
    n = spec.num_layers
    files = {}
    for f in sorted(root.iterdir()):
        if f.name != MANIFEST:
            files[f.name] = file_entry(f, weights=f.name == WEIGHTS_FILE)
    return {
        "format_version": FORMAT_VERSION,
        **asdict(spec),
        "dtype": dtype_name,
        "quantization": quantized,
        "optimized": optimized,
        "opset": opset,
        "input_names": input_names(n),
        "output_names": output_names(n),
        "axes": expected_axes(spec),
        "fingerprint": loaded.fingerprint,
        "source": str(loaded.source),
        "eos_token_ids": eos,
        "bos_token_id": None if bos is None else int(bos),
        "versions": _versions(),
        "files": files,
        "validation": None,
    }


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# ------------------------------------------------------------------- speed options
def optimize_graph(path: Path) -> None:
    """Rewrite ``path`` as ONNX Runtime's offline-optimised graph (basic + extended fusions,
    hardware-independent, so the file runs on CPU and GPU providers)."""
    import onnxruntime as ort

    out = path.with_name("optimized.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                  "optimized.onnx.data")
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    _replace_graph(path, out)


def _weights_int4(loaded: LoadedModel, reference: ExportWrapper, root: Path, manifest: dict,
                  validate: bool) -> tuple[dict, Exception | None]:
    """Rewrite the (validated) float32 graph in ``root`` to 4-bit weights and check it.

    A graph whose 4-bit weights all came exactly from GGUF blocks computes the float graph's
    function, so it is held to the float32 check itself (VALIDATION_ATOL, elementwise);
    round-to-nearest weights change the function, so the check is ROUNDED_DRIFT_RATIO's bound on
    log-prob drift relative to a graph with constant logits. Either way the score drift against
    the float32 graph on the same requests is recorded (``validation.scores``;
    ``quantize.INT4_SCORE_ATOL``), and so is the time of one scoring batch through each graph on
    this machine (``weights.request_ms``).
    """
    from . import quantize as q

    bundle = load_bundle(root)
    requests = q.drift_requests(bundle)
    want = q.request_logprobs(bundle, requests)
    float_ms = q.request_ms(bundle)
    del bundle
    report = q.quantize_int4(root / MODEL_FILE, gguf=q.gguf_file(loaded.source))
    files = {f.name: file_entry(f, weights=f.name == WEIGHTS_FILE) for f in sorted(root.iterdir())
             if f.name != MANIFEST}
    float_figures = manifest.get("validation")
    manifest = {**manifest, "quantization": "int4", "weights": report, "files": files,
                "validation": None}
    if report["vocab"].startswith("q8_0"):
        manifest["embeddings"] = "q8_0"  # the table is held once, as the graph's Q8_0 blocks
    _write_manifest(root, manifest)
    figures, error = {}, None
    if validate:
        exact = report["rtn"] == 0 and report["accuracy_level"] in (0, 1)
        figures, error = _validate(reference, root,
                                   **({} if exact else {"drift_ratio": ROUNDED_DRIFT_RATIO}))
    bundle = load_bundle(root)
    scores = q.score_drift(q.request_logprobs(bundle, requests), want)
    report["request_ms"] = {"float32": float_ms, "int4": q.request_ms(bundle), "B": 8, "L": 32,
                            "P": 20, "device": cpu_model()}  # one scoring batch, best of 5
    del bundle
    manifest["validation"] = {**figures, "scores": scores, "float_graph": float_figures}
    return manifest, error


def int4_bundle(float_bundle, out_dir, model=None, validate: bool = True,
                progress: bool = True) -> Path:
    """Write the 4-bit bundle of an exported float32 bundle, without tracing the model again.

    The float32 bundle (already validated against PyTorch) is copied aside, its graph rewritten
    by ``quantize.quantize_int4`` and checked like ``export(weights="int4")`` does, then moved
    to ``out_dir``. model: the source model (default: the one the float bundle names); it is
    the PyTorch reference of the check and, through ``quantize.gguf_file``, the source of exact
    blocks.
    """
    src, out_dir = Path(float_bundle), Path(out_dir)
    manifest = read_manifest(src)
    if manifest["dtype"] != "float32" or manifest.get("quantization"):
        raise ValueError(f"{src} is a {manifest['dtype']} bundle with quantization "
                         f"{manifest.get('quantization')!r}; expected a plain float32 bundle")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {MANIFEST}; "
                              "refusing to overwrite it")
    t0 = time.perf_counter()
    loaded = load_model(manifest["source"] if model is None else model, dtype="float32")
    if loaded.fingerprint != manifest["fingerprint"]:
        raise ValueError(f"{src} was exported from another model (fingerprint "
                         f"{manifest['fingerprint'][:16]}, this model {loaded.fingerprint[:16]})")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        if progress:
            print(f"softprompt: writing the 4-bit bundle of {src} to {out_dir} ...",
                  file=sys.stderr, flush=True)
        manifest, error = _weights_int4(loaded, ExportWrapper(loaded.model), tmp, manifest,
                                        validate)
        _commit(tmp, out_dir, manifest, error, "int4_seconds", t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_graph(path: Path, new: Path) -> None:
    """Make graph ``new`` (with its external data) the bundle's ``model.onnx`` + ``.data``."""
    import onnx

    model = onnx.load(str(new))  # every weight in memory, then one fresh data file
    for f in list(path.parent.glob("*.onnx")) + list(path.parent.glob("*.onnx.data")):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=WEIGHTS_FILE, size_threshold=1024)
    (path.parent / WEIGHTS_FILE).chmod(path.stat().st_mode)  # onnx creates it 0600


# --------------------------------------------------------------------------- validation
class _Steps:
    """Step messages and a tqdm bar on stderr (export takes about a minute per 100M params)."""

    def __init__(self, steps: list[str], enabled: bool):
        self.steps, self.i, self.enabled = steps, 0, enabled
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(steps), desc="softprompt export", file=sys.stderr,
                            bar_format="{desc}: {n}/{total} steps |{bar}| {elapsed}")

    def next(self, note: str = "") -> None:
        if not self.enabled:
            return
        if self.i:
            self.bar.update(1)
        name = self.steps[self.i]
        self.i += 1
        self.bar.set_description_str(f"softprompt export [{name}{': ' + note if note else ''}]")

    def close(self) -> None:
        if self.bar is not None:
            if self.i and self.bar.n < self.i:
                self.bar.update(1)
            self.bar.close()
