"""Fault injection: every file the runtime reads is checked before it is served.

Classes covered: safetensors files (lying header lengths, offsets out of range, overlapping
or with gaps, unknown dtypes, trailing bytes, truncation at any byte, bounded memory),
soft-prompt files (pickles, NaN/Inf, wrong adapter_config.json types), prefix-cache files
(edited bytes, relabelled digests, other head count / dtype / model, truncation: nothing
loaded), and bundles (a 4 KiB flip in the weights, malformed bundle.json values, sizes that
disagree with the graph, the verification record's fast path).
"""

import json
import os
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from softprompt.export import BundleError, load_bundle
from softprompt.export import bundle as bundle_mod
from softprompt.runtime.cache import CacheError, PrefixCache, PrefixEntry, _checksum
from softprompt.runtime.prompts import SoftPrompt, SoftPromptError
from softprompt.runtime.safetensors_np import SafetensorsError, load_file, save_file

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def split(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def rewrite(path, edit):
    """Apply ``edit(header)`` to a safetensors file's header, keeping its data bytes."""
    header, data = split(path)
    edit(header)
    write(path, header, data)


# ------------------------------------------------------------------------- safetensors
ARRAYS = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=6).filter(lambda s: s != "__metadata__"),
    hnp.arrays(st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    max_size=4)


@FAST
@given(ARRAYS, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_safetensors_round_trip_matches_the_library(tmp_path, tensors, meta):
    """What save_file writes, the safetensors library reads identically, and so does load_file."""
    from safetensors.numpy import load_file as lib_load

    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata=meta)
    got, got_meta = load_file(path)
    lib = lib_load(str(path))
    assert sorted(got) == sorted(lib) == sorted(tensors) and got_meta == meta
    for name, a in tensors.items():
        np.testing.assert_array_equal(got[name], a)
        np.testing.assert_array_equal(lib[name], a)
        assert got[name].dtype == a.dtype and got[name].shape == a.shape


def _valid_file(path):
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)},
              path, metadata={"k": "v"})
    return path.read_bytes()


@FAST
@given(st.data())
def test_safetensors_truncation_and_trailing_bytes_always_refused(tmp_path, data):
    raw = _valid_file(tmp_path / "t.safetensors")
    cut = data.draw(st.integers(0, len(raw) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=64))
    for bad, message in ((raw[:cut], "shorter than|header claims|truncated|not valid JSON"),
                         (raw + junk, "trailing bytes")):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(SafetensorsError, match=message):
            load_file(tmp_path / "bad.safetensors")


@FAST
@given(st.data())
def test_safetensors_header_corruption_is_refused_or_read_as_the_library_does(tmp_path, data):
    """Any byte of the header changed: SafetensorsError (never another exception), or a file
    the safetensors library reads to the same arrays."""
    from safetensors.numpy import load_file as lib_load

    raw = bytearray(_valid_file(tmp_path / "t.safetensors"))
    (n,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, 8 + n - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(raw))
    try:
        got, _ = load_file(path)
    except SafetensorsError:
        return
    lib = lib_load(str(path))
    assert sorted(got) == sorted(lib)
    for name in got:
        np.testing.assert_array_equal(got[name], lib[name])


def _one_tensor_header(**info):
    base = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    return {"t": {**base, **info}}


@pytest.mark.parametrize("header, data, message", [
    (_one_tensor_header(dtype="F8"), 16, r"unsupported dtype 'F8'"),
    (_one_tensor_header(shape=[2, -2]), 16, r"shape \[2, -2\] is not a list of sizes >= 0"),
    (_one_tensor_header(shape=[2, True]), 16, r"is not a list of sizes >= 0"),
    (_one_tensor_header(shape=[3, 2]), 16, r"F32 \[3, 2\] needs 24 bytes but its data_offsets span 16"),
    (_one_tensor_header(data_offsets=[8, 0]), 16, r"not \[start, end\] with 0 <= start <= end"),
    (_one_tensor_header(data_offsets=[0, 16], extra=1), 16, "exactly dtype, shape and data_offsets"),
    (_one_tensor_header(), 8, r"tensors need 16 data bytes but the file has 8 \(truncated"),
    (_one_tensor_header(), 20, "4 trailing bytes after the last tensor"),
    (_one_tensor_header(data_offsets=[4, 20]), 20, r"\[4, 20\] leaves a gap after byte 0"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "overlaps the previous tensor"),
    ({**_one_tensor_header(), "__metadata__": {"k": 1}}, 16, "__metadata__ must map strings to strings"),
    ([1, 2], 0, "header is a JSON list, expected an object"),
])
def test_safetensors_malformed_headers(tmp_path, header, data, message):
    write(tmp_path / "t.safetensors", header, bytes(data))
    with pytest.raises(SafetensorsError, match=message):
        load_file(tmp_path / "t.safetensors")


def test_safetensors_duplicate_key_and_huge_header_length(tmp_path):
    p = tmp_path / "t.safetensors"
    h = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\x00")
    with pytest.raises(SafetensorsError, match="header repeats the key 't'"):
        load_file(p)
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsError, match=r"header length 1099511627776 exceeds the limit"):
        load_file(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsError, match="header claims 1000 bytes but the file has 2"):
        load_file(p)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_safetensors_memory_is_bounded_by_what_is_read(tmp_path):
    """A 16 MiB file whose header lies costs its header, not its size; a valid one costs one
    copy of its tensors (the old reader held the whole file plus the copy: 2x), or none
    memory-mapped with copy=False."""
    mib16 = 1 << 24
    good = tmp_path / "good.safetensors"
    save_file({"big": np.ones(mib16 // 4, np.float32)}, good)
    lying = tmp_path / "lying.safetensors"
    header, data = split(good)
    header["big"].update(shape=[mib16 // 2], data_offsets=[0, 2 * mib16])  # past EOF
    write(lying, header, data)

    def refused():
        with pytest.raises(SafetensorsError, match="truncated"):
            load_file(lying)

    assert _peak(refused) < 1 << 20
    assert _peak(lambda: load_file(good)) < 1.1 * mib16
    mapped = {}
    assert _peak(lambda: mapped.update(load_file(good, copy=False)[0])) < 1 << 20
    arr = mapped["big"]
    assert not arr.flags.writeable and not arr.flags.owndata and float(arr[-1]) == 1.0


# ------------------------------------------------------------------------ soft prompts
def test_prompt_safetensors_trailing_bytes_and_nan_are_refused(tmp_path):
    emb = np.ones((3, 8), np.float32)
    p = tmp_path / "p.safetensors"
    save_file({"prompt_embeddings": emb}, p)
    p.write_bytes(p.read_bytes() + b"\x00" * 8)
    with pytest.raises(SoftPromptError, match="p.safetensors: corrupt or truncated.*8 trailing bytes"):
        SoftPrompt.load(p)
    emb[1, 2] = np.inf
    save_file({"prompt_embeddings": emb}, p)
    with pytest.raises(SoftPromptError, match=r"p.safetensors: .*NaN/Inf values \(virtual tokens \[1\]\)"):
        SoftPrompt.load(p)
    save_file({"prompt_embeddings": np.zeros((0, 8), np.float32)}, p)
    with pytest.raises(SoftPromptError, match="p.safetensors: .*0 virtual tokens"):
        SoftPrompt.load(p)


def test_prompt_reads_only_its_tensor(tmp_path):
    """An adapter file with a large unrelated tensor costs only the prompt's bytes."""
    p = tmp_path / "p.safetensors"
    save_file({"prompt_embeddings": np.ones((4, 8), np.float32),
               "unrelated": np.zeros(1 << 22, np.float32)}, p)
    got = []
    assert _peak(lambda: got.append(SoftPrompt.load(p))) < 1 << 20
    assert got[0].embeddings.shape == (4, 8)


@FAST
@given(hnp.arrays(st.sampled_from([np.float32, np.float16, np.float64]),
                  st.tuples(st.integers(1, 5), st.integers(1, 6)),
                  elements=st.floats(-1e3, 1e3, width=16)),
       st.booleans())
def test_npy_prompts_round_trip(tmp_path, arr, fortran):
    arr = np.asfortranarray(arr) if fortran else arr
    np.save(tmp_path / "p.npy", arr)
    np.testing.assert_array_equal(SoftPrompt.load(tmp_path / "p.npy").embeddings,
                                  arr.astype(np.float32))


def test_npy_pickles_wrong_dtypes_and_trailing_bytes_are_refused(tmp_path):
    p = tmp_path / "p.npy"
    np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SoftPromptError, match="got object \\(pickled objects are never loaded\\)"):
        SoftPrompt.load(p)
    p.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(SoftPromptError, match="corrupt or truncated .npy \\(bad header"):
        SoftPrompt.load(p)
    np.save(p, np.zeros((2, 4), np.int32))
    with pytest.raises(SoftPromptError, match="must hold floating point values, got int32"):
        SoftPrompt.load(p)
    np.save(p, np.zeros((2, 4), np.float32))
    p.write_bytes(p.read_bytes() + b"junk")
    with pytest.raises(SoftPromptError, match=r"4 trailing bytes: float32 \[2, 4\] needs 32"):
        SoftPrompt.load(p)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(SoftPromptError, match=r"\(truncated: float32 \[2, 4\] needs 32 data bytes, file has 26\)"):
        SoftPrompt.load(p)
    np.save(p, np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(SoftPromptError, match="p.npy: .*NaN/Inf"):
        SoftPrompt.load(p)


def _adapter(tmp_path, **overrides):
    d = tmp_path / "adapter"
    shutil.rmtree(d, ignore_errors=True)
    SoftPrompt.random(4, 8, seed=0).save_peft(d, base_model_name_or_path="tiny-llama")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(overrides)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("overrides, message", [
    ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be int or null, got str '4'"),
    ({"num_virtual_tokens": 4.0}, "num_virtual_tokens must be int or null, got float 4.0"),
    ({"num_virtual_tokens": True}, "num_virtual_tokens must be int or null, got bool True"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be >= 1, got 0"),
    ({"num_virtual_tokens": 5}, "has 4 rows but adapter_config.json says num_virtual_tokens=5"),
    ({"token_dim": 16}, "has 8 columns but adapter_config.json says token_dim=16"),
    ({"num_transformer_submodules": "1"}, "num_transformer_submodules must be int or null"),
    ({"peft_type": ["PROMPT_TUNING"]}, "peft_type must be str or null, got list"),
    ({"peft_type": "PREFIX_TUNING"}, "num_layers must be an integer >= 1, got None"),
    ({"peft_type": "ADAPTION_PROMPT"}, "'ADAPTION_PROMPT' adapter, which is not served"),
    ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be str or null"),
])
def test_adapter_config_values(tmp_path, overrides, message):
    with pytest.raises(SoftPromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SoftPrompt.load(_adapter(tmp_path, **overrides))


def test_adapter_config_not_an_object_and_extra_tensor_junk(tmp_path):
    d = _adapter(tmp_path)
    (d / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(SoftPromptError, match="adapter_config.json: holds a JSON list, expected an object"):
        SoftPrompt.load(d)
    d = _adapter(tmp_path)
    w = d / "adapter_model.safetensors"
    rewrite(w, lambda h: h["prompt_embeddings"].update(dtype="I32"))
    with pytest.raises(SoftPromptError, match="floating point, got int32"):
        SoftPrompt.load(d)


# ------------------------------------------------------------------------ prefix cache
FP = "f" * 64
GEOMETRY = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "vocab_size": 8}


def entry(p, seed, hkv=2, dtype=np.float32):
    """N=2 layers of K/V [Hkv, P, D=4] + first log-probs [V=8]."""
    rng = np.random.default_rng(seed)
    kv = [rng.standard_normal((hkv, p, 4)).astype(dtype) for _ in range(4)]
    return PrefixEntry(kv[:2], kv[2:], np.log(np.full(8, 1 / 8, np.float32)))


def saved_cache(path, dtype="float32", **entries):
    """A cache file with one entry per digest=P (seeded by its index) and the cache that wrote it."""
    cache = PrefixCache(fingerprint=FP, dtype=dtype)
    for i, (digest, p) in enumerate(entries.items()):
        cache.get_or_compute(digest, lambda p=p, i=i: entry(p, seed=i))
    cache.save(path)
    return cache


def recompute_checksum(path, i):
    """Make entry i's sha256 agree with the (edited) file again, as a forger would."""
    arrays, meta = load_file(path)
    info = json.loads(meta[f"entry{i}"])
    t = {k[len(f"{i}."):]: a for k, a in arrays.items() if k.startswith(f"{i}.")}
    info["sha256"] = _checksum(info, meta["fingerprint"], meta["dtype"], t)
    rewrite(path, lambda h: h["__metadata__"].update({f"entry{i}": json.dumps(info)}))


def edit_record(i, **changes):
    def edit(h):
        info = json.loads(h["__metadata__"][f"entry{i}"])
        info.update(changes)
        h["__metadata__"][f"entry{i}"] = json.dumps(info)
    return edit


def assert_refused_and_nothing_loaded(path, message, **cache_kwargs):
    cache = PrefixCache(fingerprint=FP, **cache_kwargs)
    cache.get_or_compute("z" * 64, lambda: entry(2, seed=9))
    before = cache.stats()
    with pytest.raises(CacheError, match=message):
        cache.load(path)
    assert cache.stats() == before and len(cache) == 1


A, B = "a" * 64, "b" * 64


def test_cache_relabelled_to_another_prompt_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    saved_cache(path, **{A: 3, B: 5})
    rewrite(path, edit_record(0, digest=B))  # A's prefix claimed for B (and B twice)
    assert_refused_and_nothing_loaded(path, r"entry 0 \(prompt bbbbbbbbbbbb\): sha256 .* altered")
    saved_cache(path, **{A: 3, B: 3})

    def swap(h):  # same P: the records of A and B swapped, tensors left in place
        m = h["__metadata__"]
        m["entry0"], m["entry1"] = m["entry1"], m["entry0"]
    rewrite(path, swap)
    assert_refused_and_nothing_loaded(path, r"entry 0 .*sha256")


@FAST
@given(st.data())
def test_cache_any_flipped_data_byte_is_refused(tmp_path, data):
    path = tmp_path / "c.safetensors"
    saved_cache(path, **{A: 3, B: 2})
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    at = data.draw(st.integers(8 + n, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    assert_refused_and_nothing_loaded(path, r"entry [01] .*sha256|NaN/Inf")


@FAST
@given(st.data())
def test_cache_truncated_anywhere_loads_nothing(tmp_path, data):
    path = tmp_path / "c.safetensors"
    saved_cache(path, **{A: 3})
    raw = path.read_bytes()
    path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    assert_refused_and_nothing_loaded(path, "cannot load prefix cache")


def test_cache_other_head_count_dtype_and_model(tmp_path):
    path = tmp_path / "c.safetensors"
    saved_cache(path, **{A: 3})

    def reshape(h):  # K of layer 0 relabelled [2, 3, 4] -> [4, 3, 2]: same bytes
        h["0.0.k"]["shape"] = [4, 3, 2]
    rewrite(path, reshape)
    assert_refused_and_nothing_loaded(path, r"tensor 0.0.k is float32 \[4, 3, 2\], its record says float32 \[2, 3, 4\]")
    rewrite(path, edit_record(0, num_kv_heads=4, head_dim=2))
    assert_refused_and_nothing_loaded(path, "tensor 0.0.v is float32")
    # a forger who rewrites every shape and the checksum still meets the model's geometry
    cache = PrefixCache(fingerprint=FP)
    cache.get_or_compute(A, lambda: entry(3, seed=1, hkv=4))
    cache.save(path)
    assert_refused_and_nothing_loaded(path, r"geometry .*'num_kv_heads': 4.* differs from this model's .*'num_kv_heads': 2",
                                      geometry=GEOMETRY)
    saved_cache(path, **{A: 3})
    assert_refused_and_nothing_loaded(path, "was made for model ffffffffffff float32, not ffffffffffff float16",
                                      dtype="float16")
    with pytest.raises(CacheError, match="was made for model ffffffffffff float32, not other float32"):
        PrefixCache(fingerprint="other").load(path)

    def f16(h):  # K of layer 0 read as float16: twice the values, same bytes
        h["0.0.k"].update(dtype="F16", shape=[2, 3, 8])
    rewrite(path, f16)
    assert_refused_and_nothing_loaded(path, r"0.0.k is float16 \[2, 3, 8\], its record says float32 \[2, 3, 4\]")


def test_cache_forged_nan_extra_tensor_and_old_format(tmp_path):
    path = tmp_path / "c.safetensors"
    saved_cache(path, **{A: 3, B: 2})
    _, data = split(path)
    header, _ = split(path)
    start = header["1.1.v"]["data_offsets"][0]
    write(path, header, data[:start] + np.float32(np.nan).tobytes() + data[start + 4:])
    recompute_checksum(path, 1)  # checksum right, values not
    assert_refused_and_nothing_loaded(path, "entry 1: tensor 1.1.v holds NaN/Inf")
    saved_cache(path, **{A: 3})
    header, data = split(path)
    header["x"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(data), len(data) + 1]}
    write(path, header, data + b"\x00")
    assert_refused_and_nothing_loaded(path, "1 tensors belong to no entry")
    rewrite(path, lambda h: h["__metadata__"].pop("format"))
    assert_refused_and_nothing_loaded(path, "not a softprompt prefix cache")
    saved_cache(path, **{A: 3})
    rewrite(path, edit_record(0, num_layers="2"))
    assert_refused_and_nothing_loaded(path, "entry 0: num_layers must be an integer >= 1, got '2'")


def test_cache_round_trip_keeps_every_value_and_order(tmp_path):
    path = tmp_path / "c.safetensors"
    src = saved_cache(path, **{A: 3, B: 5})
    warm = PrefixCache(fingerprint=FP, geometry=GEOMETRY)
    assert warm.load(path) == 2 and warm.stats().misses == 0
    for d in (A, B):
        want, got = src.get_or_compute(d, None), warm.get_or_compute(d, None)
        for w, g in zip((*want.keys, *want.values, want.first_logprobs),
                        (*got.keys, *got.values, got.first_logprobs)):
            np.testing.assert_array_equal(g, w)
            assert g.flags.writeable  # copied out of the read-only memory map


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_runtime_refuses_tampered_cache_and_serves_unchanged(tiny_dirs, tiny_bundles, tmp_path,
                                                             backend):
    """End to end (tiny Llama; torch tensors or numpy arrays in the cache): prompt A's prefix
    relabelled as prompt B's is refused, and B still scores exactly as before."""
    from softprompt.runtime.api import Runtime

    model = str((tiny_bundles if backend == "onnx" else tiny_dirs)["llama"])
    rt = Runtime.load(model, backend=backend)
    E = rt.backend.hidden_size
    a, b = SoftPrompt.random(3, E, seed=1), SoftPrompt.random(3, E, seed=2)
    rt.add_prompt("a", a)
    rt.add_prompt("b", b)
    req = [{"prompt": "b", "context": [5, 6, 7], "continuation": [8, 9]}]
    want = rt.score(req)[0].logprob
    path = tmp_path / "cache.safetensors"
    assert rt.save_cache(path) == 2
    header, _ = split(path)
    i = [k for k in ("entry0", "entry1") if json.loads(header["__metadata__"][k])["digest"] == a.digest][0]
    rewrite(path, edit_record(int(i[-1]), digest=b.digest))
    fresh = Runtime.load(model, backend=backend)
    with pytest.raises(CacheError, match="sha256 of its record and tensors differs"):
        fresh.load_cache(path)
    fresh.add_prompt("b", b)
    assert fresh.score(req)[0].logprob == pytest.approx(want, abs=1e-5)
    assert fresh.stats().cache.misses == 1  # computed, not taken from the file


# ----------------------------------------------------------------------------- bundles
@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def bundle(tiny_bundles, tmp_path, home):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["llama"], dst)
    return dst


def count_hashes(monkeypatch):
    calls = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a: calls.append(p.name) or real(p, *a))
    return calls


def flip_4k(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + 4096] = bytes(x ^ 0xFF for x in data[at:at + 4096])
    path.write_bytes(bytes(data))


def test_bundle_weights_flip_refused_on_first_load(bundle):
    flip_4k(bundle / "model.onnx.data")
    with pytest.raises(BundleError, match=r"bundle/model.onnx.data: sha256 .* differs .* corrupt"):
        load_bundle(bundle)


def test_bundle_verification_record_fast_path(bundle, home, monkeypatch):
    calls = count_hashes(monkeypatch)
    load_bundle(bundle)
    assert "model.onnx.data" in calls and len(list((home / "verified").iterdir())) == 1
    calls.clear()
    load_bundle(bundle)
    assert calls == []  # unchanged since verified: nothing re-hashed
    load_bundle(bundle, verify="full")
    assert sorted(calls) == sorted(json.loads((bundle / "bundle.json").read_text())["files"])
    # changed in place with size and mtime restored: the ctime differs, so it is re-hashed
    w = bundle / "model.onnx.data"
    st_ = w.stat()
    flip_4k(w, at=0)
    os.utime(w, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    calls.clear()
    with pytest.raises(BundleError, match="model.onnx.data: sha256"):
        load_bundle(bundle)
    assert calls[-1] == "model.onnx.data"


def _edit_manifest(bundle, edit):
    m = json.loads((bundle / "bundle.json").read_text())
    edit(m)
    (bundle / "bundle.json").write_text(json.dumps(m))


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", "2", r"num_layers must be an integer >= 1, got '2'"),
    ("num_kv_heads", 0, r"num_kv_heads must be an integer >= 1, got 0"),
    ("num_heads", 3, r"num_heads 3 is not a multiple of num_kv_heads 2"),
    ("hidden_size", True, r"hidden_size must be an integer >= 1, got True"),
    ("dtype", "bfloat16", r"dtype 'bfloat16' is not one of"),
    ("input_names", "inputs_embeds", r"input_names must be a list of strings"),
    ("eos_token_ids", [1, "2"], r"eos_token_ids must be a list of integers >= 0 or null"),
    ("files", [], r"files must be an object"),
    ("validation", "passed", r"validation must be an object or null"),
    ("format_version", True, r"format_version True is not supported"),
    ("num_layers", 3, r"input/output names do not follow the 3-layer contract"),
    ("num_kv_heads", 1, r"model.onnx: graph 'past_key_values.0.key' has size 2 on axis 1 but bundle.json says num_kv_heads=1"),
    ("head_dim", 8, r"graph 'past_key_values.0.key' has size \d+ on axis 3 but bundle.json says head_dim=8"),
    ("vocab_size", 7, r"graph 'logits' has size \d+ on axis 2 but bundle.json says vocab_size=7"),
    ("hidden_size", 8, r"graph 'inputs_embeds' has size \d+ on axis 2 but bundle.json says hidden_size=8"),
])
def test_bundle_manifest_values(bundle, key, value, message):
    _edit_manifest(bundle, lambda m: m.update({key: value}))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_bundle_files_entries(bundle):
    files = json.loads((bundle / "bundle.json").read_text())["files"]

    def cases():
        yield {**files, "../../etc/passwd": files["model.onnx"]}, "files lists '../../etc/passwd'; expected a plain file name"
        yield {**files, "/etc/passwd": files["model.onnx"]}, "files lists '/etc/passwd'"
        yield {**files, "model.onnx": {"size": 1, "sha256": "xyz"}}, r"files\['model.onnx'\] must be"
        yield {**files, "model.onnx": {**files["model.onnx"], "size": -1}}, r"files\['model.onnx'\] must be"
        yield {k: v for k, v in files.items() if k != "model.onnx.data"}, "'files' does not list model.onnx.data"
        yield {k: v for k, v in files.items() if k != "tokenizer.json"}, "'files' does not list tokenizer.json"
    for value, message in cases():
        _edit_manifest(bundle, lambda m: m.update(files=value))
        with pytest.raises(BundleError, match=message):
            load_bundle(bundle)
    (bundle / "bundle.json").write_text("[]")
    with pytest.raises(BundleError, match="bundle.json: holds a JSON list, expected an object"):
        load_bundle(bundle)


def test_bundle_pickled_embeddings_refused_even_with_a_matching_hash(bundle):
    import pickle

    emb = bundle / "embeddings.npy"  # a .npy header over a pickle, listed with its true hash
    np.save(emb, np.array([np.zeros(3)], dtype=object), allow_pickle=True)
    raw = emb.read_bytes()
    assert isinstance(pickle.loads(raw[raw.index(b"\n") + 1:]), np.ndarray)
    entry = bundle_mod.file_entry(emb)
    _edit_manifest(bundle, lambda m: m["files"].update({"embeddings.npy": entry}))
    with pytest.raises(BundleError, match="embeddings.npy: not a plain .npy array"):
        load_bundle(bundle)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                            "hidden_size", "vocab_size", "max_position_embeddings", "dtype",
                            "fingerprint", "eos_token_ids", "bos_token_id", "files",
                            "input_names", "validation", "format_version"]),
       value=st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.text(max_size=4),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                          max_leaves=4),
       drop=st.booleans())
def test_bundle_any_bad_manifest_value_gives_a_one_line_error(bundle, key, value, drop):
    """Whatever value (or absence) a key takes, loading succeeds or raises one-line BundleError."""
    original = (bundle / "bundle.json").read_text()
    try:
        _edit_manifest(bundle, lambda m: m.pop(key) if drop else m.update({key: value}))
        try:
            load_bundle(bundle)
        except BundleError as e:
            assert "\n" not in str(e) and "bundle" in str(e)
    finally:
        (bundle / "bundle.json").write_text(original)


@pytest.mark.slow
def test_default_bundle_weights_flip_refused(tmp_path, monkeypatch):
    """The real default bundle (540 MB of weights): a copy with 4 KiB flipped is refused on
    its first load; the intact copy is hashed once, then trusted by its record."""
    from softprompt.export import bundle_for

    src = bundle_for("default")
    monkeypatch.setenv("SOFTPROMPT_HOME", str(tmp_path / "home"))
    dst = tmp_path / "default"
    dst.mkdir()
    for f in src.iterdir():  # small files symlinked (their content is what is hashed)
        if f.name == "model.onnx.data":
            shutil.copyfile(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    calls = count_hashes(monkeypatch)
    b = load_bundle(dst)
    assert "model.onnx.data" in calls and b.num_layers == 30
    calls.clear()
    del b
    load_bundle(dst)
    assert calls == []
    flip_4k(dst / "model.onnx.data")
    with pytest.raises(BundleError, match=r"default/model.onnx.data: sha256 .* differs"):
        load_bundle(dst)
