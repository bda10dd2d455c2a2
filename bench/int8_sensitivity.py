"""How far int8 arithmetic moves the default model's scores: the evidence behind dropping int8.

    python -m softprompt.bench.int8_sensitivity --per-layer

Simulates int8 in PyTorch (float32 model, round-to-int8 then back, "fake quantization") on the
inputs and/or weights of the linear layers, the vocabulary projection excluded, and reports the
mean |change| of every next-token log-prob against the float32 model, over the demo held-out
texts (first ``--texts`` of each task, up to 48 tokens) and random-token requests. Schemes:

- ``W8 per-channel``: weights only, symmetric int8 with one scale per output channel.
- ``A8 per-token``: activations only, symmetric int8 with one scale per token (row).
- ``A8 per-block-32``: activations only, one scale per 32 input features of a token (what
  ``MatMulNBits`` accuracy_level 4 does).
- ``A8 per-tensor``: activations only, asymmetric uint8 with one scale for the whole input (what
  ONNX Runtime's dynamic quantization does).
- ``W8A8``: per-channel weights and per-token activations, whole model, and with
  ``--per-layer`` one decoder layer at a time and one projection type at a time.

Any int8 path of ONNX Runtime's CPU kernels is at least as coarse as one of these; a scheme
whose drift exceeds the 4-bit bundle's score tolerance (``INT4_SCORE_ATOL``, 0.02 nats) in a
single layer cannot be fixed by excluding layers.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np


def _per_channel(w):
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (w / s).round().clamp(-127, 127) * s


def _per_token(x):
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / s).round().clamp(-127, 127) * s


def _per_block(x, block: int = 32):
    y = x.reshape(*x.shape[:-1], -1, block)
    return _per_token(y).reshape(x.shape)


def _per_tensor_u8(x):
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    s = ((hi - lo) / 255).clamp_min(1e-12)
    z = (-lo / s).round()
    return ((x / s).round() + z).clamp(0, 255).sub(z) * s


SCHEMES = {  # name: (activation rounding, weight rounding)
    "W8 per-channel": (None, _per_channel),
    "A8 per-token": (_per_token, None),
    "A8 per-block-32": (_per_block, None),
    "A8 per-tensor": (_per_tensor_u8, None),
    "W8A8 (per-channel, per-token)": (_per_token, _per_channel),
}


class FakeInt8:
    """Swaps rounding into the model's linear layers (not the vocabulary projection)."""

    def __init__(self, model):
        import torch

        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.shape[0] !=
                       model.config.vocab_size}
        self.weights = {n: m.weight.data.clone() for n, m in self.layers.items()}
        self.forwards = {n: m.forward for n, m in self.layers.items()}

    def apply(self, act, weight, only=lambda name: True) -> None:
        for n, m in self.layers.items():
            on = only(n)
            m.weight.data = weight(self.weights[n]) if (on and weight) else self.weights[n]
            fwd = self.forwards[n]
            m.forward = (lambda x, f=fwd: f(act(x))) if (on and act) else fwd


def main(argv=None) -> int:
    import torch

    from softprompt.export.quantize import INT4_SCORE_ATOL
    from softprompt.machine import cpu_model
    from softprompt.models import load_model
    from softprompt.runtime.demo import TASKS, load_examples

    p = argparse.ArgumentParser(prog="python -m softprompt.bench.int8_sensitivity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=12, help="held-out texts per demo task")
    p.add_argument("--random", type=int, default=4, help="random-token requests (32 tokens)")
    p.add_argument("--per-layer", action="store_true",
                   help="also W8A8 one decoder layer and one projection type at a time")
    args = p.parse_args(argv)
    lm = load_model("default", dtype="float32")
    model, tok = lm.model.eval(), lm.tokenizer
    seqs = [tok(ex["text"])["input_ids"][:48] for task in TASKS
            for ex in load_examples(task, "test")[:args.texts]]
    rng = np.random.default_rng(0)
    seqs += [rng.integers(0, model.config.vocab_size, 32).tolist() for _ in range(args.random)]

    @torch.no_grad()
    def logprobs() -> np.ndarray:
        out = []
        for ids in seqs:
            x = torch.tensor([ids])
            lp = model(x).logits.float().log_softmax(-1)[0, :-1]
            out.append(lp.gather(-1, x[0, 1:, None])[:, 0].numpy())
        return np.concatenate(out)

    base = logprobs()
    fake = FakeInt8(model)
    print("command: python -m softprompt.bench.int8_sensitivity " +
          shlex.join(argv or sys.argv[1:]))
    print(f"device: {cpu_model()}; SmolLM2-135M-Instruct float32; {len(seqs)} sequences, "
          f"{len(base)} scored tokens; tolerance {INT4_SCORE_ATOL} nats")
    print("| scheme | layers | mean abs dlogprob | max abs dlogprob | within tolerance |")
    print("|---|---|---|---|---|")

    def row(name, where, act, weight, only=lambda n: True):
        fake.apply(act, weight, only)
        d = np.abs(logprobs() - base)
        print(f"| {name} | {where} | {d.mean():.4f} | {d.max():.3f} | "
              f"{'yes' if d.mean() <= INT4_SCORE_ATOL else 'no'} |", flush=True)

    for name, (act, weight) in SCHEMES.items():
        row(name, "all", act, weight)
    if args.per_layer:
        act, weight = SCHEMES["W8A8 (per-channel, per-token)"]
        for i in range(model.config.num_hidden_layers):
            row("W8A8", f"layer {i} only", act, weight, lambda n, i=i: f".layers.{i}." in n)
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"):
            row("W8A8", f"every {kind} only", act, weight, lambda n, k=kind: n.endswith(k))
    fake.apply(None, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
