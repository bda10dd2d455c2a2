"""The bundle a model is served from, exported once per content and dtype and then reused.

``bundle_for(model)`` is what ``Runtime.load(model, backend="onnx")`` serves for a model that
is not itself a bundle: the directory ``$SOFTPROMPT_HOME/bundles/<content key>-<dtype>``,
exported there on first use. The key is ``softprompt.models.content_key`` of the model's
directory (its config, tensors and tokenizer files, not its path), so the same weights reached
another way (a hub id, a copied directory, the GGUF again) reuse the bundle. Bundles written
before the key was by content (``<fingerprint>-<dtype>``) are adopted, not exported again: a
link under the content key points at them. Importing this module does not import torch (the
model is loaded, and the exporter imported, only when a bundle has to be written).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from softprompt.models import (DEFAULT_MODEL, LoadedModel, ModelError, content_key,
                               default_model_dir, directory_fingerprint, gguf_dir, load_model, model_dir,
                               read_json_object, softprompt_home)

_LEGACY_NAME = re.compile(r"[0-9a-f]{16}-(fp32|fp16)")


def _exists(p: Path) -> bool:
    return (p / "bundle.json").is_file()


def _manifest(p: Path) -> dict:
    """bundle.json of ``p``, or {} when it is missing or unreadable (load_bundle says why)."""
    try:
        return read_json_object(p / "bundle.json", 16 << 20, ValueError, "a manifest")
    except (OSError, ValueError):
        return {}


def _local_dir(source) -> Path | None:
    """The model directory a bundle's recorded ``source`` names, if it is here already (no
    conversion, no download): ``default`` converted, a converted ``.gguf``, a directory."""
    src = str(source or "")
    try:
        if src == DEFAULT_MODEL:
            path = default_model_dir(convert=False)
        elif src.endswith(".gguf"):
            path = gguf_dir(Path(src)) if Path(src).is_file() else None
        else:
            path = Path(src).expanduser()
        return path if path is not None and (path / "config.json").is_file() else None
    except (OSError, ModelError):
        return None


def _adopt(home: Path, key: str, dtype: str, src: Path | None) -> Path | None:
    """A bundle written before bundles were keyed by content, holding what ``src`` holds: the
    one under ``src``'s own fingerprint, else one whose recorded source has the same content
    key (checked against the fingerprint it was exported with); None if there is none."""
    if src is None or not home.is_dir():
        return None
    try:
        own = directory_fingerprint(src)
    except (OSError, ModelError, ValueError):
        own = None
    candidates = [home / f"{own[:16]}-{dtype}"] if own else []
    candidates += sorted(d for d in home.iterdir() if _LEGACY_NAME.fullmatch(d.name)
                         and d.name.endswith(f"-{dtype}") and d not in candidates)
    for d in candidates:
        if not (_exists(d) or _exists(d.with_name(d.name + "-int4"))):
            continue
        m = _manifest(d if _exists(d) else d.with_name(d.name + "-int4"))
        fp = m.get("fingerprint")
        if not isinstance(fp, str) or not d.name.startswith(fp[:16]):
            continue
        if fp == own:
            return d
        other = _local_dir(m.get("source"))
        try:
            if other is not None and content_key(other) == key and directory_fingerprint(other) == fp:
                return d
        except (OSError, ModelError, ValueError):
            continue
    return None


def _link(path: Path, legacy: Path) -> Path:
    """``path`` (and its ``-int4`` sibling) made links to ``legacy`` (and its sibling); the
    legacy directory itself where links cannot be made."""
    for suffix in ("", "-int4"):
        new, old = path.with_name(path.name + suffix), legacy.with_name(legacy.name + suffix)
        if _exists(old) and not new.exists():
            try:
                if new.is_symlink():  # dangling
                    new.unlink()
                new.symlink_to(old.name, target_is_directory=True)
            except OSError:
                return legacy
    return path


def bundle_for(model, dtype: str | None = None, out_dir=None, weights: str | None = None,
               create: bool = True) -> Path | None:
    """The bundle directory for a (non-bundle) model, exporting it once if needed.

    Bundles are kept under ``$SOFTPROMPT_HOME/bundles/<content key>-<dtype>`` (module
    docstring), so a model is exported once per content and dtype and reused by every later
    ``Runtime.load``, whatever path names it; its 4-bit bundle is the sibling
    ``<content key>-fp32-int4``, derived once from the float32 one
    (``softprompt.export.exporter.int4_bundle``).

    Args:
        model: what ``load_model`` takes (``"default"``, a model directory, a ``.gguf``, ...).
        dtype: ``"fp32"``/``"float32"`` or ``"fp16"``/``"float16"``; None: float32, and the
            4-bit bundle may be picked (below).
        out_dir: an explicit bundle directory (exported there once, with ``weights``).
        weights: ``"float"``, ``"int4"`` (written once if missing), or None: the pick. With
            neither ``dtype`` nor ``out_dir`` given (the CPU default), an existing 4-bit
            bundle is served when its ``bundle.json`` records both a score drift within the
            tolerance against the float32 bundle (``validation.scores.within_tolerance``: mean
            |delta log-prob| <= ``INT4_SCORE_ATOL``) and a faster scoring batch than the
            float32 graph on the machine that wrote it (``weights.request_ms``); else the
            float32 bundle. The pick never writes a 4-bit bundle itself.
        create: False: export nothing, return the bundle that would be used or None.
    """
    if weights not in (None, "float", "int4"):
        raise ValueError(f"weights={weights!r}; expected None, 'float' or 'int4'")
    pick = weights is None and dtype is None and out_dir is None
    dtype = {"float32": "fp32", "float16": "fp16", None: "fp32"}.get(dtype, dtype)
    if weights == "int4" and dtype != "fp32":
        raise ValueError(f"4-bit bundles are float32 graphs; got dtype={dtype!r}")
    loaded: list[LoadedModel] = []

    def lm() -> LoadedModel:  # the model itself, loaded only when a bundle is written
        if not loaded:
            loaded.append(load_model(model))
        return loaded[0]

    def write(path: Path, **kwargs) -> None:  # the torch-based exporter, imported when it runs
        from .exporter import export

        if path.is_symlink() and not path.exists():  # a link to a bundle since removed
            path.unlink()
        print(f"softprompt: exporting {lm().source} to {path} (one time, a few minutes) ...",
              file=sys.stderr, flush=True)
        export(lm(), path, **kwargs)

    if out_dir:  # an explicit directory: that bundle, exported once as asked
        path = Path(out_dir)
        if not _exists(path) and create:
            write(path, dtype=dtype, weights=weights or "float")
        return path if _exists(path) else None
    src = model.path if isinstance(model, LoadedModel) else model_dir(model)
    key = content_key(src) if src is not None else model.fingerprint
    home = softprompt_home() / "bundles"
    path = home / f"{key[:16]}-{dtype}"
    int4 = path.with_name(path.name + "-int4")
    if not (_exists(path) or _exists(int4)):
        legacy = _adopt(home, key, dtype, src)
        if legacy is not None:
            path = _link(path, legacy)
            int4 = path.with_name(path.name + "-int4")

    def better(p: Path) -> bool:  # recorded: within the score tolerance, and faster
        m = _manifest(p)
        scores = (m.get("validation") or {}).get("scores") or {}
        ms = (m.get("weights") or {}).get("request_ms") or {}
        return bool(scores.get("within_tolerance")) and ms.get("int4", 1e30) < ms.get("float32", 0)

    if weights == "int4" or (pick and _exists(int4) and better(int4)):
        if not _exists(int4) and create:
            from .exporter import int4_bundle

            if not _exists(path):
                write(path, dtype=dtype)
            source: LoadedModel | None = lm()
            m = _manifest(path)
            if isinstance(m.get("fingerprint"), str) and m["fingerprint"] != source.fingerprint:
                # the float bundle was exported from the same content reached another way: its
                # own source when it is here (the default model's GGUF blocks carry over
                # exactly), else this model under the fingerprint the bundle recorded
                source = None if _local_dir(m.get("source")) else \
                    dataclasses.replace(source, fingerprint=m["fingerprint"])
            int4_bundle(path, int4, model=source)
        return int4 if _exists(int4) else None
    if not _exists(path) and create:
        write(path, dtype=dtype)
    return path if _exists(path) else None
