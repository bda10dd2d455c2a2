"""How far a 4-bit bundle's scores move from its float32 bundle: the demo sets and random requests.

    python -m softprompt.bench.int4_quality FLOAT_BUNDLE INT4_BUNDLE

Both bundles are served side by side in one process (``Runtime.load(..., backend="onnx")``).
On the demo held-out sets, every label's continuation log-prob of every example is scored under
the shipped trained prompt, and the |log-prob change| and both accuracies are reported; on
random requests (``softprompt.export.quantize.drift_requests``, one per seed), the figures of
``quantize.score_drift``; plus both bundles' sizes. Printed as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def compare(float_bundle, int4_bundle, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Side by side, one process: |log-prob change| of ``int4_bundle`` against
    ``float_bundle`` on the demo held-out sets (every label's continuation log-prob of every
    example under the shipped trained prompt, through ``Runtime.score``; accuracy of both) and
    on random requests (``drift_requests`` with each seed); plus both bundles' sizes."""
    from softprompt.export.bundle import load_bundle
    from softprompt.export.quantize import drift_requests, request_logprobs, score_drift
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.demo import PROMPTS_DIR, TASKS, load_examples

    out: dict = {"demo": {}, "random": {}}
    rts = [Runtime.load(str(p), backend="onnx") for p in (float_bundle, int4_bundle)]
    for name, task in TASKS.items():
        examples = load_examples(name, "test")
        reqs = [{"prompt": name, "context": task.format(ex["text"]), "continuation": label}
                for ex in examples for label in task.labels]
        scores, accs = [], []
        for rt in rts:
            rt.add_prompt(name, PROMPTS_DIR / name)
            lp = np.array([r.logprob for r in rt.score(reqs)]).reshape(len(examples), -1)
            gold = np.array([task.label_index(ex["label"]) for ex in examples])
            scores.append(lp)
            accs.append(float((lp.argmax(1) == gold).mean()))
        d = np.abs(scores[1] - scores[0])
        out["demo"][name] = {"examples": len(examples), "scores": int(d.size),
                             "mean_abs_dlogprob": float(f"{d.mean():.3g}"),
                             "max_abs_dlogprob": float(f"{d.max():.3g}"),
                             "accuracy_float32": accs[0], "accuracy_int4": accs[1]}
    bundles = [load_bundle(p) for p in (float_bundle, int4_bundle)]
    for seed in seeds:
        req = drift_requests(bundles[0], seed=seed)
        out["random"][f"seed {seed}"] = score_drift(request_logprobs(bundles[1], req),
                                                    request_logprobs(bundles[0], req))
    out["MiB"] = {str(p): round(sum(f.stat().st_size for f in Path(p).iterdir()) / 2**20, 1)
                  for p in (float_bundle, int4_bundle)}
    return out


def main(argv=None) -> int:
    """``python -m softprompt.bench.int4_quality FLOAT_BUNDLE INT4_BUNDLE``: print ``compare``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.int4_quality",
                                description=compare.__doc__.split("\n\n")[0])
    p.add_argument("float_bundle")
    p.add_argument("int4_bundle")
    args = p.parse_args(argv)
    print(json.dumps(compare(args.float_bundle, args.int4_bundle), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
