"""Loading real models the way users expect: in the target dtype without a float32 copy,
a passed-in model placed as asked, directories without tokenizer files, configs the cached
path cannot reproduce refused, and exports that fail leaving nothing behind."""

from __future__ import annotations

import pytest
import torch

from softprompt.models import loading as models
from softprompt.runtime.api import Runtime
from softprompt.runtime.prompts import SoftPrompt
from softprompt.runtime.requests import RequestError
from tiny import HIDDEN, tiny_config
from tolerances import SCORE

IDS = {"prompt": "p", "context": [5, 9, 17, 4, 30], "continuation": [11, 3]}


def test_bf16_is_read_as_bf16_and_fingerprinted_from_files(tiny_dirs, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path))  # no remembered fingerprint
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        seen.append((kwargs.get("dtype"), {p.dtype for p in model.state_dict().values()}))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    # the fingerprint comes from the files: no state-dict pass (which would upcast every tensor)
    monkeypatch.setattr(models, "fingerprint_model", lambda m: pytest.fail("hashed tensors"))
    lm = models.load_model(tiny_dirs["llama"], dtype="bfloat16")
    assert seen == [(torch.bfloat16, {torch.bfloat16})]  # as from_pretrained returned it
    assert lm.fingerprint == models.load_model(tiny_dirs["llama"]).fingerprint


def _runtime(model, **kwargs) -> Runtime:
    rt = Runtime.load(model, **kwargs)
    rt.add_prompt("p", SoftPrompt.random(3, HIDDEN, seed=2, std=0.5))
    return rt


def test_passed_in_model_is_placed_or_refused(tiny_dirs):
    lm = models.load_model(tiny_dirs["llama"])
    assert models.load_model(lm) is lm and lm.model.dtype == torch.float32  # already as asked
    rt = _runtime(lm, backend="torch", dtype="bfloat16")  # cast in place
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    ref = _runtime(tiny_dirs["llama"], backend="torch", dtype="bfloat16")  # read as bf16
    assert rt.score([IDS])[0].token_logprobs == ref.score([IDS])[0].token_logprobs
    lm.model.hf_quantizer = object()  # e.g. loaded in 4 bits: cannot be cast
    with pytest.raises(models.ModelError, match=r"is torch.bfloat16 on cpu and cannot be moved to "
                                                r"torch.float32 on cpu: its weights are quantized"):
        models.load_model(lm, dtype="float32")


def _no_tokenizer(tmp_path, family="llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(tmp_path / "bare")  # weights + config only
    return model, tmp_path / "bare"


def test_model_without_tokenizer_scores_ids_and_refuses_text(tmp_path):
    model, bare = _no_tokenizer(tmp_path)
    assert not any((bare / f).exists() for f in models.TOKENIZER_FILES)
    lm = models.load_model(bare)
    assert lm.tokenizer is None
    rt = _runtime(bare, backend="torch")
    prompt = rt.prompts["p"]
    got = rt.score([IDS])[0]
    # the reference: the same model with inputs_embeds = [prompt, ids], float32
    ids = IDS["context"] + IDS["continuation"]
    with torch.no_grad():
        emb = torch.cat([torch.tensor(prompt.embeddings),
                         model.get_input_embeddings()(torch.tensor(ids))])[None]
        logp = model(inputs_embeds=emb).logits[0].log_softmax(-1)
    P, C = 3, len(IDS["context"])
    want = [float(logp[P + C - 1 + j, t]) for j, t in enumerate(IDS["continuation"])]
    torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(want),
                               **SCORE["float32"])
    with pytest.raises(RequestError) as e:
        rt.score([{**IDS, "context": "the movie was good"}])
    assert str(e.value) == (f"request 0: model {str(bare)!r} has no tokenizer (none of "
                            f"{', '.join(models.TOKENIZER_FILES)} in its directory): send token "
                            "ids instead of text, or add its tokenizer files")
    bad = rt.score([{**IDS, "context": "text"}, IDS], errors="return")
    assert "has no tokenizer" in bad[0].error and bad[1].error is None


def test_prefix_token_is_bos_else_eos(tiny_dirs, tmp_path):
    from softprompt.runtime.requests import Tokenizer

    tok = Tokenizer.for_model(models.load_model(tiny_dirs["llama"]))
    assert (tok.bos_token_id, tok.eos_token_id, tok.prefix_token_id) == (1, 2, 1)
    no_bos = Tokenizer(None, [2, 7], eos_token_id=7)
    assert no_bos.prefix_token_id == 7 and Tokenizer(None, [9, 4]).prefix_token_id == 4


def test_sliding_window_and_soft_capping_are_refused_at_load(tmp_path):
    from transformers import AutoModelForCausalLM

    def qwen2(**kwargs):  # layer_types recomputed from the window settings
        d = {k: v for k, v in tiny_config("qwen2").to_dict().items() if k != "layer_types"}
        return type(tiny_config("qwen2"))(**{**d, **kwargs})

    cfg = qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert "sliding_attention" in cfg.layer_types
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "sw")
    with pytest.raises(models.ModelError, match=r"^qwen2 config uses sliding-window attention "
                                                r"\(window 16 < 512 positions\)"):
        Runtime.load(tmp_path / "sw", backend="torch")
    # a window as long as the positions never slides, and layers above max_window_layers
    # attend in full: both served
    models.check_architecture(qwen2(use_sliding_window=True, sliding_window=512,
                                    max_window_layers=0))
    models.check_architecture(qwen2(use_sliding_window=True, sliding_window=16,
                                    max_window_layers=2))
    capped = tiny_config("gemma")
    capped.final_logit_softcapping = 30.0
    with pytest.raises(models.ModelError, match="gemma config sets final_logit_softcapping"):
        models.check_architecture(capped)


def test_failed_export_leaves_nothing_a_later_load_finds(tiny_dirs, tmp_path, monkeypatch):
    from softprompt.export import ExportValidationError, export, exporter

    def fail(*args, **kwargs):
        raise ExportValidationError("logits differ by 1.0 (forced by the test)")

    out = tmp_path / "bundles" / "b"
    monkeypatch.setattr(exporter, "validate_bundle", fail)
    with pytest.raises(ExportValidationError, match="forced by the test"):
        export(tiny_dirs["gpt2"], out, progress=False)
    assert list((tmp_path / "bundles").iterdir()) == []  # no bundle, no leftover attempt
    with pytest.raises(models.ModelError, match="is not a model"):
        Runtime.load(out, backend="onnx", bundle_dir=out)

    out.mkdir()  # a bundle already there survives a failed re-export untouched
    (out / "bundle.json").write_text('{"old": true}')
    monkeypatch.setattr(exporter, "_export_graph", fail)
    with pytest.raises(ExportValidationError):
        export(tiny_dirs["gpt2"], out, progress=False)
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == ["b"]
    assert [p.name for p in out.iterdir()] == ["bundle.json"]
    assert (out / "bundle.json").read_text() == '{"old": true}'


def test_tokenizerless_model_exports_and_serves_ids_on_onnx(tmp_path):
    from softprompt.export import export

    _, bare = _no_tokenizer(tmp_path, "gpt2")
    out = export(bare, tmp_path / "bundle", progress=False)
    assert not (out / "tokenizer.json").exists()
    rt, ref = _runtime(out, backend="onnx"), _runtime(bare, backend="torch")
    torch.testing.assert_close(torch.tensor(rt.score([IDS])[0].token_logprobs),
                               torch.tensor(ref.score([IDS])[0].token_logprobs),
                               **SCORE["float32"])
    assert "has no tokenizer" in rt.score([{**IDS, "context": "x"}], errors="return")[0].error
