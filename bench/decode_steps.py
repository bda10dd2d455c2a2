"""One decode step on a bundle's own graph against its decode graph (in place), side by side.

    python -m softprompt.bench.decode_steps [--bundles A,B] [--B 1,8,32] [--past 64,1024]
                                            [--rounds 4] [--dtypes float32,bfloat16]

For each bundle (default: the default model's float32 bundle and, when exported, its exact 4-bit
sibling), each batch size B and past length: ``Bundle.run`` on a dense past ``[B, Hkv, past, D]``
(the graph concatenates it with the new key into ``present``, one copy of the past per step)
and ``DecodeGraph.run`` on packed buffers of capacity past + 1 (GroupQueryAttention writes the
new key in place), random K/V, one token per row. The two alternate in blocks of 4 timed
steps after an untimed one, for ``--rounds`` rounds, so a burst of other load hits both and
each is timed as generation runs it, many steps on one session (the first step after the other
session's competes with that one's spinning ONNX Runtime thread pool: measured up to 1.8x
slower). Printed: median and min-max ms per step, the in-place step's speed-up on the
medians, and the resident memory the decode graph adds (before/after opening it, anonymous
and file-backed apart: a weights file mapped again is counted again but held once).

``--dtypes`` with ``bfloat16``: each float32 bundle also under OpenVINO in bfloat16, its graph
(``Bundle.run``, float32 past) against ``OpenVinoDecoder.run`` (packed bfloat16 buffers of
capacity past + 1, the new column written in place by the host).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB: a file's pages mapped twice (two sessions reading one
    weights file) are counted twice in the second but held once."""
    with open("/proc/self/status") as f:
        status = f.read()
    return tuple(int(status.split(k + ":")[1].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def default_bundles() -> list[str]:
    from softprompt.export import bundle_for

    out = [str(bundle_for("default", dtype="fp32", weights="float"))]
    int4 = bundle_for("default", dtype="fp32", weights="int4", create=False)
    return out + ([str(int4)] if int4 is not None else [])


def run(bundles: list[str], batches: list[int], pasts: list[int], rounds: int, block: int = 4,
        log=print, dtypes: tuple[str, ...] = ("float32",)) -> None:
    from softprompt.export.bundle import read_manifest

    for path in bundles:
        for dtype in dtypes:
            if dtype == "bfloat16" and read_manifest(Path(path)).get("quantization"):
                continue  # OpenVINO serves the float32 graph in bfloat16
            _one_bundle(path, batches, pasts, rounds, block, log, dtype)
            gc.collect()  # its sessions go before the next one's resident-memory figure


def _time(calls: dict, rounds: int, block: int) -> dict[str, list[float]]:
    """ms per call: rounds of, per call in turn, one untimed call then ``block`` timed ones."""
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(block + 1):
                t = time.perf_counter()
                call()
                if i:
                    ts[name].append((time.perf_counter() - t) * 1e3)
    return ts


def _one_bundle(path: str, batches: list[int], pasts: list[int], rounds: int, block: int,
                log, dtype: str = "float32") -> None:
    from softprompt.export.bundle import load_bundle
    from softprompt.export.decode_graph import DecodeGraph
    from softprompt.export.ov_session import OpenVinoDecoder, to_bfloat16_bits

    bf16 = dtype == "bfloat16"
    b = load_bundle(path, compute_dtype="bfloat16" if bf16 else None)
    before = _rss_mb()
    g = OpenVinoDecoder.open(b) if bf16 else DecodeGraph.open(b)
    anon, file = (a - b for a, b in zip(_rss_mb(), before))
    log(f"{path} ({'OpenVINO bfloat16' if bf16 else 'ONNX Runtime float32'}): decode graph "
        f"opened, +{anon:.0f} MB resident anonymous, +{file:.0f} MB file-backed")
    rng = np.random.default_rng(0)
    for n in batches:
        for past in pasts:
            shape = (n, b.num_kv_heads, past, b.head_dim)
            kv = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
                  for _ in range(b.num_layers)]
            room = [tuple(np.pad(to_bfloat16_bits(a) if bf16 else a, ((0, 0), (0, 0), (0, 1), (0, 0)))
                          for a in (k, v)) for k, v in kv]
            emb = b.embeddings[rng.integers(0, b.vocab_size, (n, 1))].astype(np.float32)
            lens = np.full(n, past)
            mask, pos, idx = np.ones((n, past + 1), np.int64), lens[:, None], np.zeros((n, 1), np.int64)
            ts = _time({"graph": lambda: b.run(emb, mask, pos, kv, idx),
                        "in place": lambda: g.run(emb, lens, room)}, rounds, block)
            med = {k: float(np.median(v)) for k, v in ts.items()}
            log(f"  B={n:<3d} past={past:<5d} " + "  ".join(
                f"{k} {med[k]:6.2f} ms ({min(v):.2f}-{max(v):.2f})" for k, v in ts.items())
                + f"  in place {med['graph'] / med['in place']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundles", help="comma-separated bundle directories (default: the default "
                   "model's float32 bundle and its 4-bit sibling when exported)")
    p.add_argument("--B", type=_ints, default=[1, 8, 32])
    p.add_argument("--past", type=_ints, default=[64, 1024])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32 (ONNX Runtime), "
                   "bfloat16 (OpenVINO, the float32 bundles)")
    args = p.parse_args(argv)
    import onnxruntime

    from softprompt.machine import cpu_model, matrix_units

    print(f"cpu: {cpu_model()} ({matrix_units()}), onnxruntime {onnxruntime.__version__}")
    run(args.bundles.split(",") if args.bundles else default_bundles(), args.B, args.past, args.rounds,
        dtypes=tuple(args.dtypes.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
