"""The ``softprompt`` command line: building its parser (``softprompt --help``) imports no model
code, and the verbs whose parsers are imported only to run them are listed as they define
themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# ------------------------------------------------------------------- prompts of every kind
def test_prompt_specs_parse_into_parts(tmp_path):
    """NAME=PART, a repeated NAME composes in command-line order, text:TEXT reads \\n, \\t and
    \\\\, PATH#T picks a multitask task (unless PATH#T itself exists)."""
    P = cli.PromptPart
    (tmp_path / "odd#3").mkdir()
    specs = ["qa=adapters/squad", r"qa=text:Answer briefly.\n", "mt=adapters/multi#2",
             "qa=adapters/cart", r"t=text:a=b\tc\\n+d", f"odd={tmp_path / 'odd#3'}", "hub=owner/repo@v1"]
    assert cli.parse_prompt_specs(specs) == {
        "qa": [P(source="adapters/squad"), P(text="Answer briefly.\n"), P(source="adapters/cart")],
        "mt": [P(source="adapters/multi", task=2)],
        "t": [P(text="a=b\tc\\n+d")],
        "odd": [P(source=str(tmp_path / "odd#3"))],
        "hub": [P(source="owner/repo@v1")],
    }
    for bad, msg in (("qa", "expects NAME=PART"), ("=x", "expects NAME=PART"), ("qa=", "expects NAME=PART"),
                     ("qa=text:", "empty text part")):
        with pytest.raises(SystemExit, match=msg):
            cli.parse_prompt_specs([bad])


def test_prompt_syntax_is_in_the_help():
    for verb in ("score", "serve", "generate", "info"):
        sub = next(a for a in cli.build_parser()._actions if a.dest == "verb").choices[verb]
        text = sub.format_help()
        assert "NAME=PART" in text and "text:TEXT" in text and "PATH#T" in text and "Repeating a" in text
    ev = next(a for a in cli.build_parser()._actions if a.dest == "verb").choices["eval"]
    assert "--prompt PART" in ev.format_help()


@pytest.fixture(scope="module")
def kinds(tiny_dirs, tmp_path_factory):
    """Adapters of three kinds for the tiny llama: prompt tuning, prefix tuning (random K/V of
    its geometry), and a PEFT multitask adapter of 3 tasks."""
    import numpy as np
    import peft_kinds as pk

    from softprompt.runtime.prompt_kinds import KVPrompt
    from softprompt.runtime.prompts import SoftPrompt

    root = tmp_path_factory.mktemp("kinds")
    model = str(tiny_dirs["llama"])
    SoftPrompt.random(4, 64, seed=1, std=0.3).save_peft(root / "soft", model)
    rng = np.random.default_rng(2)
    KVPrompt(rng.standard_normal((2, 2, 3, 16), dtype=np.float32),
             rng.standard_normal((2, 2, 3, 16), dtype=np.float32)).save_peft(root / "prefix", model)
    pk.train_adapter(model, "multitask", root / "multi", steps=1, num_tasks=3)
    return root


def test_prompt_sources_build_the_parts_add_prompt_takes(kinds, tiny_dirs):
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.prompt_kinds import ComposedPrompt, KVPrompt
    from softprompt.runtime.prompts import SoftPrompt

    soft, prefix, multi = (str(kinds / n) for n in ("soft", "prefix", "multi"))
    src = cli.prompt_sources([f"qa={soft}", r"qa=text:the movie was\n", f"qa={multi}#1",
                              f"qa={prefix}", f"pt={prefix}", f"mt={multi}", f"one={multi}#2",
                              "sys=text:hello world"])
    qa = src["qa"]
    assert [type(p) for p in qa] == [SoftPrompt, str, SoftPrompt, KVPrompt]
    assert qa[1] == "the movie was\n" and qa[2].name == "multi/1" and qa[2].metadata["task"] == 1
    assert src["pt"] == prefix and src["mt"] == multi  # lone sources: the runtime loads them
    assert isinstance(src["one"], SoftPrompt) and src["one"].name == "one"
    assert src["one"].metadata["task"] == 2
    assert src["sys"] == ["hello world"]
    with pytest.raises(SystemExit, match=r"--prompt x: .* is a multitask adapter; pick one task as .*#T"):
        cli.prompt_sources([f"x={multi}", "x=text:hi"])
    with pytest.raises(SystemExit, match=r"--prompt y: soft prompt source not found"):
        cli.prompt_sources(["y=/nonexistent/prompt.npy", "y=text:hi"])

    rt = Runtime.load(str(tiny_dirs["llama"]), backend="reference")
    for name, source in src.items():
        rt.add_prompt(name, source)
    assert sorted(rt.prompts) == ["mt/0", "mt/1", "mt/2", "one", "pt", "qa", "sys"]
    composed = rt.prompts["qa"]
    assert isinstance(composed, ComposedPrompt) and not composed.scores_first
    assert [d.get("kind", "text") for d in composed.describe()] == \
        ["prompt_tuning", "text", "multitask_prompt_tuning", "prefix_tuning"]
    assert composed.num_virtual_tokens == 4 + 3 + 6 + 3  # the text is 3 words
    r = rt.score([{"prompt": "qa", "context": "the film", "continuation": " was good"}])[0]
    assert r.error is None and np.isfinite(r.logprob)


def test_info_lists_prompts_with_kind_p_parts_and_geometry(kinds, tiny_dirs, capsys):
    soft, prefix, multi = (str(kinds / n) for n in ("soft", "prefix", "multi"))
    model = str(tiny_dirs["llama"])
    assert cli.main(["info", model, "--prompt", f"pt={prefix}", "--prompt", f"mt={multi}",
                     "--prompt", f"qa={soft}", "--prompt", r"qa=text:the movie was\n",
                     "--prompt", f"qa={prefix}"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("\nprompts\n"):].splitlines()[2:]
    assert lines == [
        "  pt: prefix_tuning, P=3, K/V 2 layers x 2 K/V heads x head size 16, predicts the first "
        "token: no (ends in K/V)",
        f"    fits {model}",
        *[ln for t in range(3) for ln in (f"  mt/{t}: multitask_prompt_tuning, P=6, E=64, predicts "
                                          "the first token: yes", f"    fits {model}")],
        "  qa: composed, P=10, predicts the first token: no (ends in K/V)",
        "    part 0: prompt_tuning 'soft', P=4, E=64",
        "    part 1: text 'the movie was\\n' (3 tokens)",
        "    part 2: prefix_tuning 'prefix', P=3, K/V 2 layers x 2 K/V heads x head size 16",
        f"    fits {model}",
    ]
    gpt2 = str(tiny_dirs["gpt2"])  # 4 K/V heads: the llama's prefix does not fit
    assert cli.main(["info", gpt2, "--prompt", f"pt={prefix}"]) == 0
    assert f"does not fit {gpt2}: K/V prompt 'pt' has 2 layers x 2 K/V heads x head size 16 but " \
           "the model has 2 x 4 x 16" in capsys.readouterr().out


def test_eval_and_ray_take_the_same_parts(kinds, monkeypatch):
    import softprompt.lm_eval as sp_lm_eval
    from softprompt.runtime.prompts import SoftPrompt

    seen = {}

    def fake_evaluate(model, prompt, tasks, **kw):
        seen["prompt"] = prompt
        return {"results": {}}

    monkeypatch.setattr(sp_lm_eval, "evaluate", fake_evaluate)
    monkeypatch.setattr("lm_eval.utils.make_table", lambda r: "")
    soft, prefix, multi = (str(kinds / n) for n in ("soft", "prefix", "multi"))
    cli.main(["eval", "m", "--tasks", "t", "--prompt", prefix])
    assert seen["prompt"] == prefix
    cli.main(["eval", "m", "--tasks", "t", "--prompt", soft, "--prompt", "text:Answer:"])
    assert isinstance(seen["prompt"][0], SoftPrompt) and seen["prompt"][1] == "Answer:"
    cli.main(["eval", "m", "--tasks", "t", "--prompt", f"{multi}#0"])
    assert isinstance(seen["prompt"], SoftPrompt) and seen["prompt"].metadata["task"] == 0
    with pytest.raises(SystemExit, match="is a multitask adapter; evaluate one task"):
        cli.main(["eval", "m", "--tasks", "t", "--prompt", multi])

    # score --ray hands the actors the same sources; the job's identity covers each of them
    from softprompt.ray import prompt_identity

    ray = cli.prompt_sources([f"pt={prefix}", f"mt={multi}", f"qa={soft}", "qa=text:hi"])
    assert ray["pt"] == prefix and ray["mt"] == multi and ray["qa"][1] == "hi"
    ids = {n: prompt_identity(s) for n, s in ray.items()}
    assert len(set(ids.values())) == 3 and ids["mt"].count(",") == 2  # one digest per task
    assert prompt_identity([ray["qa"][0], "hi!"]) != ids["qa"]


def test_info_names_the_matrix_units(capsys):
    from softprompt.machine import cpu_model, matrix_units

    assert matrix_units(frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})) == \
        "avx2 avx512f amx_tile amx_bf16; AMX bf16"
    assert matrix_units(frozenset({"sse2"})).endswith("; no AMX")
    cli.main(["info"])
    assert f"{cpu_model()}: {matrix_units()}\n" in capsys.readouterr().out  # the path: test_cpu_bf16
