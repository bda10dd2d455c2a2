"""One decode step on a bundle's own graph against its decode graph (in place), side by side.

    python -m softprompt.bench.decode_steps [--bundles A,B] [--B 1,8,32] [--past 64,1024]
                                            [--rounds 4]

For each bundle (default: the default model's float32 bundle and, when exported, its exact 4-bit
sibling), each batch size B and past length: ``Bundle.run`` on a dense past ``[B, Hkv, past, D]``
(the graph concatenates it with the new key into ``present``, one copy of the past per step)
and ``DecodeGraph.run`` on packed buffers of capacity past + 1 (GroupQueryAttention writes the
new key in place), random K/V, one token per row. The two alternate in blocks of 4 timed
steps after an untimed one, for ``--rounds`` rounds, so a burst of other load hits both and
each is timed as generation runs it, many steps on one session (the first step after the other
session's competes with that one's spinning ONNX Runtime thread pool: measured up to 1.8x
slower). Printed: median and min-max ms per step, the in-place step's speed-up on the
medians, and the resident memory the decode graph adds (RSS before/after opening it).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def default_bundles() -> list[str]:
    from softprompt.export import bundle_for

    out = [str(bundle_for("default", dtype="fp32", weights="float"))]
    int4 = bundle_for("default", dtype="fp32", weights="int4", create=False)
    return out + ([str(int4)] if int4 is not None else [])


def run(bundles: list[str], batches: list[int], pasts: list[int], rounds: int, block: int = 4,
        log=print) -> None:
    for path in bundles:
        _one_bundle(path, batches, pasts, rounds, block, log)
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
                log) -> None:
    from softprompt.export.bundle import load_bundle
    from softprompt.export.decode_graph import DecodeGraph

    b = load_bundle(path)
    before = _rss_mb()
    g = DecodeGraph.open(b)
    log(f"{path}: decode graph opened, +{_rss_mb() - before:.0f} MB resident")
    rng = np.random.default_rng(0)
    for n in batches:
        for past in pasts:
            shape = (n, b.num_kv_heads, past, b.head_dim)
            kv = [(rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
                  for _ in range(b.num_layers)]
            room = [(np.pad(k, ((0, 0), (0, 0), (0, 1), (0, 0))),
                     np.pad(v, ((0, 0), (0, 0), (0, 1), (0, 0)))) for k, v in kv]
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
    args = p.parse_args(argv)
    import onnxruntime

    from softprompt.machine import cpu_model, matrix_units

    print(f"cpu: {cpu_model()} ({matrix_units()}), onnxruntime {onnxruntime.__version__}")
    run(args.bundles.split(",") if args.bundles else default_bundles(), args.B, args.past, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
