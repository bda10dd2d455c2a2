"""Deliberate bugs for the end-to-end checks to catch: a check that cannot fail proves nothing.

Each mutation reproduces one classic prefix-caching bug inside the torch backend, for as long
as its context manager is open (process-wide: use it on a runtime nothing else is calling):

    positions_from_0    request tokens placed at positions 0.. instead of P.. (the prefix's
                        length forgotten when the positions are built)
    prefix_key_dropped  the last key of every cached prefix never attended to (an off-by-one in
                        the prefix length)
    future_key_visible  query i sees its own key i + 1 (an off-by-one in the causal mask); the
                        mask lives in the PyTorch reference attention, so under this mutation the
                        backend attends through the reference on every device
    prompts_swapped     each row reads the next prompt's cached prefix (a wrong row -> prompt
                        index); visible only in a batch that mixes prompts

``self_test(run, want, tol)`` runs a check's "ours" side under each mutation and reports whether
the check's comparison (max |ours - want| <= tol) failed, as it must. bench/gpu_e2e.py runs it
on the GPU (float32) and in --cpu-smoke; tests/test_checks_fail.py runs it on the tiny models.

Mutations are applied to the eager forward: a CUDA graph captured before the mutation replays
the unmutated kernels, so use a runtime with ``cuda_graphs=False`` (on CPU there are none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

MUTATIONS = ("positions_from_0", "prefix_key_dropped", "future_key_visible", "prompts_swapped")


@contextlib.contextmanager
def mutated(name: str) -> Iterator[None]:
    """Apply mutation ``name`` (one of MUTATIONS) to every torch backend while open."""
    import importlib

    import torch

    from softprompt import kernels
    from softprompt.runtime.torch_backend import TorchBackend

    # the module, not the package's function of the same name: where plan_attention's helpers live
    pa_mod = importlib.import_module("softprompt.kernels.prefix_attention")

    if name not in MUTATIONS:
        raise ValueError(f"unknown mutation {name!r}; expected one of {MUTATIONS}")
    saved = []

    def patch(obj, attr, new):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    if name == "positions_from_0":
        run = TorchBackend._run

        def run_from_0(self, b, emb, pos, project=False):
            p = b.prefix_lens[b.prompt_idx.long()].long()  # [B] P of each row
            return run(self, b, emb, (pos - p[:, None]).clamp(min=0), project)

        patch(TorchBackend, "_run", run_from_0)
    elif name == "prefix_key_dropped":
        plan = kernels.plan_attention

        def plan_short(q_shape, kv_shape, prefix_shape, prefix_lens, *args, **kw):
            return plan(q_shape, kv_shape, prefix_shape, (prefix_lens - 1).clamp(min=0), *args, **kw)

        patch(kernels, "plan_attention", plan_short)
    elif name == "prompts_swapped":
        plan = kernels.plan_attention

        def plan_swapped(q_shape, kv_shape, prefix_shape, prefix_lens, prompt_idx, *args, **kw):
            swapped = ((prompt_idx + 1) % prefix_shape[0]).to(prompt_idx.dtype)
            return plan(q_shape, kv_shape, prefix_shape, prefix_lens, swapped, *args, **kw)

        patch(kernels, "plan_attention", plan_swapped)
    else:
        plan, plan_ref = kernels.plan_attention, pa_mod.plan_reference

        def plan_on_reference(*args, **kw):
            return plan(*args, **{**kw, "kernel": "reference"})

        def plan_peeking(dims, prefix_lens, prompt_idx, kv_lens, q_lens, plans=None):
            ref = plan_ref(dims, prefix_lens, prompt_idx, kv_lens, q_lens, plans)
            if ref.K == 0:
                return ref
            dev = prompt_idx.device
            kv = torch.full((dims.B,), dims.Lk, device=dev) if kv_lens is None else kv_lens.long()
            ql = torch.full((dims.B,), dims.Lq, device=dev) if q_lens is None else q_lens.long()
            pos = (kv - ql)[:, None] + torch.arange(dims.Lq, device=dev)  # [B, Lq]
            j = torch.arange(ref.K, device=dev)
            own_ok = (j <= pos[:, :, None] + 1) & (j < kv[:, None, None])  # one key too far
            return ref._replace(own_ok=own_ok)

        patch(kernels, "plan_attention", plan_on_reference)
        patch(pa_mod, "plan_reference", plan_peeking)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def max_abs_diff(got, want) -> float:
    """max |got - want| (inf when either has a non-finite value or the shapes differ)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("inf")
    return float(np.max(np.abs(got - want))) if got.size else 0.0


def self_test(run: Callable[[], object], want, tol: float,
              mutations: tuple[str, ...] = MUTATIONS) -> dict:
    """{mutation: {"max_abs_diff", "caught"}}: ``run()`` (ours, returning what is compared with
    ``want``) under each mutation; ``caught`` is True when the check max |ours - want| <= tol
    fails, which is what must happen."""
    out = {}
    for name in mutations:
        with mutated(name):
            diff = max_abs_diff(run(), want)
        out[name] = {"max_abs_diff": diff, "caught": not diff <= tol}
    return out
