"""Export validation: ONNX Runtime against PyTorch on fresh shapes, for the three uses.

``validate_bundle`` runs a bundle's graph and the traced ``ExportWrapper`` side by side on
``VALIDATION_CASES`` (prefix, request on a cached prefix, decode) and raises
ExportValidationError on any mismatch of names, axes or values beyond the package's tolerance
table (``softprompt/tolerances.py``, ONNX row); it returns the worst differences, which the
exporter records in ``bundle.json``.
"""

from __future__ import annotations

import numpy as np
import torch

from softprompt.tolerances import ONNX

from .bundle import Bundle, input_names, output_names
from .errors import ExportValidationError
from .wrapper import ExportWrapper, ModelSpec

# ORT vs PyTorch, max |difference| of logits and present K/V: the ONNX row of the package's one
# tolerance table (softprompt/tolerances.py), by bundle dtype.
VALIDATION_ATOL = {dtype: tol["atol"] for dtype, tol in ONNX.items()}
# Rounded (not carried-over) 4-bit weights change the function itself, by an amount no fixed
# number of nats describes: a tiny random model's outputs are nearly uniform, a trained one's
# are not. So after the float graph has passed VALIDATION_ATOL, the rewritten one is held to a
# bound relative to a graph that knows nothing: per use, the mean |change| of the log-prob of
# PyTorch's top-1 token must stay below ROUNDED_DRIFT_RATIO times the mean |change| that
# constant logits would show (|top-1 log-prob + log V|). Measured (bench/EXPORT_RESULTS.md,
# "The int4 sanity bound"): round-to-nearest moves the tiny test models' worst use by 0.095
# (Llama), 0.086 (Qwen2), 0.032 (Gemma) of that, and SmolLM2-135M, rounded on blocks shifted
# off its GGUF grid, by 0.15; broken graphs by 0.68 (SmolLM2, first layer zeroed), 1.0
# (constant logits), >= 0.92 and >= 0.81 (tiny Llama and Qwen2, first layer zeroed). 0.5 sits
# over 3x above every rounding measured and below every breakage of a Llama-family model
# (tests/test_quantize.py breaks graphs on purpose and checks they are refused). The score
# drift against the float32 graph is recorded separately (``validation.scores``).
ROUNDED_DRIFT_RATIO = 0.5
# (B, L, P): batch rows, request tokens, prompt (prefix) tokens. Hand-picked: a mid shape,
# the degenerate one-token shape, and a large batch with a long prompt.
VALIDATION_CASES = ((3, 9, 20), (1, 1, 1), (8, 32, 100))


def expected_axes(spec: ModelSpec) -> dict[str, list]:
    """Every graph input/output name -> its axes (a name for a dynamic axis, else the size)."""
    kv = ["batch", spec.num_kv_heads, "past_sequence", spec.head_dim]
    present = ["batch", spec.num_kv_heads, "total_sequence", spec.head_dim]
    axes = {"inputs_embeds": ["batch", "sequence", spec.hidden_size],
            "attention_mask": ["batch", "total_sequence"],
            "position_ids": ["batch", "sequence"],
            "logits_index": ["batch", "num_logits"],
            "logits": ["batch", "num_logits", spec.vocab_size]}
    for i in range(spec.num_layers):
        for name in ("key", "value"):
            axes[f"past_key_values.{i}.{name}"] = kv
            axes[f"present.{i}.{name}"] = present
    return axes


def clip_case(batch: int, seq: int, prefix: int, max_positions: int | None) -> tuple[int, int, int]:
    """Shrink (B, L, P) so the decode step (position P + L) fits in the model's positions."""
    if max_positions and prefix + seq + 1 > max_positions:
        scale = (max_positions - 1) / (prefix + seq)
        seq = max(1, int(seq * scale))
        prefix = max(1, min(int(prefix * scale), max_positions - 1 - seq))
    return batch, seq, prefix


def validate_bundle(wrapper: ExportWrapper, bundle: Bundle, cases=VALIDATION_CASES,
                    seed: int = 0, atol: float | None = None,
                    logprob_atol: float | None = None, drift_ratio: float | None = None) -> dict:
    """Run ORT (``bundle``) and PyTorch (``wrapper``) on fresh inputs for the three uses.

    For each (B, L, P): (1) prefix: P prompt vectors per row, rows of different lengths
    right-padded with mask 0, past length 0; (2) request: L tokens per row (different
    lengths, padded) on top of that prefix at positions P_b + i, logits at every position;
    (3) decode: one token on top of prefix + request. Also checks row 0's request logits
    against the plain transformers forward over ``[prompt, tokens]`` (no cache, no mask).

    Two modes. Elementwise (float32 graphs): both sides get identical inputs at every use
    (the past comes from PyTorch) and |ORT - PyTorch| of logits and of every present K/V
    must stay within ``atol`` (default VALIDATION_ATOL["float32"]). Log-prob (float16 and
    rounded 4-bit graphs, against a float32 ``wrapper``): each side carries its own past from
    use to use, so an error in ORT's presents shows up in the next use's logits, and the bound
    ``logprob_atol`` applies to the log-prob of PyTorch's top-1 token at every position.
    float16 bundles default to it with VALIDATION_ATOL["float16"]: after 30 layers fp16
    rounding moves raw logits (|x| up to ~36, fp16 spacing 0.03 there) by ~0.1 and K/V by
    ~0.6, while the log-probs stay within 0.02 of float32 on SmolLM2-135M. Relative drift
    (``drift_ratio``, rounded 4-bit graphs): as log-prob mode, but the bound is on each use's
    mean |change| of those log-probs, relative to the mean |top-1 log-prob + log V| that a
    graph with constant logits would show (ROUNDED_DRIFT_RATIO).

    Returns the figures; raises ExportValidationError on any mismatch.
    """
    if drift_ratio is not None:
        if logprob_atol is not None:
            raise ValueError("pass logprob_atol or drift_ratio, not both")
        logprob_atol = float("inf")  # log-prob mode; the bound is checked on the means below
    spec = wrapper.spec
    if atol is None and logprob_atol is None and bundle.dtype == "float16":
        logprob_atol = VALIDATION_ATOL["float16"]
    atol = VALIDATION_ATOL["float32"] if atol is None else atol
    _check_interface(bundle, spec)
    rng = np.random.default_rng(seed)
    scale = float(np.std(bundle.embeddings[: min(bundle.vocab_size, 4096)]))
    worst = dict.fromkeys(("prefix", "request", "decode", "presents", "reference"), 0.0)
    drift = {use: [0.0, 0.0, 0] for use in ("prefix", "request", "decode", "reference")}
    ran = []

    def lp_close(use, got_lp, want_lp, where):
        """log-prob modes: max |got - want| (checked against logprob_atol), and the sums the
        relative bound reads."""
        d = _check_close("top-1 log-probs", got_lp, want_lp, logprob_atol, where)
        acc = drift[use]
        acc[0] += float(np.abs(got_lp - want_lp).sum())
        acc[1] += float(np.abs(want_lp + np.log(spec.vocab_size)).sum())
        acc[2] += int(want_lp.size)
        return d

    def compare(use, where, embeds, mask, pos, pasts, index):
        """Run both sides (pasts: PyTorch's, ORT's); return ORT's logits and the next pasts."""
        t_logits, t_presents = _run_torch(wrapper, embeds, mask, pos, pasts[0], index)
        o_logits, o_pairs = bundle.run(embeds, mask, pos, pasts[1], index)
        o_presents = [np.asarray(a, np.float32) for kv in o_pairs for a in kv]
        _check_shape("logits", o_logits, (len(embeds), index.shape[1], spec.vocab_size), where)
        for name, arr in zip(bundle.output_names[1:], o_presents):
            _check_shape(name, arr, (len(embeds), spec.num_kv_heads, mask.shape[1],
                                     spec.head_dim), where)
        if logprob_atol is None:
            worst[use] = max(worst[use], _check_close("logits", o_logits, t_logits, atol, where))
            for name, o, t in zip(bundle.output_names[1:], o_presents, t_presents):
                worst["presents"] = max(worst["presents"], _check_close(name, o, t, atol, where))
        else:
            worst[use] = max(worst[use], lp_close(
                use, _top1_logprob(o_logits, t_logits), _top1_logprob(t_logits), where))
            for name, o in zip(bundle.output_names[1:], o_presents):
                _check_finite(name, o, where)
        t_past = [(t_presents[2 * i], t_presents[2 * i + 1]) for i in range(spec.num_layers)]
        return o_logits, (t_past, t_past if logprob_atol is None else o_pairs)

    for case in cases:
        B, L, P = clip_case(*case, spec.max_position_embeddings)
        ran.append([B, L, P])
        where = f"case (B={B}, L={L}, P={P})"
        # per-row prompt and request lengths; row 0 is full length, the others right-padded
        p_rows = np.concatenate([[P], rng.integers(max(1, P // 2), P + 1, size=B - 1)])
        l_rows = np.concatenate([[L], rng.integers(max(1, L // 2), L + 1, size=B - 1)])
        prompt = (rng.standard_normal((B, P, spec.hidden_size)) * scale).astype(np.float32)
        request = _embed(bundle, rng.integers(0, bundle.vocab_size, size=(B, L)))  # [B, L, E]
        step = _embed(bundle, rng.integers(0, bundle.vocab_size, size=(B, 1)))  # [B, 1, E]

        # (1) prefix alone: past length 0, logits of each row's last prompt token
        mask = (np.arange(P)[None] < p_rows[:, None]).astype(np.int64)  # [B, P]
        empty = np.zeros((B, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        _, past = compare("prefix", "prefix use, " + where, prompt, mask,
                          np.tile(np.arange(P), (B, 1)),
                          ([(empty, empty)] * spec.num_layers,) * 2, (p_rows - 1)[:, None])
        # (2) request tokens at positions P_b + i on the padded prefix, logits everywhere
        mask = np.concatenate([mask, np.arange(L)[None] < l_rows[:, None]], 1).astype(np.int64)
        logits, past = compare("request", "request use, " + where, request, mask,
                               p_rows[:, None] + np.arange(L)[None], past,
                               np.tile(np.arange(L), (B, 1)))
        ref = _reference_logits(wrapper, prompt[0], request[0])  # [L, V], row 0 alone
        if logprob_atol is None:
            worst["reference"] = max(worst["reference"], _check_close(
                "row 0 logits vs plain transformers", logits[0], ref, atol, "request use, " + where))
        else:
            worst["reference"] = max(worst["reference"], lp_close(
                "reference", _top1_logprob(logits[0], ref), _top1_logprob(ref),
                "row 0 vs plain transformers, request use, " + where))
        # (3) decode one token on top of prefix + request
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)  # [B, P + L + 1]
        compare("decode", "decode use, " + where, step, mask, (p_rows + l_rows)[:, None], past,
                np.zeros((B, 1), np.int64))

    figures = {"passed": True, "provider": "CPUExecutionProvider", "cases": ran,
               "metric": "max |ORT - PyTorch|" + (" of top-1 log-probs" if logprob_atol else ""),
               "atol": atol if logprob_atol is None else logprob_atol}
    if logprob_atol is not None:
        del worst["presents"]  # checked through the next use's log-probs
    figures.update({f"max_abs_{k}": float(f"{v:.3g}") for k, v in worst.items()})
    if logprob_atol is not None:  # and the mean per use, in nats
        figures.update({f"mean_abs_{use}": float(f"{d / n:.3g}") for use, (d, _, n) in drift.items() if n})
    if drift_ratio is not None:
        figures.update(metric="mean |ORT - PyTorch| of top-1 log-probs / the same of constant "
                              "logits, per use", atol=None, drift_ratio=drift_ratio)
        for use, (d, null, n) in drift.items():
            ratio = d / null if null > 0 else (0.0 if d == 0 else float("inf"))
            figures[f"drift_ratio_{use}"] = float(f"{ratio:.3g}")
            if not ratio <= drift_ratio:
                raise ExportValidationError(
                    f"{use} use: top-1 log-probs moved by {d / max(n, 1):.3g} on average, "
                    f"{ratio:.2f} of what constant logits would ({null / max(n, 1):.3g}), above "
                    f"{drift_ratio:g}: the rounded graph is broken")
    return figures


def validate_cpu_bf16(wrapper: ExportWrapper, root, seed: int = 0) -> dict | None:
    """A float32 bundle's graph under OpenVINO in bfloat16 (``compute_dtype="bfloat16"``)
    against PyTorch in float32 on VALIDATION_CASES: the log-prob figures of the rounded-graph
    mode (each side carries its own past; mean and max |delta| of the top-1 log-probs per use,
    and the ROUNDED_DRIFT_RATIO sanity bound), with the CPU they were measured on; ``passed``
    False (and ``error``) when the bound fails. None where OpenVINO is not installed or the CPU
    has no bfloat16 units (nothing measured)."""
    from softprompt.machine import cpu_model

    from .bundle import load_bundle
    from .ov_session import cpu_has_bf16, openvino_available

    if not openvino_available() or not cpu_has_bf16():
        return None
    bundle = load_bundle(root, compute_dtype="bfloat16")
    projection = bundle.session.head_dtype
    try:
        figures = validate_bundle(wrapper, bundle, seed=seed, drift_ratio=ROUNDED_DRIFT_RATIO)
    except ExportValidationError as e:
        figures = {"passed": False, "error": str(e)}
    finally:
        del bundle
    if "metric" in figures:
        figures["metric"] = figures["metric"].replace("ORT", "OpenVINO bfloat16")
    return {**figures, "provider": "OpenVINO", "compute_dtype": "bfloat16",
            "vocabulary_projection": projection, "cpu": cpu_model()}


def _embed(bundle: Bundle, ids: np.ndarray) -> np.ndarray:
    return np.asarray(bundle.embeddings[ids], dtype=np.float32)


def _run_torch(wrapper: ExportWrapper, embeds, mask, pos, past, index):
    dtype = next(wrapper.parameters()).dtype
    t = lambda a, d=None: torch.from_numpy(np.ascontiguousarray(a)).to(d or dtype)
    with torch.no_grad():
        out = wrapper(t(embeds), t(mask, torch.long), t(pos, torch.long),
                      [(t(k), t(v)) for k, v in past], t(index, torch.long))
    return out[0].float().numpy(), [x.float().numpy() for x in out[1:]]


def _check_interface(bundle: Bundle, spec: ModelSpec) -> None:
    axes = expected_axes(spec)
    ins = {i.name: i.shape for i in bundle.session.get_inputs()}
    outs = {o.name: o.shape for o in bundle.session.get_outputs()}
    want_in, want_out = input_names(spec.num_layers), output_names(spec.num_layers)
    if list(ins) != want_in or list(outs) != want_out:
        raise ExportValidationError(f"graph names differ from the contract: inputs "
                                    f"{list(ins)[:4]}..., outputs {list(outs)[:3]}...")
    for name, shape in {**ins, **outs}.items():
        if list(shape) != axes[name]:
            raise ExportValidationError(f"graph {name!r} has axes {shape}; expected {axes[name]}")


def _check_shape(name: str, arr: np.ndarray, want: tuple, where: str) -> None:
    if tuple(arr.shape) != tuple(want):
        raise ExportValidationError(f"{where}: ORT {name} has shape {tuple(arr.shape)}, "
                                    f"expected {tuple(want)}")


def _check_finite(name: str, arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        raise ExportValidationError(f"{where}: ORT {name} has NaN/Inf values")


def _check_close(name: str, got: np.ndarray, want: np.ndarray, atol: float, where: str) -> float:
    _check_finite(name, got, where)
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
    if not diff <= atol:
        raise ExportValidationError(f"{where}: {name} differ by {diff:.3g} "
                                    f"(max |ORT - PyTorch|), above the tolerance {atol:g}")
    return diff


def _top1_logprob(logits: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """log-softmax of ``logits`` at the argmax token of ``ref`` (default: of ``logits``)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    top = np.argmax(logits if ref is None else ref, axis=-1)[..., None]
    return np.take_along_axis(logp, top, axis=-1)[..., 0]


def _reference_logits(wrapper: ExportWrapper, prompt: np.ndarray,
                      request: np.ndarray) -> np.ndarray:
    """Plain transformers over ``[prompt, request]`` embeddings: logits of the request tokens."""
    model = wrapper.model
    dtype = next(model.parameters()).dtype
    embeds = torch.from_numpy(np.concatenate([prompt, request]))[None].to(dtype)  # [1, P+L, E]
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, use_cache=False,
                       logits_to_keep=request.shape[0]).logits  # [1, L, V]
    return logits[0].float().numpy()
