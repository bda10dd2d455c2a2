import os

import pytest

from tiny import FAMILIES, make_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{family: directory} of tiny random models, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_dir(request, tiny_dirs):
    return tiny_dirs[request.param]
