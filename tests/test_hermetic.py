"""The suite is hermetic and reproducible: it computes where conftest.py says on any machine,
writes its caches into a home of its own (never the user's $SOFTPROMPT_HOME), and draws the same
inputs in every process."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_session_computes_on_cpu_in_a_home_of_its_own(user_home):
    from softprompt.models import softprompt_home
    from softprompt.runtime.factory import default_device, default_dtype, resolve_backend

    assert os.environ["SOFTPROMPT_DEVICE"] == "cpu" and default_device() == "cpu"
    assert default_dtype(default_device()) == "float32" and resolve_backend("auto", "x") == "onnx"
    home = softprompt_home()
    assert home.resolve() != user_home.resolve() and home.name.startswith("softprompt-test-home-")


def test_softprompt_device_sets_the_default_device(monkeypatch):
    from softprompt.runtime import factory

    monkeypatch.setattr(factory, "cuda_available", lambda: True)
    monkeypatch.delenv("SOFTPROMPT_DEVICE")
    assert factory.default_device() == "cuda" and factory.resolve_backend("auto", "x") == "torch"
    assert factory.default_dtype("cuda:1") == "bfloat16"
    monkeypatch.setenv("SOFTPROMPT_DEVICE", "cpu")
    assert factory.default_device() == "cpu" and factory.resolve_backend("auto", "x") == "onnx"


def test_seeding_copies_only_about_the_users_artefacts(tmp_path):
    """seed_home links the user's converted default model and bundles, and copies only the memos
    and records about them; stale records of temporary directories stay behind."""
    import json

    from conftest import seed_home
    from softprompt.models.loading import DEFAULT_MODEL_NAME

    user = tmp_path / "user"
    (user / "models" / DEFAULT_MODEL_NAME).mkdir(parents=True)
    (user / "models" / DEFAULT_MODEL_NAME / "config.json").write_text("{}")
    (user / "bundles" / "abc-fp32").mkdir(parents=True)
    (user / "bundles" / "abc-fp32" / "bundle.json").write_text("{}")
    (user / "verified").mkdir()
    (user / "fingerprints").mkdir()
    bundle = str((user / "bundles" / "abc-fp32").resolve())
    (user / "verified" / "a.json").write_text(json.dumps({"bundle": bundle, "files": {}}))
    (user / "verified" / "stale.json").write_text(json.dumps({"bundle": "/tmp/pytest-1/x", "files": {}}))
    (user / "fingerprints" / "m.json").write_text(json.dumps(
        {"fingerprint": "f", "path": str((user / "models" / DEFAULT_MODEL_NAME).resolve())}))
    before = _listing(user)
    home = tmp_path / "home"
    seed_home(home, user)
    assert (home / "models" / DEFAULT_MODEL_NAME).is_symlink()
    assert (home / "bundles" / "abc-fp32").resolve() == Path(bundle)
    assert sorted(p.name for p in (home / "verified").iterdir()) == ["a.json"]
    assert sorted(p.name for p in (home / "fingerprints").iterdir()) == ["m.json"]
    assert _listing(user) == before


def _listing(root: Path) -> dict:
    """{relative path: (kind, size, mtime_ns)} of everything under root (symlinks not followed)."""
    if not root.exists():
        return {"": ("absent", 0, 0)}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def test_touch_the_cache(tiny_dirs):
    """Loads that write the runtime's caches (a fingerprint memo, an exported bundle, its
    verification record) write them into the session's home; run in a subprocess by the test
    below, against the user's home."""
    from softprompt.models import softprompt_home
    from softprompt.runtime.api import Runtime

    rt = Runtime.load(str(tiny_dirs["llama"]), backend="onnx")
    assert rt.score([{"prompt": None, "context": [5, 6, 7]}])[0].error is None
    rt.close()
    home = softprompt_home()
    assert any((home / "bundles").iterdir()) and any((home / "verified").iterdir())
    assert any((home / "fingerprints").iterdir())


@pytest.mark.parametrize("run", [1, 2])
def test_runs_leave_the_users_home_as_it_was(user_home, run):
    """A pytest run of cache-touching tests (this file's test_touch_the_cache and
    tests/test_cache.py), started with the user's home as $SOFTPROMPT_HOME, leaves every path,
    size and modification time under it as it was; twice, so a second run cannot differ."""
    before = _listing(user_home)
    env = dict(os.environ, SOFTPROMPT_HOME=str(user_home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_hermetic.py::test_touch_the_cache", "tests/test_cache.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = _listing(user_home)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"the run changed {len(changed)} paths under {user_home}: {changed[:10]}"


_INPUTS = """
import hashlib, json, sys
sys.path.insert(0, "tests")
import test_engine as t
work = {f"{f}/{b}": t._workload(seed=t._seed(f, b)) for f, b in
        [("llama", "reference"), ("llama", "torch"), ("gpt2", "torch-buckets"), ("qwen2", "onnx")]}
print(hashlib.sha256(json.dumps(work, sort_keys=True, default=str).encode()).hexdigest())
"""


def test_engine_inputs_are_the_same_in_every_process():
    """tests/test_engine.py's random workloads do not depend on PYTHONHASHSEED."""
    digests = set()
    for seed in ("0", "1", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _INPUTS], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_nothing_in_tests_or_bench_seeds_from_hash():
    """No call of the built-in ``hash()`` in tests/ or bench/: its value for a string changes from
    process to process, so nothing reproducible may be derived from it."""
    calls = []
    for path in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_cuda_tests_are_collected_and_skipped_with_the_reason_without_a_gpu():
    """With CUDA hidden, tests/test_cuda.py is collected and every test skipped, saying why."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_cuda.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " skipped" in out.stdout and " passed" not in out.stdout and " failed" not in out.stdout
    assert "needs a CUDA device" in out.stdout


def test_the_readme_types_no_test_count():
    """A typed count goes stale with the next test; the README says how to count them instead."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"\b\d+\s+tests\b", text)
    assert "pytest --co -q | tail -1" in text
