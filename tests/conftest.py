import pytest

from tiny import FAMILIES, make_tiny_model


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
