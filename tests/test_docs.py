"""The documentation stays true to the checkout: every ``*.py`` file that README.md and docs/*.md
name exists, the README stays short (details live in docs/), and the README's Python example
runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path relative to the repository root, e.g. runtime/api.py or softprompt/server/routes/health.py
PY_PATH = re.compile(r"(?<![\w./-])([A-Za-z_][\w./-]*\.py)\b")
EXAMPLE_MARKER = "<!-- example:"


def test_docs_exist():
    names = {p.name for p in DOCS}
    for page in ("index.md", "python-api.md", "server.md", "batch-jobs.md", "export.md",
                 "guarantees.md", "architecture.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_python_files_exist(doc):
    missing = sorted({m for m in PY_PATH.findall(doc.read_text(encoding="utf-8"))
                      if not (ROOT / m).is_file()})
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n < 150, f"README.md has {n} lines; move details into docs/ (limit 150)"


def readme_example() -> str:
    """The fenced Python block right after the README's example marker."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    at = text.find(EXAMPLE_MARKER)
    assert at >= 0, f"README.md has no {EXAMPLE_MARKER!r} marker before its Python example"
    m = re.compile(r"```python\n(.*?)\n```", re.S).search(text, at)
    assert m is not None, "no ```python block after the README's example marker"
    return m.group(1)


def test_readme_example_compiles():
    compile(readme_example(), "README.md example", "exec")


@pytest.mark.slow
def test_readme_example_runs(monkeypatch, capsys):
    """The README's example, run from the repository root (its prompt paths are relative), prints
    what it promises: the generate line a non-empty text (a probe found it printing "" when the
    first generated token was its stop string "\n"), the stream line the streamed text."""
    monkeypatch.chdir(ROOT)
    ns = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md example", "exec"), ns)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3, lines
    assert lines[0].strip(), f"the generate example printed {lines[0]!r}"
    assert lines[1].strip(), f"the stream example printed {lines[1]!r}"
    short, topic = ns["rt"].prompts["short"], ns["rt"].prompts["topic"]  # the composed prompt
    assert short.kind == "composed" and short.num_virtual_tokens > topic.num_virtual_tokens
