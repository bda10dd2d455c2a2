"""softprompt.export: freeze a causal LM into an ONNX bundle whose input is embeddings.

The soft prompt is a *graph input* (``inputs_embeds``), so one export serves any number of
prompts. A bundle is a directory a torch-free server can run with onnxruntime, numpy and
tokenizers alone (see ``bundle.py`` for its layout and the graph's contract).

``bundle_for(model)`` is the bundle a model is served from: exported once per content and
dtype under ``$SOFTPROMPT_HOME/bundles`` and reused after (``build.py``).

Importing this package never imports torch: ``export`` loads the torch-based exporter on
first call, and ``load_bundle`` / ``Bundle`` need only onnxruntime, numpy and tokenizers.
It builds on ``softprompt.models`` and imports nothing from ``softprompt.runtime``.
"""

from .build import bundle_for
from .bundle import Bundle, load_bundle
from .errors import BundleError, ExportValidationError


def export(*args, **kwargs):
    """Export a model to a bundle directory; see ``softprompt.export.exporter.export``."""
    from .exporter import export as _export

    return _export(*args, **kwargs)


__all__ = ["Bundle", "BundleError", "ExportValidationError", "bundle_for", "export", "load_bundle"]
