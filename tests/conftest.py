"""Suite-wide setup: where tests compute (devices.py), a home of their own, the tiny models.

- Device: CPU tests compute on CPU in float32 on any machine (``SOFTPROMPT_DEVICE=cpu``, the
  Triton kernels interpreted); tests marked ``cuda`` run only where a CUDA device is, and are
  collected and skipped with the reason elsewhere (tests/devices.py).
- Home: every session gets its own ``$SOFTPROMPT_HOME`` (a temporary directory, removed at the
  end), so fingerprint memos, bundle verification records and bundles made by the tests never
  land in the user's cache. It is seeded read-only from the user's home: the default model's
  converted directory and the exported bundles are symlinked (no test writes into them), and
  the small memos and records about them are copied, so the slow tests reuse what the user
  already built instead of converting and exporting again. tests/test_hermetic.py checks that a
  run leaves the user's home as it was.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from devices import HAS_CUDA, SKIP_REASON, triton_compiled
from tiny import FAMILIES, make_tiny_model

# The runtime's default device (runtime/factory.py) for every test and every process a test
# starts: CPU, float32, whatever the machine has. CUDA tests pass device="cuda" themselves.
os.environ["SOFTPROMPT_DEVICE"] = "cpu"
# Triton kernels on CPU tensors run under the interpreter, which must be chosen before the kernel
# bodies are first imported (tests/test_kernels.py, the torch backend's Triton path in
# tests/test_runtime.py); CUDA tests switch to the compiled kernels (devices.triton_compiled).
os.environ["TRITON_INTERPRET"] = "1"

# The user's cache, as the runtime would find it without the suite's own home.
USER_HOME = Path(os.environ.get("SOFTPROMPT_HOME") or Path.home() / ".cache" / "softprompt")
_session_home: Path | None = None


def seed_home(home: Path, user: Path) -> None:
    """Make ``home`` a test home that reuses the user's slow-to-build artefacts read-only: the
    converted default model and every exported bundle as symlinks, and copies of the fingerprint
    memos and verification records that describe them (keyed by their resolved paths, which the
    symlinks keep). Nothing is written under ``user``."""
    from softprompt.models.loading import DEFAULT_MODEL_NAME

    for sub in ("models", "bundles", "fingerprints", "verified"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    if not user.is_dir():
        return
    targets = []
    model = user / "models" / DEFAULT_MODEL_NAME
    if (model / "config.json").is_file():
        (home / "models" / DEFAULT_MODEL_NAME).symlink_to(model.resolve(), target_is_directory=True)
        targets.append(str(model.resolve()))
    if (user / "bundles").is_dir():
        for b in sorted((user / "bundles").iterdir()):
            if (b / "bundle.json").is_file():
                (home / "bundles" / b.name).symlink_to(b.resolve(), target_is_directory=True)
                targets.append(str(b.resolve()))
    for sub, key in (("fingerprints", "path"), ("verified", "bundle")):
        folder = user / sub
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                about = json.loads(f.read_text()).get(key, "")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(about, str) and about in targets:
                shutil.copyfile(f, home / sub / f.name)


def pytest_configure(config):
    global _session_home
    config.addinivalue_line("markers", "cuda: needs a CUDA device; `pytest -m cuda` runs only these "
                                       "(bench/gpu_check.sh does)")
    _session_home = Path(tempfile.mkdtemp(prefix="softprompt-test-home-"))
    seed_home(_session_home, USER_HOME)
    os.environ["SOFTPROMPT_HOME"] = str(_session_home)


def pytest_unconfigure(config):
    if _session_home is not None:
        shutil.rmtree(_session_home, ignore_errors=True)  # symlinks removed, never followed


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def user_home() -> Path:
    """The user's $SOFTPROMPT_HOME (or ~/.cache/softprompt), which tests must never write."""
    return USER_HOME


@pytest.fixture(scope="module")
def compiled_kernels():
    """The Triton kernels compiled for CUDA (not interpreted) for one module's tests."""
    with triton_compiled():
        yield


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
