"""Where export/validate.py's ROUNDED_DRIFT_RATIO comes from: how far round-to-nearest 4-bit
weights move a model's top-1 log-probs, next to how far broken graphs move them.

    python -m softprompt.bench.int4_bound                       # the default model, ~3 min on 2 cores
    python -m softprompt.bench.int4_bound --model DIR --shift 0 # a float model of your own

Simulated in PyTorch on the validation's own shapes (validate.VALIDATION_CASES: random prompt
vectors scaled like the embedding table, random token ids), each linear layer but the vocabulary
projection replaced by its 4-bit round-to-nearest copy (export/quantize.py's ``rtn_blocks``,
llama.cpp's Q4_1 rounding, blocks of 32 along K). The default model's weights already lie on a
Q4_1 grid (they are dequantised GGUF blocks, so rounding them again is exact): ``--shift 16``
(the default) rounds blocks shifted 16 columns off that grid, a second genuine rounding. Printed
per variant: max and mean |change of PyTorch's top-1 log-prob|, the mean that constant logits
would show (|top-1 log-prob + log V|), and their ratio, the figure the bound reads; then the
same for the first decoder layer zeroed and for constant logits.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def top1_drift(ref: list, got: list, vocab: int) -> dict:
    """{max, mean, null, ratio}: |got - ref| of ref's top-1 log-prob over every position, and
    the mean |top-1 log-prob + log V| constant logits would show."""
    import torch

    d, null = [], []
    for r, g in zip(ref, got):
        top = r.argmax(-1, keepdim=True)
        d.append((g.gather(-1, top) - r.gather(-1, top)).abs().flatten())
        null.append((r.gather(-1, top) + np.log(vocab)).abs().flatten())
    d, null = torch.cat(d), torch.cat(null)
    return {"max": float(d.max()), "mean": float(d.mean()), "null": float(null.mean()),
            "ratio": float(d.mean() / null.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="what load_model takes (default: %(default)s)")
    p.add_argument("--shift", type=int, default=16, help="columns the 4-bit blocks are shifted by "
                   "(default 16: off a GGUF grid; 0 for a float model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from softprompt.export import quantize as q
    from softprompt.export.validate import ROUNDED_DRIFT_RATIO, VALIDATION_CASES, clip_case
    from softprompt.models import load_model

    print(f"# reproduce: python -m softprompt.bench.int4_bound --model {args.model} --shift {args.shift} "
          f"--seed {args.seed}")
    lm = load_model(args.model, dtype="float32", device="cpu")
    model = lm.model.eval()
    table = model.get_input_embeddings().weight.detach()
    vocab = model.get_output_embeddings().weight.shape[0]
    scale = float(table[:4096].std())
    rng = np.random.default_rng(args.seed)
    inputs = []
    for case in VALIDATION_CASES:
        B, L, P = clip_case(*case, getattr(model.config, "max_position_embeddings", None))
        prompt = torch.from_numpy((rng.standard_normal((B, P, table.shape[1])) * scale).astype(np.float32))
        inputs.append(torch.cat([prompt, table[torch.from_numpy(rng.integers(0, vocab, (B, L)))]], 1))

    def logprobs(constant: bool = False) -> list:
        with torch.no_grad():
            out = [model(inputs_embeds=x).logits.float().log_softmax(-1) for x in inputs]
        return [torch.full_like(o, -np.log(vocab)) for o in out] if constant else out

    head = model.get_output_embeddings().weight
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not head]
    saved = [m.weight.detach().clone() for m in linear]
    ref = logprobs()
    rows = []
    for m, w in zip(linear, saved):
        shifted = torch.roll(w, args.shift, 1).numpy()
        m.weight.data = torch.roll(torch.from_numpy(q.rtn_blocks(shifted).dequantize()), -args.shift, 1)
    rows.append((f"4-bit round-to-nearest (blocks shifted by {args.shift})", top1_drift(ref, logprobs(), vocab)))
    for m, w in zip(linear, saved):
        m.weight.data = w.clone()
    first = model.model.layers[0]
    for m in first.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data.zero_()
    rows.append(("first decoder layer zeroed", top1_drift(ref, logprobs(), vocab)))
    for m, w in zip(linear, saved):
        m.weight.data = w
    rows.append(("constant logits", top1_drift(ref, logprobs(constant=True), vocab)))

    print(f"model {args.model} ({lm.source}), float32, CPU; cases (B, L, P) {list(VALIDATION_CASES)}")
    print("| variant | max abs dlogprob | mean | mean of constant logits | ratio (bound "
          f"{ROUNDED_DRIFT_RATIO}) |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['max']:.3g} | {r['mean']:.3g} | {r['null']:.3g} | {r['ratio']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
