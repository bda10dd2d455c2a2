"""The bundle a model is served from, exported once per content and dtype and then reused.

``bundle_for(model)`` is what ``Runtime.load(model, backend="onnx")`` serves for a model that
is not itself a bundle: the directory ``$SOFTPROMPT_HOME/bundles/<fingerprint>-<dtype>``,
exported there on first use. Importing this module does not import torch (the exporter is
imported only when a bundle has to be written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from softprompt.models import load_model, softprompt_home


def bundle_for(model, dtype: str | None = None, out_dir=None, weights: str | None = None,
               create: bool = True) -> Path | None:
    """The bundle directory for a (non-bundle) model, exporting it once if needed.

    Bundles are kept under ``$SOFTPROMPT_HOME/bundles/<fingerprint>-<dtype>``, so a model is
    exported once per content and dtype and reused by every later ``Runtime.load``; its 4-bit
    bundle is the sibling ``<fingerprint>-fp32-int4``, derived once from the float32 one
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
    lm = load_model(model)
    exists = lambda p: (p / "bundle.json").is_file()  # noqa: E731
    say = lambda what: print(f"softprompt: {what} (one time, a few minutes) ...",  # noqa: E731
                             file=sys.stderr, flush=True)

    def write(path: Path, **kwargs) -> None:  # the torch-based exporter, imported when it runs
        from .exporter import export

        say(f"exporting {lm.source} to {path}")
        export(lm, path, **kwargs)

    if out_dir:  # an explicit directory: that bundle, exported once as asked
        path = Path(out_dir)
        if not exists(path) and create:
            write(path, dtype=dtype, weights=weights or "float")
        return path if exists(path) else None
    path = softprompt_home() / "bundles" / f"{lm.fingerprint[:16]}-{dtype}"
    int4 = path.with_name(path.name + "-int4")

    def better(p: Path) -> bool:  # recorded: within the score tolerance, and faster
        m = json.loads((p / "bundle.json").read_text())
        scores = (m.get("validation") or {}).get("scores") or {}
        ms = (m.get("weights") or {}).get("request_ms") or {}
        return bool(scores.get("within_tolerance")) and ms.get("int4", 1e30) < ms.get("float32", 0)

    if weights == "int4" or (pick and exists(int4) and better(int4)):
        if not exists(int4) and create:
            from .exporter import int4_bundle

            if not exists(path):
                write(path, dtype=dtype)
            int4_bundle(path, int4, model=lm)
        return int4 if exists(int4) else None
    if not exists(path) and create:
        write(path, dtype=dtype)
    return path if exists(path) else None
