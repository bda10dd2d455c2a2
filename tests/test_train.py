"""``softprompt train``: PEFT prompt learning through transformers' Trainer, evaluated on the runtime.

On the tiny Llama (tests/tiny.py), for prompt tuning and prefix tuning (a K/V prompt): a few
steps of training; the held-out figures it reports equal ``rt.classify`` / ``rt.score`` on the
saved adapter; PEFT loads the adapter and its forward gives the runtime's scores; a run SIGKILLed
mid-epoch and resumed ends with the same adapter, bit for bit, as an uninterrupted one, and so
does a run of every other type stopped mid-epoch (P-tuning's encoder and the prefix projection
restored from the checkpoint), the adapter written being the best epoch's; the result is
uploaded to a real ``softprompt serve`` and a watched directory is picked up. On the default
model (slow): a short run of the demo task, both types.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tolerances import SCORE

from softprompt.train import TrainConfig, TrainError, train

# Third-party deprecations PEFT 0.21.2 trips on transformers 5.24 (tests/peft_kinds.py's docstring).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`past_key_values` is deprecated:FutureWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)

ROOT = Path(__file__).resolve().parent.parent
TOL = SCORE["float32"]["atol"]
POS, NEG = "good great love liked really very".split(), "bad terrible hate not".split()


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        a, b = rng.sample(POS if label == "positive" else NEG, 2)
        out.append({"text": f"the movie was {a} and {b}", "label": label})
    return out


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _peft_logprobs(model_dir, adapter, context: str, continuation: str) -> list[float]:
    """Per-token log-probs of ``continuation`` after ``context`` from PEFT's own forward."""
    from peft import PeftModel

    from softprompt.models import load_model

    lm = load_model(model_dir)
    pm = PeftModel.from_pretrained(lm.model, str(adapter)).eval()
    tok = lm.tokenizer
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    c = pm.peft_config["default"]
    # the embedding types' logits have a row per virtual token; a K/V prefix has none
    P = 0 if c.peft_type.value in ("PREFIX_TUNING", "CARTRIDGE") else c.num_virtual_tokens
    with torch.no_grad():
        logits = pm(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[P + len(ctx) + j - 1, t]) for j, t in enumerate(cont)]


TYPES = ["prompt_tuning", "prefix_tuning"]  # an embedding prompt and a K/V prompt (from text)


@pytest.fixture(scope="module")
def classify_runs(tiny_dirs, tmp_path_factory):
    """classify_runs(type) -> (cfg, metrics) of a tiny classification run of that type, made once:
    24 rows, 2 epochs of 6 steps, text init, eval every epoch."""
    made = {}

    def get(kind):
        if kind not in made:
            d = tmp_path_factory.mktemp(f"classify-{kind}")
            cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=_jsonl(d / "train.jsonl", _rows(24, 0)),
                              eval=_jsonl(d / "held.jsonl", _rows(12, 1)), out=str(d / "out"), type=kind,
                              labels=(), template="{text} :", init="text:the movie was good",
                              virtual_tokens=4, epochs=2, batch_size=4, lr=0.1, progress=False)
            made[kind] = cfg, train(cfg)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def classify_run(classify_runs):
    return classify_runs("prompt_tuning")


@pytest.mark.parametrize("kind", TYPES)
def test_reported_accuracy_equals_rt_classify_on_the_saved_adapter(classify_runs, kind):
    from softprompt import Runtime

    cfg, m = classify_runs(kind)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoints", "metrics.json",
        "train_job.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    assert m["labels"] == ["positive", "negative"] or m["labels"] == ["negative", "positive"]
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and all("loss" in e for e in m["epochs"])
    assert m["best"]["accuracy"] == max(e["accuracy"] for e in m["epochs"])
    assert m["best"]["accuracy"] == next(e for e in m["epochs"] if e["epoch"] == m["best_epoch"])["accuracy"]
    assert json.loads((out / "metrics.json").read_text()) == m
    held = [json.loads(x) for x in Path(cfg.eval).read_text().splitlines()]
    labels = [" " + x for x in m["labels"]]
    with Runtime.load(cfg.model, backend="torch") as rt:
        rt.add_prompt("mine", out)
        res = rt.classify("mine", [f"{r['text']} :" for r in held], labels)
        acc = sum(c.label == " " + r["label"] for c, r in zip(res, held)) / len(held)
        assert acc == m["best"]["accuracy"]
        # the adapter is the best epoch's checkpoint, as PEFT saved it there
        best = out / "checkpoints" / f"checkpoint-{6 * m['best_epoch']}"
        rt.add_prompt("ckpt", best)
        assert rt.prompts["ckpt"].digest == rt.prompts["mine"].digest
        assert rt.prompts["mine"].kind == kind
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == kind.upper() and cfg_json["num_virtual_tokens"] == 4
    assert m["type"] == kind and m["peft_type"] == kind.upper() and m["init"] == "text:the movie was good"
    if kind == "prompt_tuning":
        assert cfg_json["prompt_tuning_init_text"] == "the movie was good"
    assert cfg_json["base_model_name_or_path"] == cfg.model


@pytest.mark.parametrize("kind", TYPES)
def test_peft_forward_equals_the_runtime_scores(classify_runs, kind):
    from softprompt import Runtime

    cfg, _ = classify_runs(kind)
    held = [json.loads(x) for x in Path(cfg.eval).read_text().splitlines()][:3]
    with Runtime.load(cfg.model, backend="torch") as rt:
        rt.add_prompt("mine", cfg.out)
        got = rt.score([{"prompt": "mine", "context": f"{r['text']} :", "continuation": " positive"}
                        for r in held])
    for r, s in zip(held, got):
        want = _peft_logprobs(cfg.model, cfg.out, f"{r['text']} :", " positive")
        np.testing.assert_allclose(s.token_logprobs, want, atol=TOL)


def _lm_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(POS + NEG, 2)
        row = {"context": f"i {a} this {b} movie", "continuation": f" {rng.choice(['yes', 'no'])} ."}
        if i % 5 == 4:
            row["continuation"] = ""  # trained and scored on the context itself
        out.append(row)
    return out


def _csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["context", "continuation"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_continuation_rows_report_the_runtime_loglik(tiny_dirs, tmp_path):
    """{context, continuation} rows from CSV: mean log-likelihood through rt.score."""
    from softprompt import Runtime

    held = _lm_rows(6, 3)
    cfg = TrainConfig(model=str(tiny_dirs["llama"]), data=_csv(tmp_path / "t.csv", _lm_rows(10, 2)),
                      eval=_jsonl(tmp_path / "h.jsonl", held), out=str(tmp_path / "o"),
                      virtual_tokens=3, epochs=1, batch_size=4, init="random", progress=False)
    m = train(cfg)
    assert m["metric"] == "loglik" and m["best_epoch"] == 1
    with Runtime.load(cfg.model, backend="torch") as rt:
        rt.add_prompt("p", cfg.out)
        res = rt.score([{"prompt": "p", "context": r["context"], "continuation": r["continuation"] or None}
                        for r in held])
    assert m["best"]["loglik"] == pytest.approx(np.mean([r.logprob for r in res]), abs=1e-9)
    assert m["initial"]["loglik"] < m["best"]["loglik"]  # a few steps do raise the likelihood


KILLED = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from softprompt.train import TrainConfig, train

    class KillAt(TrainerCallback):  # SIGKILL itself at a step in the middle of epoch 2
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(**{k: (tuple(v) if k == "labels" and v is not None else v)
                         for k, v in __import__("json").loads(sys.argv[1]).items()})
    train(cfg, callbacks=[KillAt()])
""")


def test_resume_after_sigkill_mid_epoch_gives_the_same_adapter(tiny_dirs, tmp_path):
    from softprompt.cli import main
    from softprompt.runtime.prompts import SoftPrompt

    data = _jsonl(tmp_path / "t.jsonl", _lm_rows(24, 4))  # 6 steps an epoch at batch 4
    held = _jsonl(tmp_path / "h.jsonl", _lm_rows(6, 5))
    common = dict(model=str(tiny_dirs["llama"]), data=data, eval=held, virtual_tokens=4,
                  epochs=3, batch_size=4, lr=0.05, seed=3, progress=False)
    ref = train(TrainConfig(out=str(tmp_path / "ref"), **common))
    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KILLED, json.dumps(dict(common, out=str(killed))), "9"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-6"]
    assert not (killed / "adapter_config.json").exists()
    with pytest.raises(SystemExit, match="holds an earlier training run: pass --resume"):
        main(["train", common["model"], "--data", data, "--eval", held, "--out", str(killed),
              "--virtual-tokens", "4", "--epochs", "3", "--batch-size", "4", "--lr", "0.05",
              "--seed", "3", "--init", "vocab", "--no-progress"])
    with pytest.raises(SystemExit, match="lr differ"):
        main(["train", common["model"], "--data", data, "--eval", held, "--out", str(killed),
              "--virtual-tokens", "4", "--epochs", "3", "--batch-size", "4", "--lr", "0.5",
              "--seed", "3", "--no-progress", "--resume"])
    assert main(["train", common["model"], "--data", data, "--eval", held, "--out", str(killed),
                 "--virtual-tokens", "4", "--epochs", "3", "--batch-size", "4", "--lr", "0.05",
                 "--seed", "3", "--no-progress", "--resume"]) == 0
    got = json.loads((killed / "metrics.json").read_text())
    assert got["epochs"] == ref["epochs"] and got["best_epoch"] == ref["best_epoch"]
    # bit-exact on CPU (same thread count): the final adapter and every epoch's checkpoint
    for sub in ("", "checkpoints/checkpoint-12", "checkpoints/checkpoint-18"):
        a = SoftPrompt.load(tmp_path / "ref" / sub).embeddings
        b = SoftPrompt.load(killed / sub).embeddings
        assert np.array_equal(a, b), (sub, float(np.abs(a - b).max()))


def test_refusals_are_one_line(tiny_dirs, tmp_path):
    from softprompt.cli import main

    data = _jsonl(tmp_path / "t.jsonl", _rows(4, 0))
    base = ["train", str(tiny_dirs["llama"]), "--data", data, "--out", str(tmp_path / "o"), "--no-progress"]
    trained = "trained here: prompt_tuning, p_tuning, prefix_tuning, cartridge"
    for extra, msg in ((["--type", "multitask_prompt_tuning"], "--type multitask_prompt_tuning is not "
                        "trained here: it needs a task id per training row"),
                       (["--type", "CPT"], "--type cpt is not trained here: it needs its token-type template"),
                       (["--type", "cpt"], trained),
                       (["--type", "lora"], "unknown --type 'lora'"),
                       (["--labels", "--init", "words"], "--init must be text:"),
                       (["--labels", "--type", "prefix-tuning", "--init", "vocab"],
                        "--init vocab does not apply to --type prefix_tuning: it takes text:"),
                       (["--labels", "--type", "p_tuning", "--init", "text:hi"],
                        "--init text does not apply to --type p_tuning: it takes random only"),
                       (["--labels", "--type", "prefix_tuning", "--prefix-projection", "--init", "text:hi"],
                        "random only with --prefix-projection"),
                       (["--labels", "--encoder", "lstm"], "--encoder applies to --type p_tuning only"),
                       (["--labels", "--type", "cartridge", "--prefix-projection"],
                        "--prefix-projection applies to --type prefix_tuning only"),
                       (["--labels", "--type", "cartridge", "--virtual-tokens", "50", "--init", "text:a short one"],
                        "--init text: the K/V prefix is the model's K/V of the text's first 50 tokens, and the "
                        "text has"),
                       ([], "a {text, label} row: pass --labels"),
                       (["--labels", "good,bad"], "is not one of ['good', 'bad']")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(TrainError, match="no rows"):
        train(TrainConfig(data=_jsonl(tmp_path / "e.jsonl", []), out=str(tmp_path / "o2")))


class _StopAt(Exception):
    pass


@pytest.mark.parametrize("flags", [["--type", "p_tuning"], ["--type", "p_tuning", "--encoder", "lstm"],
                                   ["--type", "prefix_tuning"], ["--type", "prefix_tuning", "--prefix-projection"],
                                   ["--type", "cartridge"]],
                         ids=["p_tuning_mlp", "p_tuning_lstm", "prefix_tuning", "prefix_projection", "cartridge"])
def test_other_types_resume_and_keep_the_best_epoch(tiny_dirs, tmp_path, flags):
    """A run stopped mid-epoch 2 and resumed (CLI --resume) ends bit-identical to an uninterrupted
    one, and the adapter written is the best epoch's checkpoint. For the encoder types this needs
    the encoder's weights in each checkpoint (PEFT's adapter file holds its output only)."""
    from transformers import TrainerCallback

    from softprompt.cli import main
    from softprompt.runtime.adapters import load_adapter
    from softprompt.train.run import ENCODER_FILE

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 9:
                raise _StopAt

    model, data = str(tiny_dirs["llama"]), _jsonl(tmp_path / "t.jsonl", _rows(24, 6))
    held = _jsonl(tmp_path / "h.jsonl", _rows(8, 7))
    argv = ["train", model, "--data", data, "--eval", held, "--labels", "--template", "{text} :",
            "--virtual-tokens", "3", "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--seed", "1",
            "--no-progress", *flags]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    cfg = TrainConfig(model=model, data=data, eval=held, out=str(tmp_path / "cut"), labels=(),
                      template="{text} :", virtual_tokens=3, epochs=2, batch_size=4, lr=0.05, seed=1,
                      progress=False, type=flags[1], encoder=flags[3] if "--encoder" in flags else None,
                      prefix_projection="--prefix-projection" in flags)
    with pytest.raises(_StopAt):
        train(cfg, callbacks=[StopAt()])
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint-6"
    assert (ckpt / ENCODER_FILE).is_file() == (flags[1] == "p_tuning" or "--prefix-projection" in flags)
    assert main(argv + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    got = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert got["epochs"] == ref["epochs"] and got["best_epoch"] == ref["best_epoch"]
    assert got["type"] == flags[1] and got.get("encoder") == ref.get("encoder")
    assert got.get("encoder") == (None if flags[1] != "p_tuning" else flags[3] if len(flags) > 2 else "mlp")
    flat = {d: load_adapter(d, "p")[0] for d in (tmp_path / "ref", tmp_path / "cut",
                                                 tmp_path / "cut" / "checkpoints" / f"checkpoint-{6 * ref['best_epoch']}")}
    a, b, best = flat.values()
    assert a.digest == b.digest == best.digest  # bit-identical; the best epoch's prompt
    assert a.kind == flags[1]


def test_demo_script_is_a_thin_caller_of_softprompt_train():
    from softprompt.cli import build_parser
    from softprompt.train import demo

    for task, argv in demo.commands(epochs=3, seed=0).items():
        args = build_parser("train").parse_args(argv)
        assert args.func.__module__ == "softprompt.train.cli"
        assert args.data.endswith(f"{task}_train.jsonl") and args.eval.endswith(f"{task}_test.jsonl")
        assert args.labels is not None and args.virtual_tokens == 20 and args.init.startswith("text:")


# --------------------------------------------------------------------- hot swap, watching
KEY, ADMIN = "sk-user", "sk-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, timeout: float = 30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_upload_and_watch_with_a_real_server(tiny_dirs, tmp_path, classify_run):
    from softprompt import Runtime, SoftPrompt
    from softprompt.cli import main
    from softprompt.train import upload

    model = str(tiny_dirs["llama"])
    watched = tmp_path / "watched"
    watched.mkdir()
    SoftPrompt.random(3, 64, seed=1).save_peft(watched / "w1")
    port, log = _free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), SOFTPROMPT_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", model, "--backend", "torch",
                             "--watch", str(watched), "--watch-interval", "0.2", "--port", str(port),
                             "--api-key", KEY, "--admin-key", ADMIN, "--no-warmup", "--served-model-name", "tiny"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    rt = Runtime.load(model, backend="torch")
    ctx = "the food and service were"

    def served(name):
        r = client.post("/v1/score", json={"requests": [{"prompt": name, "context": ctx}]})
        return r.json()["data"][0].get("token_logprobs") if r.status_code == 200 else None

    def local(name, source):
        rt.add_prompt(name, source)
        return rt.score([{"prompt": name, "context": ctx}])[0].token_logprobs

    def names():
        return {m["id"] for m in client.get("/v1/models").json()["data"]}

    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(ready, "the server", 120)
        assert names() == {"tiny", "w1"}
        # hot swap: the trained adapter uploaded through POST /v1/prompts (admin key)
        cfg, _ = classify_run
        with pytest.raises(TrainError, match="HTTP 403: adding and removing prompts needs the admin key"):
            upload(cfg.out, url, "trained", admin_key=KEY)
        card = upload(cfg.out, url, "trained", admin_key=ADMIN)
        assert card["id"] == "trained" and card["num_virtual_tokens"] == 4
        np.testing.assert_allclose(served("trained"), local("trained", cfg.out), atol=TOL)
        # the CLI's --serve-url: train, then upload under --name
        out = tmp_path / "cli-out"
        assert main(["train", model, "--data", cfg.data, "--labels", "--out", str(out), "--epochs", "1",
                     "--virtual-tokens", "2", "--no-progress", "--serve-url", url, "--name", "from-cli",
                     "--admin-key", ADMIN]) == 0
        np.testing.assert_allclose(served("from-cli"), local("from-cli", out), atol=TOL)
        # --watch: a new adapter appears, a changed one is swapped in, a bad file is refused
        shutil.copytree(out, watched / "w2", ignore=shutil.ignore_patterns("checkpoints"))
        _wait(lambda: "w2" in names(), "w2 to be served")
        np.testing.assert_allclose(served("w2"), local("w2", watched / "w2"), atol=TOL)
        before = served("w1")
        SoftPrompt.random(5, 64, seed=2).save_peft(watched / "w1")
        want = local("w1", watched / "w1")
        _wait(lambda: np.allclose(served("w1"), want, atol=TOL), "w1 to be replaced")
        assert not np.allclose(before, want, atol=TOL)
        (watched / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        _wait(lambda: "'bad' from" in log.read_text(), "the bad file to be refused")
        assert "bad" not in names() and served("w1") is not None
        shutil.rmtree(watched / "w2")
        _wait(lambda: "w2" not in names(), "w2 to be removed")
        assert names() == {"tiny", "w1", "trained", "from-cli"}
    finally:
        client.close()
        rt.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------- the default model
@pytest.mark.slow
@pytest.mark.parametrize("kind, P", [("prompt_tuning", 20), ("prefix_tuning", 12)])
def test_default_model_demo_task_short_run(tmp_path, kind, P):
    """Two steps on 16 rows of the demo sentiment task (text init: P=20 embeddings, or the
    model's own K/V of the 12-token init text), evaluated on 8 held-out rows through the
    runtime: the reported accuracy is rt.classify's on the saved adapter, and PEFT's forward
    on it gives the runtime's scores."""
    from softprompt import Runtime
    from softprompt.runtime.demo import DEMO_DIR, TASKS, load_examples

    task = TASKS["sentiment"]
    train_rows, held = load_examples(task, "train")[:16], load_examples(task, "test")[:8]
    cfg = TrainConfig(model="default", data=_jsonl(tmp_path / "t.jsonl", train_rows),
                      eval=_jsonl(tmp_path / "h.jsonl", held), out=str(tmp_path / "sentiment"),
                      labels=task.label_names, template=task.template, init=f"text:{task.init_text}",
                      type=kind, virtual_tokens=P, epochs=1, batch_size=8, lr=3e-2, progress=False)
    m = train(cfg)
    assert DEMO_DIR.is_dir() and m["best_epoch"] == 1 and m["type"] == kind
    contexts = [task.template.format(text=r["text"]) for r in held]
    with Runtime.load("default", backend="torch") as rt:
        rt.add_prompt("s", cfg.out)
        assert rt.prompts["s"].kind == kind and rt.prompts["s"].num_virtual_tokens == P
        res = rt.classify("s", contexts, list(task.labels))
        acc = sum(c.label == " " + r["label"] for c, r in zip(res, held)) / len(held)
        assert acc == m["best"]["accuracy"]
        got = rt.score([{"prompt": "s", "context": contexts[0], "continuation": " positive"}])[0]
    want = _peft_logprobs("default", cfg.out, contexts[0], " positive")
    np.testing.assert_allclose(got.token_logprobs, want, atol=TOL)
