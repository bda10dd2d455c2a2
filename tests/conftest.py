import os

import pytest
import torch

from tiny import FAMILIES, make_tiny_model

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter, and only if this is set
    # before their module is first imported (tests/test_kernels.py, the torch backend's
    # Triton path in tests/test_runtime.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{family: directory} of tiny random models, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_dirs, tmp_path_factory):
    """{family: bundle directory}: each tiny model exported to ONNX once per test session."""
    from softprompt.export import export

    root = tmp_path_factory.mktemp("bundles")
    return {f: export(d, root / f, progress=False) for f, d in tiny_dirs.items()}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_dir(request, tiny_dirs):
    return tiny_dirs[request.param]


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_dirs, tmp_path_factory):
    """The tiny Llama exported to an ONNX bundle once per session (batch-job and Ray tests)."""
    from softprompt.export import export

    return export(tiny_dirs["llama"], tmp_path_factory.mktemp("bundle") / "llama", progress=False)
