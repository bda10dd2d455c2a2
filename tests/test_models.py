"""The model loader: sources, fingerprints, and refusing models whose prefix cannot be cached."""

import pytest

from softprompt.models import loading as models


def _save_config(tmp_path, config):
    config.save_pretrained(tmp_path)
    return tmp_path


def test_encoder_decoder_is_refused(tmp_path):
    from transformers import T5Config

    cfg = T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50)
    with pytest.raises(models.ModelError, match="t5 is an encoder-decoder model: .*cannot be "
                                                "computed once and reused; softprompt serves causal decoders only"):
        models.load_model(_save_config(tmp_path, cfg))


def test_encoder_is_refused(tmp_path):
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, vocab_size=50)
    with pytest.raises(models.ModelError, match="bert is an encoder \\(bidirectional\\) model"):
        models.load_model(_save_config(tmp_path, cfg))


def test_unsupported_decoder_names_supported(tmp_path):
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, vocab_size=50)
    with pytest.raises(models.ModelError, match="model type 'gpt_neox' is not supported; "
                                                "supported causal decoders: llama, gpt2, qwen2, gemma"):
        models.load_model(_save_config(tmp_path, cfg))


def test_not_a_model(tmp_path):
    with pytest.raises(models.ModelError, match="is not a model: expected 'default', a .gguf file"):
        models.load_model(tmp_path)
    with pytest.raises(models.ModelError, match="GGUF file not found"):
        models.load_model(tmp_path / "x.gguf")


def test_fingerprint_tracks_weights_and_dtype_option(tiny_dirs):
    a = models.load_model(tiny_dirs["llama"])
    b = models.load_model(tiny_dirs["llama"], dtype="bfloat16")
    assert a.fingerprint == b.fingerprint  # the source's identity, whatever the compute dtype
    assert str(b.model.dtype) == "torch.bfloat16"
    other = models.load_model(tiny_dirs["qwen2"])
    assert other.fingerprint != a.fingerprint
    with pytest.raises(models.ModelError, match="unknown dtype 'int3'"):
        models.load_model(tiny_dirs["llama"], dtype="int3")


def test_directory_fingerprint_is_remembered_until_a_file_changes(tiny_dirs, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    d = shutil.copytree(tiny_dirs["llama"], tmp_path / "llama")
    first = models.load_model(d).fingerprint
    memos = list((tmp_path / "home" / "fingerprints").glob("*.json"))
    assert len(memos) == 1
    calls = []
    monkeypatch.setattr(models, "fingerprint_files", lambda p, c: calls.append(p) or "recomputed")
    assert models.load_model(d).fingerprint == first and calls == []  # remembered, not rehashed
    weights = d / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file was rewritten
    assert models.load_model(d).fingerprint == "recomputed" and len(calls) == 1
