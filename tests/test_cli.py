"""The ``softprompt`` command line: building its parser (``softprompt --help``) imports no model
code, and the verbs whose parsers are imported only to run them are listed as they define
themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "HF_HUB_OFFLINE": "1"}
HEAVY = ("torch", "onnxruntime", "softprompt.bench")

CHECK = """
import contextlib, io, json, sys
import softprompt.cli as cli
cli.build_parser()
for argv in (["--help"], ["score", "--help"], ["serve", "--help"], ["eval", "--help"],
             ["train", "--help"], ["inspect", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main(argv)
heavy = sorted(m for m in sys.modules
               if any(m == h or m.startswith(h + ".") for h in {heavy!r}))
print(json.dumps(heavy))
"""


def test_help_imports_no_torch_onnxruntime_or_bench():
    res = subprocess.run([sys.executable, "-c", CHECK.format(heavy=HEAVY)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def _listing(parser) -> dict[str, str]:
    sub = next(a for a in parser._actions if a.dest == "verb")
    return {a.dest: a.help for a in sub._choices_actions}


def test_help_lists_every_verb():
    assert list(_listing(cli.build_parser())) == ["info", "demo", "score", "generate", "serve",
                                                  "export", "bench", "train", "inspect", "eval"]


@pytest.mark.parametrize("verb", sorted(cli.LAZY_VERBS))
def test_a_lazy_verb_is_listed_with_its_own_help_and_parsed_by_its_own_parser(verb):
    """The help line listed without importing the verb's module is the one its parser gives;
    running the verb builds that parser (its options parse)."""
    real = cli.build_parser(verb)
    assert _listing(real)[verb] == _listing(cli.build_parser())[verb] == cli.LAZY_VERBS[verb][1]
    argv = {"export": ["export", "m", "out", "--dtype", "fp16"], "bench": ["bench", "--quick"],
            "train": ["train", "--data", "d.jsonl", "--out", "o", "--labels"],
            "inspect": ["inspect", "p", "--json"]}
    args = real.parse_args(argv[verb])
    assert args.verb == verb and callable(args.func)
    with pytest.raises(SystemExit):  # the listing alone takes no options
        cli.build_parser().parse_args(argv[verb])
