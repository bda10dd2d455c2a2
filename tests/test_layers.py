"""Dependencies point one way: every import between the parts of ``softprompt`` follows LAYERS.

Serving loads (or builds once) the bundle it serves, so runtime sits above export; loading a
Hugging Face model, which both need, is its own part below them. The order, lowest first:

    tolerances, machine (leaf modules) ; kernels, models ; export ; runtime ;
    (the facade ``softprompt/__init__.py``) ; server, cli, jobs/scoring, ray, lm_eval, bench, train

Every module of the installed package is read (its source, parsed, not imported), and every
import in it is checked, those inside functions too: a part imports only parts of lower
layers; leaf modules import no part; the top layer's parts may import each other but not in a
cycle; no private name (``_x``) is imported from another part; nothing imports ``tests``.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = "softprompt"
FACADE = PKG  # softprompt/__init__.py: re-exports, never a source of an edge
LAYERS = [
    ["tolerances", "machine"],  # leaf modules: import no part
    ["kernels", "models"],
    ["export"],
    ["runtime"],
    [FACADE],
    ["server", "cli", "jobs", "scoring", "ray", "lm_eval", "bench", "train"],  # may import each other
]
LEAVES = {f"{PKG}.{p}" for p in LAYERS[0]}
RANK = {(p if p == FACADE else f"{PKG}.{p}"): i for i, layer in enumerate(LAYERS) for p in layer}
TOP = len(LAYERS) - 1
TESTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or the module a name is imported from)
    names: tuple[str, ...]  # names taken by ``from target import ...``
    file: str
    line: int

    def where(self) -> str:
        path = Path(self.file)
        if path.is_relative_to(TESTS_DIR.parent):  # a checkout: relative to its root
            path = path.relative_to(TESTS_DIR.parent)
        return f"{path}:{self.line}"


def _children(name: str, path: list[str]):
    """(module name, is package, source file) of every module under package ``name``, found
    with pkgutil from the package's directories, without importing anything."""
    for info in pkgutil.iter_modules(path):
        full = f"{name}.{info.name}"
        spec = info.module_finder.find_spec(full)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        yield full, info.ispkg, spec.origin
        if info.ispkg:
            yield from _children(full, list(spec.submodule_search_locations))


def modules() -> dict[str, tuple[bool, str]]:
    """{module name: (is package, source file)} of the installed ``softprompt``: the modules in
    its own folder and in every part the install maps to another folder (pyproject.toml's
    package-dir), found as the import system finds them."""
    root = importlib.util.find_spec(PKG)
    out = {PKG: (True, root.origin)}
    for full, ispkg, origin in _children(PKG, list(root.submodule_search_locations)):
        out[full] = (ispkg, origin)
    for part in RANK:
        if part in out or part == FACADE:
            continue
        spec = importlib.util.find_spec(part)  # a part mapped to a folder of its own
        if spec is None or spec.origin is None:
            continue
        out[part] = (spec.submodule_search_locations is not None, spec.origin)
        if spec.submodule_search_locations is not None:
            for full, ispkg, origin in _children(part, list(spec.submodule_search_locations)):
                out[full] = (ispkg, origin)
    return out


def _resolve(source: str, is_pkg: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = source.split(".") if is_pkg else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(mods: dict[str, tuple[bool, str]]) -> list[Import]:
    """Every import in every module (top level, in functions, under TYPE_CHECKING), relative
    ones resolved; ``from a import b`` names module ``a.b`` when that is a module; plus
    ``importlib.import_module("...")`` with a literal name."""
    found = []
    for source, (is_pkg, origin) in sorted(mods.items()):
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"), filename=origin)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(source, alias.name, (), origin, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(source, is_pkg, node.module, node.level)
                plain = []
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:  # a submodule, imported as a name
                        found.append(Import(source, f"{target}.{alias.name}", (), origin,
                                            node.lineno))
                    else:
                        plain.append(alias.name)
                if plain:
                    found.append(Import(source, target, tuple(plain), origin, node.lineno))
            elif isinstance(node, ast.Call) and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) \
                    and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                         or (isinstance(node.func, ast.Name)
                             and node.func.id in ("import_module", "__import__"))):
                found.append(Import(source, node.args[0].value, (), origin, node.lineno))
    return found


def part_of(module: str) -> str | None:
    """The part ``softprompt.<x>`` a module belongs to, FACADE for the root, None outside."""
    if module == PKG:
        return FACADE
    if not module.startswith(PKG + "."):
        return None
    return ".".join(module.split(".")[:2])


def _private(imp: Import) -> list[str]:
    """Private names and private module components (``_x``, not dunders) an import takes."""
    parts = imp.target.split(".")[2:] + list(imp.names)
    return [p for p in parts if p.startswith("_") and not p.startswith("__")]


def check(mods: dict[str, tuple[bool, str]]) -> list[str]:
    """Every violation, one line each: ``file:line: source imports target (why)``."""
    errors = []
    edges: dict[tuple[str, str], Import] = {}
    test_modules = {"tests"} | {p.stem for p in TESTS_DIR.glob("*.py")} | \
        {p.name for p in TESTS_DIR.iterdir() if (p / "__init__.py").is_file()}
    for imp in imports(mods):
        src = part_of(imp.source)
        if src == FACADE:
            continue  # the facade re-exports; it is no source of an edge
        what = f"{imp.where()}: {imp.source} imports {imp.target}"
        if imp.target.split(".")[0] in test_modules:
            errors.append(f"{what} (a module of tests/; nothing under {PKG} imports tests)")
            continue
        dst = part_of(imp.target)
        if dst is None or dst == src:
            continue
        for part in (src, dst):
            if part not in RANK:
                errors.append(f"{what} ({part} is in no layer of tests/test_layers.py LAYERS)")
        if src not in RANK or dst not in RANK:
            continue
        edge = f"{src.removeprefix(PKG + '.')} -> {dst.removeprefix(PKG + '.')}"
        if src in LEAVES:
            errors.append(f"{what} ({edge}: {src} is a leaf module and imports no part)")
        elif RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and RANK[src] != TOP):
            errors.append(f"{what} ({edge}: against the order, {dst} is not below {src})")
        else:
            edges.setdefault((src, dst), imp)
        if _private(imp):
            errors.append(f"{what} ({edge}: private name {', '.join(_private(imp))} of another part)")
    errors += _cycles(edges)
    return errors


def _cycles(edges: dict[tuple[str, str], Import]) -> list[str]:
    """One message per cycle between parts, naming an import of each edge."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(graph.get(node, [])):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                key = frozenset(zip(cycle, cycle[1:]))
                if key not in seen:
                    seen.add(key)
                    found.append("cycle between parts: " + "; ".join(
                        f"{edges[a, b].where()}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])))
            elif len(path) < len(graph) + 1:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


@pytest.fixture(scope="module")
def mods():
    return modules()


def test_every_part_is_found(mods):
    """The walk sees the installed package's parts (an empty walk would pass everything)."""
    parts = {part_of(m) for m in mods}
    assert {f"{PKG}.{p}" for p in ("runtime", "kernels", "models", "export", "bench",
                                  "machine", "cli", "server")} <= parts, sorted(parts)
    assert len(mods) > 30, sorted(mods)


def test_dependencies_point_one_way(mods):
    errors = check(mods)
    assert not errors, f"{len(errors)} import(s) against the layers:\n" + "\n".join(errors)


def test_checker_finds_what_it_should(tmp_path, monkeypatch):
    """The checker itself, on a small made-up package: an upward edge, a private name, a
    cycle in the top layer, a leaf importing, an import of tests, a relative import."""
    files = {
        "models/__init__.py": "from ..export import bundle_for\n",  # upward
        "export/__init__.py": "from softprompt.models import _hidden\n"  # private
                              "def f():\n    from .. import runtime\n",  # upward, in a function
        "runtime/__init__.py": "import softprompt.models\n",
        "cli.py": "from softprompt import ray\n",
        "ray.py": "from softprompt.cli import main\n",  # cycle cli <-> ray
        "machine.py": "import softprompt.models\n",  # leaf
        "bench/__init__.py": "import tolerances\n",  # tests/
    }
    mods = {PKG: (True, str(tmp_path / "__init__.py"))}
    (tmp_path / "__init__.py").write_text("from softprompt.runtime import x\n")  # facade: skipped
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        name = f"{PKG}.{rel.removesuffix('.py').removesuffix('/__init__').replace('/', '.')}"
        mods[name] = (rel.endswith("__init__.py"), str(path))
    errors = "\n".join(check(mods))
    assert "models/__init__.py:1: softprompt.models imports softprompt.export " \
           "(models -> export: against the order" in errors
    assert "private name _hidden" in errors
    assert "export/__init__.py:3: softprompt.export imports softprompt.runtime" in errors
    assert "cycle between parts" in errors and "softprompt.ray imports softprompt.cli" in errors
    assert "softprompt.machine is a leaf module" in errors
    assert "bench/__init__.py:1: softprompt.bench imports tolerances (a module of tests/" in errors
    assert "runtime/__init__.py" not in errors and f"{tmp_path}/__init__.py" not in errors


if __name__ == "__main__":  # print the violations: python tests/test_layers.py
    print("\n".join(check(modules())) or "no violations")
    sys.exit(0)
