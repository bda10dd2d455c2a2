"""softprompt.ray on a local Ray (2 CPUs, no external address): a dataset scored by 2 actors
equals in-process Runtime.score row by row; an actor killed mid-run is restarted by Ray and no
row is lost or repeated; ``softprompt score --ray`` writes what the local job writes."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from tolerances import SCORE

ray = pytest.importorskip("ray")

from softprompt.cli import main  # noqa: E402
from softprompt.ray import RuntimeScorer, score_dataset, score_file  # noqa: E402
from softprompt.runtime.api import Runtime  # noqa: E402


def fail_once_scorer(marker) -> type[RuntimeScorer]:
    """A RuntimeScorer whose first call, among all its actors, creates ``marker`` and kills its
    own process (as a crashed node would); every later call scores. The class is local to this
    function, so Ray's cloudpickle ships it to the actors by value (this test module is not
    importable there), with ``marker`` in its closure."""
    marker = str(marker)

    class FailOnceScorer(RuntimeScorer):
        def score_rows(self, rows: list) -> list:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().score_rows(rows)
            os._exit(1)

    return FailOnceScorer


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=int(200e6),
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tiny_llama_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    np.save(d / "p.npy", np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))
    rt = Runtime.load(tiny_llama_bundle, backend="onnx")
    rt.add_prompt("p", d / "p.npy")
    rng = random.Random(0)
    rows = [{"id": i, "prompt": "p" if i % 3 else None,
             "context": [rng.randrange(3, 96) for _ in range(rng.randint(2, 9))],
             "continuation": [rng.randrange(3, 96)]} for i in range(600)]
    rows[17]["prompt"] = "unknown"
    return tiny_llama_bundle, {"p": str(d / "p.npy")}, rt, rows, d


def _check(out_rows, rows, rt):
    ids = sorted(r["id"] for r in out_rows)
    assert ids == list(range(len(rows))), "a row was lost or repeated"
    got = {r["id"]: r for r in out_rows}
    want = rt.score([{k: r[k] for k in ("prompt", "context", "continuation")} for r in rows],
                    errors="return")
    for r, w in zip(rows, want):
        g = got[r["id"]]
        assert g["context"] == r["context"]  # input columns pass through
        if w.error:
            assert g["error"] == w.error and g["logprob"] is None
        else:
            assert g["error"] is None
            np.testing.assert_allclose(g["logprob"], w.logprob, **SCORE["float32"])


def test_two_actors_equal_in_process_scores(local_ray, setup):
    bundle, prompts, rt, rows, _ = setup
    ds = ray.data.from_items(rows, override_num_blocks=6)
    out = score_dataset(ds, bundle, prompts, num_actors=2, batch_size=64).take_all()
    assert "unknown prompt 'unknown'" in next(r for r in out if r["id"] == 17)["error"]
    _check(out, rows, rt)


def test_an_actor_killed_mid_run_is_retried_without_loss(local_ray, setup):
    bundle, prompts, rt, rows, d = setup
    marker = d / "crashed-once"
    ds = ray.data.from_items(rows, override_num_blocks=6)
    out = score_dataset(ds, bundle, prompts, num_actors=2, batch_size=50,
                        scorer_cls=fail_once_scorer(marker)).take_all()
    assert marker.exists(), "no actor crashed: the fault was not injected"
    _check(out, rows, rt)


def test_cli_ray_writes_what_the_local_job_writes(local_ray, setup, tmp_path):
    bundle, prompts, rt, rows, _ = setup
    with open(tmp_path / "in.jsonl", "w") as f:
        for r in rows[:200]:
            f.write(json.dumps({k: r[k] for k in ("prompt", "context", "continuation")}) + "\n")
        f.write("not json\n")
    common = ["score", str(bundle), "--backend", "onnx", "--prompt", f"p={prompts['p']}",
              "-i", str(tmp_path / "in.jsonl"), "--chunk-rows", "120", "--no-progress"]
    assert main(common + ["-o", str(tmp_path / "local.jsonl")]) == 0
    assert main(common + ["-o", str(tmp_path / "ray.jsonl"), "--ray", "--ray-actors", "2",
                          "--ray-batch-size", "40"]) == 0
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    on_ray = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert [r["line"] for r in on_ray] == [r["line"] for r in local] == list(range(1, 202))
    for a, b in zip(on_ray, local):
        assert a.keys() == b.keys() and a.get("tokens") == b.get("tokens") and a.get("error") == b.get("error")
        if "logprob" in a:
            np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], **SCORE["float32"])
    ck = json.loads((tmp_path / "ray.jsonl.ckpt.json").read_text())
    assert ck["model"]["engine"] == "ray" and ck["stage"] == "done"


def test_file_job_keeps_one_actor_pool_and_survives_a_killed_actor(local_ray, setup, tmp_path):
    """``score_file`` on Ray over 5 chunks: one pool of 2 actors for the whole job (each loads
    its runtime once), an actor killed mid-job is restarted with its call retried, and the
    output equals the in-process job's, row for row."""
    bundle, prompts, rt, rows, _ = setup
    with open(tmp_path / "in.jsonl", "w") as f:
        for r in rows[:250]:
            f.write(json.dumps({k: r[k] for k in ("prompt", "context", "continuation")}) + "\n")
    marker = tmp_path / "crashed-once"
    from ray._private.state import actors  # the GCS actor table (no dashboard here)

    scorer_cls = fail_once_scorer(marker)
    before = set(actors())
    summary = score_file(str(tmp_path / "in.jsonl"), str(tmp_path / "ray.jsonl"), bundle,
                         prompts, backend="onnx", num_actors=2, batch_size=20, chunk_rows=50,
                         progress=False, scorer_cls=scorer_cls)
    assert marker.exists(), "no actor crashed: the fault was not injected"
    started = [a for key, a in actors().items() if key not in before]
    assert [a["ActorClassName"] for a in started] == [scorer_cls.__qualname__] * 2, \
        f"{len(started)} actors for 5 chunks; expected one pool of 2"
    assert sorted(a["NumRestarts"] for a in started) == [0, 1]  # the killed one, restarted
    out = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == list(range(1, 251)) and summary["rows"] == 250
    want = rt.score([{k: r[k] for k in ("prompt", "context", "continuation")}
                     for r in rows[:250]], errors="return")
    for got, w in zip(out, want):
        assert got.get("error") == w.error
        if w.error is None:
            np.testing.assert_allclose(got["logprob"], w.logprob, **SCORE["float32"])
