"""The lm-evaluation-harness model ``softprompt`` against lm-eval's own ``hf`` model with
``peft=`` on the same adapter (PEFT semantics, float32): log-likelihoods, ``is_greedy``,
empty contexts, rolling windows, generation; on a tiny model (fast) and, through
``lm_eval.simple_evaluate`` on a local task, on the default model (slow). Nothing is downloaded:
tasks and data are files written here, models are local directories, HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from softprompt.runtime.prompts import SoftPrompt  # noqa: E402
from tiny import HIDDEN  # noqa: E402
from tolerances import SCORE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROLLING_ATOL = 1e-3  # a text's summed log-likelihood over several windows
WORDS = ("the movie was really good and the food was great but the service was very bad . "
         "i love this film , you hate that phone ! it is not a good game , the team liked it . ")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_import_registers_softprompt_beside_the_builtin_models():
    code = ("import softprompt.lm_eval\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('softprompt').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SoftPromptLM", "HFLM"]


@pytest.fixture(scope="module")
def tiny_pair(tiny_dirs, tmp_path_factory):
    """(softprompt LM, lm-eval hf LM with peft=) on the tiny Llama and one prompt adapter."""
    from lm_eval.models.huggingface import HFLM

    from softprompt.lm_eval import SoftPromptLM

    adapter = SoftPrompt.random(4, HIDDEN, seed=5, std=0.5).save_peft(
        tmp_path_factory.mktemp("adapter") / "p")
    ours = SoftPromptLM(model=str(tiny_dirs["llama"]), prompt=str(adapter), backend="torch",
                        max_length=16)
    hf = HFLM(pretrained=str(tiny_dirs["llama"]), peft=str(adapter), device="cpu",
              dtype="float32", max_length=16, batch_size=4)
    return ours, hf


def test_loglikelihood_and_is_greedy_match_hf_peft(tiny_pair):
    ours, hf = tiny_pair
    assert ours.prefix_token_id == hf.prefix_token_id == 1  # the tokenizer's BOS "<s>"
    args = [("the movie was", " good"), ("i love this", " film , you hate that phone"),
            ("", " the food was great"),  # empty context: scored after the prefix token
            ("<s> it is", " not"),  # already starts with BOS
            (WORDS * 2, " . the"),  # longer than max_length: cut from the left
            ("the", " the the the")]
    a = ours.loglikelihood(_requests("loglikelihood", args))
    b = hf.loglikelihood(_requests("loglikelihood", args))
    torch.testing.assert_close(torch.tensor([x[0] for x in a]), torch.tensor([x[0] for x in b]),
                               **SCORE["float32"])
    assert [x[1] for x in a] == [x[1] for x in b]


def test_is_greedy_true_on_the_greedy_continuation(tiny_pair):
    ours, hf = tiny_pair
    greedy = ours.generate_until(_requests("generate_until", [
        ("the movie was", {"until": ["never"], "max_gen_toks": 3, "do_sample": False})]))[0]
    (logprob, is_greedy), = ours.loglikelihood(_requests("loglikelihood",
                                                         [("the movie was", " " + greedy)]))
    assert is_greedy and hf.loglikelihood(_requests("loglikelihood",
                                                    [("the movie was", " " + greedy)]))[0][1]


def test_rolling_windows_match_hf_peft(tiny_pair):
    ours, hf = tiny_pair
    texts = [WORDS * 2, WORDS[:40], "good"]  # 3+ windows, one window, one token
    assert len(ours.tok_encode(texts[0])) > 3 * ours.max_length
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    b = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=ROLLING_ATOL, rtol=0)


def _peft_greedy(hf, context: str, new_tokens: int, until: list[str]) -> str:
    """Greedy continuation by PEFT's forward over the whole sequence at every step (PEFT's
    own ``generate`` drifts from its forward after a few tokens on transformers 5: it drops
    the position ids, so it is not the reference here)."""
    ids = hf.tok_encode(context)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(hf.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == hf.eot_token_id:
                break
    text = hf.tok_decode(ids[len(hf.tok_encode(context)):])
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_generate_until_matches_the_peft_forward(tiny_pair):
    ours, hf = tiny_pair
    args = [("the movie was", {"until": ["."], "max_gen_toks": 6, "do_sample": False}),
            ("i love this film", {"until": "bad", "max_gen_toks": 4}),
            ("the movie was", {"until": ["election"], "max_gen_toks": 6})]
    got = ours.generate_until(_requests("generate_until", args))
    want = [_peft_greedy(hf, c, kw["max_gen_toks"], [kw["until"]] if isinstance(kw["until"], str)
                         else kw["until"]) for c, kw in args]
    assert got == want and got[2] == "that you "  # cut before the stop string


def test_unknown_model_args_are_refused(tiny_dirs):
    from softprompt.lm_eval import SoftPromptLM

    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        SoftPromptLM(model=str(tiny_dirs["llama"]), pretrained="x")


def test_eval_verb_runs_a_local_task(tiny_dirs, tmp_path):
    from softprompt.cli import main
    from softprompt.runtime.api import Runtime

    docs = [{"text": "the movie was good", "label": "positive"},
            {"text": "i hate that phone", "label": "negative"},
            {"text": "the service was very bad", "label": "negative"},
            {"text": "you love this film", "label": "positive"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}} :"
doc_to_choice: ['positive', 'negative']
doc_to_target: "{{{{['positive', 'negative'].index(label)}}}}"
metric_list:
  - metric: acc
""")
    adapter = SoftPrompt.random(4, HIDDEN, seed=5, std=0.5).save_peft(tmp_path / "adapter")
    assert main(["eval", str(tiny_dirs["llama"]), "--prompt", str(adapter), "--tasks", "tiny_mc",
                 "--include-path", str(tmp_path), "--backend", "torch",
                 "-o", str(tmp_path / "out.json")]) == 0
    acc = json.loads((tmp_path / "out.json").read_text())["results"]["tiny_mc"]["acc,none"]
    rt = Runtime.load(tiny_dirs["llama"], backend="torch")
    rt.add_prompt("p", adapter)
    picked = [r.label for r in rt.classify("p", [d["text"] + " :" for d in docs],
                                           [" positive", " negative"])]
    assert acc == sum(p.strip() == d["label"] for p, d in zip(picked, docs)) / len(docs)


# ----------------------------------------------------------------- the default model, end to end
def _write_tasks(root: Path) -> Path:
    """A multiple-choice task over the demo's held-out sentiment set and a rolling
    log-likelihood task over long texts made from it, as lm-eval task YAML + JSONL files."""
    from softprompt.runtime.demo import DEMO_DIR, TASKS

    task = TASKS["sentiment"]
    rows = [json.loads(x) for x in (DEMO_DIR / "sentiment_test.jsonl").read_text().splitlines()
            if x.strip()]
    (root / "sentiment_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = [{"text": " ".join(r["text"] for r in rows[i: i + 8])} for i in (0, 8, 16)]
    (root / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    choices = json.dumps(list(task.label_names))
    (root / "sentiment.yaml").write_text(f"""task: demo_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "sentiment_test.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: {json.dumps(task.template.replace("{text}", "{{text.strip()}}"))}
doc_to_choice: {choices}
doc_to_target: "{{{{{list(task.label_names)!r}.index(label)}}}}"
metric_list:
  - metric: acc
""")
    (root / "rolling.yaml").write_text(f"""task: demo_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "long.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    return root


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """lm_eval.simple_evaluate with ``softprompt`` and with ``hf`` + ``peft=`` on the demo
    sentiment adapter: {model: {task: [per-document filtered responses]}} and accuracies."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import softprompt.lm_eval  # noqa: F401
    from softprompt.models import default_model_dir

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(_write_tasks(tmp_path_factory.mktemp("tasks"))))
    adapter = REPO / "runtime" / "demo" / "prompts" / "sentiment"
    runs = {
        # multiple choice through the ONNX bundle (the CPU default); rolling windows of 48
        # tokens through the torch backend; hf + peft reads the converted directory offline
        "softprompt": [("demo_sentiment", f"model=default,prompt={adapter},backend=onnx"),
                       ("demo_rolling", f"model=default,prompt={adapter},backend=torch,"
                                        "max_length=48")],
        "hf": [("demo_sentiment", f"pretrained={default_model_dir()},peft={adapter},"
                                  "dtype=float32,device=cpu"),
               ("demo_rolling", f"pretrained={default_model_dir()},peft={adapter},"
                                "dtype=float32,device=cpu,max_length=48")],
    }
    out = {}
    try:
        for model, jobs in runs.items():
            for task, model_args in jobs:
                r = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task],
                                            task_manager=tasks, batch_size=8, log_samples=True)
                samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
                out[model, task] = ([s["filtered_resps"] for s in samples],
                                    r["results"][task])
    finally:
        mp.undo()
    return out


@pytest.mark.slow
def test_simple_evaluate_multiple_choice_matches_hf_peft(default_runs):
    ours, ours_res = default_runs["softprompt", "demo_sentiment"]
    hf, hf_res = default_runs["hf", "demo_sentiment"]
    assert len(ours) == len(hf) == 40
    flat = lambda docs: [pair for doc in docs for pair in doc]  # noqa: E731
    torch.testing.assert_close(torch.tensor([float(ll) for ll, _ in flat(ours)]),
                               torch.tensor([float(ll) for ll, _ in flat(hf)]), **SCORE["float32"])
    assert [bool(g) for _, g in flat(ours)] == [bool(g) for _, g in flat(hf)]
    assert ours_res["acc,none"] == hf_res["acc,none"] == 0.975  # README: 97.5% held out


@pytest.mark.slow
def test_simple_evaluate_rolling_matches_hf_peft(default_runs, tmp_path):
    from transformers import AutoTokenizer

    from softprompt.models import default_model_dir

    ours, _ = default_runs["softprompt", "demo_rolling"]
    hf, _ = default_runs["hf", "demo_rolling"]
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    texts = [json.loads(x)["text"] for x in
             (_write_tasks(tmp_path) / "long.jsonl").read_text().splitlines()]
    assert len(ours) == len(hf) == len(texts) == 3
    assert all(len(tok.encode(t)) > 2 * 48 for t in texts)  # three windows or more each
    torch.testing.assert_close(torch.tensor([float(x[0]) for x in ours]),
                               torch.tensor([float(x[0]) for x in hf]), atol=ROLLING_ATOL, rtol=0)
