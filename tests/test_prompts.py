"""SoftPrompt: formats (PEFT round trip with real PEFT), creation, and every validation error."""

import json
import warnings

import numpy as np
import pytest
import torch

from softprompt.models import loading as models
from softprompt.runtime.prompts import BaseModelMismatchWarning, SoftPrompt, SoftPromptError
from softprompt.runtime.safetensors_np import save_file
from tolerances import SCORE


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return models.load_model(tiny_dirs["llama"])


def test_peft_round_trip_same_logits(tmp_path, tiny_dirs, llama):
    """save_peft writes what peft.PeftModel.from_pretrained loads, with identical logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sp = SoftPrompt.random(6, llama.hidden_size, seed=1, name="rt")
    sp.save_peft(tmp_path / "ad", base_model_name_or_path=str(tiny_dirs["llama"]))
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits[0]
        emb = torch.cat([torch.tensor(sp.embeddings), base.get_input_embeddings()(ids[0])])
        want = base(inputs_embeds=emb[None]).logits[0]
    torch.testing.assert_close(got, want, **SCORE["float32"])
    back = SoftPrompt.load(tmp_path / "ad")
    np.testing.assert_array_equal(back.embeddings, sp.embeddings)
    assert back.init == "peft" and back.num_virtual_tokens == 6


def test_load_formats(tmp_path):
    emb = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    save_file({"prompt_embeddings": emb}, tmp_path / "p.safetensors")
    np.save(tmp_path / "p.npy", emb)
    torch.save({"prompt_embeddings": torch.from_numpy(emb)}, tmp_path / "p.pt")
    for f, kw in (("p.safetensors", {}), ("p.npy", {}), ("p.pt", {"allow_pickle": True})):
        np.testing.assert_array_equal(SoftPrompt.load(tmp_path / f, **kw).embeddings, emb)


def test_from_text_follows_peft_text_init(llama):
    """PEFT's TEXT init: the init text's token embeddings, repeated/truncated to P."""
    ids = llama.tokenizer("the movie was good")["input_ids"]
    sp = SoftPrompt.from_text("the movie was good", llama, num_virtual_tokens=10)
    want = llama.model.get_input_embeddings().weight[(ids * 3)[:10]].numpy()
    np.testing.assert_array_equal(sp.embeddings, want)
    short = SoftPrompt.from_text("the movie was good", llama, num_virtual_tokens=2)
    np.testing.assert_array_equal(short.embeddings, want[:2])


def test_random_is_seeded():
    a, b, c = SoftPrompt.random(3, 8, seed=5), SoftPrompt.random(3, 8, seed=5), SoftPrompt.random(3, 8, seed=6)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize("emb, kwargs, message", [
    (np.zeros((3, 8), np.float32), {"hidden_size": 16}, "hidden size 8 but the model's hidden size is 16"),
    (np.zeros((0, 8), np.float32), {}, "0 virtual tokens"),
    (np.zeros((30, 8), np.float32), {"max_virtual_tokens": 20}, "30 virtual tokens, above the maximum of 20"),
    (np.array([[0.0, np.nan], [np.inf, 1.0]], np.float32), {}, "NaN/Inf"),
])
def test_validation_errors(emb, kwargs, message):
    with pytest.raises(SoftPromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SoftPrompt(emb, name="x").validate(**kwargs)


def test_not_2d_and_not_float():
    with pytest.raises(SoftPromptError, match=r"2-D \[P, E\], got shape \(4,\)"):
        SoftPrompt(np.zeros(4, np.float32))
    with pytest.raises(SoftPromptError, match="floating point, got int64"):
        SoftPrompt(np.zeros((2, 2), np.int64))


def _peft_dir(tmp_path, **overrides):
    d = tmp_path / "adapter"
    SoftPrompt.random(4, 8, seed=0).save_peft(d, base_model_name_or_path="tiny-llama")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(overrides)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def test_num_transformer_submodules(tmp_path):
    with pytest.raises(SoftPromptError, match="num_transformer_submodules is 2; expected 1"):
        SoftPrompt.load(_peft_dir(tmp_path, num_transformer_submodules=2))


def test_not_prompt_tuning(tmp_path):
    with pytest.raises(SoftPromptError, match="'LORA' adapter, which is not served .*; served peft_type values: PROMPT_TUNING"):
        SoftPrompt.load(_peft_dir(tmp_path, peft_type="LORA"))


def test_num_virtual_tokens_disagrees(tmp_path):
    with pytest.raises(SoftPromptError, match="has 4 rows but adapter_config.json says num_virtual_tokens=9"):
        SoftPrompt.load(_peft_dir(tmp_path, num_virtual_tokens=9))


def test_truncated_and_corrupt_files(tmp_path):
    d = _peft_dir(tmp_path)
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-20])
    with pytest.raises(SoftPromptError, match="corrupt or truncated safetensors"):
        SoftPrompt.load(d)
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SoftPromptError, match="corrupt or truncated .npy"):
        SoftPrompt.load(tmp_path / "bad.npy")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(SoftPromptError, match="corrupt JSON"):
        SoftPrompt.load(d)
    (tmp_path / "bad.pt").write_bytes(b"not a zip file")
    with pytest.raises(SoftPromptError, match="corrupt, truncated or not a weights-only"):
        SoftPrompt.load(tmp_path / "bad.pt", allow_pickle=True)


def test_pickle_needs_opt_in(tmp_path):
    torch.save(torch.zeros(2, 4), tmp_path / "p.bin")
    with pytest.raises(SoftPromptError, match="refusing to unpickle p.bin.*allow_pickle=True"):
        SoftPrompt.load(tmp_path / "p.bin")


def test_pickle_is_weights_only(tmp_path):
    """Even with the opt-in, arbitrary pickled objects are refused (weights_only=True)."""
    torch.save({"prompt_embeddings": torch.zeros(2, 4), "x": object()}, tmp_path / "evil.pt")
    with pytest.raises(SoftPromptError, match="not a weights-only file"):
        SoftPrompt.load(tmp_path / "evil.pt", allow_pickle=True)


def test_base_model_mismatch_warns_then_strict_raises():
    sp = SoftPrompt(np.zeros((2, 4), np.float32), name="p", base_model="org/other-model")
    with pytest.warns(BaseModelMismatchWarning, match="made for base model 'org/other-model' but is used with 'tiny'"):
        sp.check_base_model(None, "tiny")
    with pytest.raises(SoftPromptError, match="made for base model.*strict mode"):
        sp.check_base_model(None, "tiny", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.check_base_model(None, "/somewhere/other-model")  # same name: no warning


def test_unsupported_file_and_missing():
    with pytest.raises(SoftPromptError, match="not found"):
        SoftPrompt.load("/nonexistent/prompt.safetensors")
