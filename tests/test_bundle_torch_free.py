"""A bundle runs where torch and transformers cannot even be imported.

The parent exports a tiny Gemma (its embedding module scales by sqrt(E): the table in the
bundle must carry that) and computes the expected logits with transformers; a child
process that refuses every torch/transformers import loads the bundle, tokenizes, embeds
through the bundle's table, runs the prefix then the request, and compares.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tolerances import ONNX

from softprompt.models import load_model
from softprompt.runtime.prompts import SoftPrompt

TEXT = "the food was not very good"

BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors", "peft"):
                raise ImportError(f"{name} is blocked: the bundle must run without it")
            return None

    sys.meta_path.insert(0, Refuse())
""")

CHILD = BLOCK + textwrap.dedent("""
    import numpy as np
    import softprompt.export
    from softprompt.export.bundle import load_bundle

    bundle_dir, work, text, atol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    b = load_bundle(bundle_dir)
    prompt = np.load(work + "/prompt.npy")  # [P, E]
    ids = b.tokenizer.encode(text).ids
    assert ids == np.load(work + "/ids.npy").tolist(), ids
    P, L = len(prompt), len(ids)
    _, past = b.run(prompt[None], np.ones((1, P)), np.arange(P)[None], b.empty_past(1),
                    np.array([[P - 1]]))
    logits, presents = b.run(b.embed([ids]), np.ones((1, P + L)), (P + np.arange(L))[None],
                             past, np.arange(L)[None])
    assert presents[0][0].shape == (1, b.num_kv_heads, P + L, b.head_dim)
    diff = float(np.abs(logits[0] - np.load(work + "/expected.npy")).max())
    assert diff <= atol, f"max |bundle - transformers| = {diff}"
    try:
        softprompt.export.export("x", "y")
    except ImportError:
        pass
    else:
        raise AssertionError("the exporter imported without torch?")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    print("torch-free OK", diff)
""")


@pytest.fixture(scope="module")
def gemma_bundle(tiny_bundles):
    return tiny_bundles["gemma"]


def test_bundle_runs_without_torch(gemma_bundle, tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["gemma"])
    prompt = SoftPrompt.random(5, lm.hidden_size, seed=7).embeddings  # [P, E], unscaled
    ids = lm.tokenizer(TEXT)["input_ids"]
    emb = lm.model.get_input_embeddings()  # includes Gemma's sqrt(E) scaling, as PEFT's does
    with torch.no_grad():
        embeds = torch.cat([torch.tensor(prompt), emb(torch.tensor(ids))])[None]
        expected = lm.model(inputs_embeds=embeds).logits[0, len(prompt):].numpy()
    np.save(tmp_path / "prompt.npy", prompt)
    np.save(tmp_path / "ids.npy", np.array(ids))
    np.save(tmp_path / "expected.npy", expected)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(gemma_bundle), str(tmp_path), TEXT,
                           str(ONNX["float32"]["atol"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch-free OK" in proc.stdout


RUNTIME_CHILD = BLOCK + textwrap.dedent("""
    import json
    from softprompt import Runtime

    bundle_dir, adapter, reqs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rt = Runtime.load(bundle_dir, backend="onnx")
    rt.add_prompt("peft", adapter)  # a PEFT adapter dir, read with numpy alone
    res = rt.score(reqs)
    gen = rt.generate("peft", ["the food was"], max_new_tokens=4, stop_at_eos=False)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
    print(json.dumps({"scores": [r.token_logprobs for r in res], "gen": gen[0].token_ids}))
""")


def test_runtime_serves_bundle_without_torch(gemma_bundle, tiny_dirs, tmp_path):
    """The whole Runtime (onnx backend) runs where torch and transformers cannot be imported:
    a PEFT adapter scored through the bundle equals the reference backend in the parent."""
    import json

    from softprompt.runtime.api import Runtime

    lm = load_model(tiny_dirs["gemma"])
    SoftPrompt.random(6, lm.hidden_size, seed=3).save_peft(tmp_path / "ad", str(tiny_dirs["gemma"]))
    reqs = [{"prompt": "peft", "context": TEXT, "continuation": " very good"},
            {"prompt": "peft", "context": [5, 6, 7, 8]}]
    ref = Runtime.load(str(tiny_dirs["gemma"]), backend="reference")
    ref.add_prompt("peft", tmp_path / "ad")
    want = ref.score(reqs)
    want_gen = ref.generate("peft", ["the food was"], max_new_tokens=4, stop_at_eos=False)[0]
    proc = subprocess.run([sys.executable, "-c", RUNTIME_CHILD, str(gemma_bundle),
                           str(tmp_path / "ad"), json.dumps(reqs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for g, w in zip(got["scores"], want):
        np.testing.assert_allclose(g, w.token_logprobs, **ONNX["float32"])
    assert got["gen"] == want_gen.token_ids
