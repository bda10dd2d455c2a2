"""The methods ``softprompt bench`` times, behind one interface, and what each is held to.

Every method has ``prepare(key, prompt)`` (once per soft prompt, before any timing),
``requests(key, ids, n_score)`` (the batch in the method's own form, built before timing) and
``run(batch)`` -> [B, n_score] float64 log-probs of each row's last n_score ids (the timed call).

  PeftBaseline    ``peft``: the real PeftModelForCausalLM forward, the baseline of every speedup;
  CopiedPrefix    ``copied``: plain transformers with the prompt's K/V copied into every row;
  RuntimeMethod   ``reference``, ``torch``, ``onnx``, ``onnx-int4``: one ``Runtime.score`` call.

:func:`load_methods` loads the ones asked for; :func:`make_prompt` and :func:`make_ids` build the
seeded inputs every method sees; :func:`tolerance` is a method's ``--refcheck`` bound, read from
the package's one table (``softprompt.tolerances``). bench/driver.py runs the sweep over them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from softprompt.tolerances import ONNX, SCORE, SCORE_CPU_BF16

ALL_BACKENDS = ("peft", "reference", "copied", "torch", "onnx", "onnx-int4")
BASELINE = "peft"  # every speedup column is over this backend


def tolerance(backend: str, dtype: str, device: str = "cpu") -> float:
    """Max |log-prob - float32 reference| allowed for ``backend`` computing in ``dtype``: SCORE's
    atol for the dtype (bfloat16 on a CPU: SCORE_CPU_BF16's max); for ``onnx`` the larger of it
    and ONNX's (the graph against PyTorch); for ``onnx-int4`` the 4-bit bundle's score
    tolerance ``INT4_SCORE_ATOL``."""
    if backend == "onnx-int4":
        from softprompt.export.quantize import INT4_SCORE_ATOL

        return INT4_SCORE_ATOL
    if dtype == "bfloat16" and not device.startswith("cuda"):
        return SCORE_CPU_BF16["float32"]["max"]
    tol = SCORE[dtype]["atol"] if dtype in SCORE else 1e-1
    if backend == "onnx":
        tol = max(tol, ONNX[dtype]["atol"] if dtype in ONNX else 5e-2)
    return tol


# ----------------------------------------------------------------------- copied baseline

class CopiedPrefix:
    """transformers + the prompt's K/V computed once and copied into every row of a DynamicCache.

    This is what a user of plain transformers does to avoid recomputing a soft prompt: run the
    P virtual tokens once, keep their past key/values, and for each batch expand them to B rows
    (one copy per row, since the cache grows in place with the request's own K/V) and run the
    request tokens on top. Only ``DynamicCache()`` and ``DynamicCache.update`` are used, which
    exist with the same meaning in transformers 5.17 and 5.24.
    """

    name = "copied"

    def __init__(self, model):
        import torch

        from softprompt.models import cache_kwarg

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix: dict = {}  # key -> (per-layer [(k, v)] each [1, Hkv, P, D], P)
        self.cache_kw = cache_kwarg(model)

    def prepare(self, key, embeddings) -> None:
        """embeddings: [P, E] float32 numpy -> the prompt's per-layer K/V, computed once."""
        torch = self.torch
        from transformers import DynamicCache

        if embeddings is None or len(embeddings) == 0:
            self.prefix[key] = ([], 0)
            return
        emb = torch.as_tensor(embeddings, device=self.device).to(self.model.dtype)[None]  # [1, P, E]
        P = emb.shape[1]
        with torch.inference_mode():
            cache = DynamicCache()
            self.model(inputs_embeds=emb, position_ids=torch.arange(P, device=self.device)[None],
                       use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        self.prefix[key] = (kv, P)

    def logprobs(self, key, ids, n_score: int):
        """ids: [B, L] int64 tensor on the device -> [B, n_score] float32 numpy log-probs of the
        last n_score ids (each predicted by the position before it)."""
        torch = self.torch
        from transformers import DynamicCache

        kv, P = self.prefix[key]
        B, L = ids.shape
        with torch.inference_mode():
            cache = None
            if P:
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):  # k, v: [1, Hkv, P, D] -> [B, Hkv, P, D], copied
                    cache.update(k.expand(B, -1, -1, -1).contiguous(),
                                 v.expand(B, -1, -1, -1).contiguous(), i)
            pos = (P + torch.arange(L, device=self.device)).expand(B, L)
            mask = torch.ones(B, P + L, dtype=torch.long, device=self.device)
            keep = torch.arange(L - n_score - 1, L - 1, device=self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=cache is not None, logits_to_keep=keep,
                             **{self.cache_kw: cache})
            lp = out.logits.float().log_softmax(-1)  # [B, n_score, V]
            tgt = ids[:, L - n_score:]
            return lp.gather(-1, tgt[..., None])[..., 0].cpu().numpy()


class PeftBaseline:
    """The real ``peft.PeftModelForCausalLM`` forward: what users of prompt tuning run today.

    Each soft prompt is saved as a PEFT PROMPT_TUNING adapter (``SoftPrompt.save_peft``) and
    loaded the way a user loads one, ``PeftModel.from_pretrained(base, dir, adapter_name=key)``
    (later prompts with ``load_adapter``); a batch under one prompt is one PEFT forward over
    ``[v_1 .. v_P, t_1 .. t_L]`` whose logits [B, P + L, V] are log-softmaxed at the scored
    positions only. P = 0 runs the base model itself (PEFT with no prompt).
    """

    name = "peft"

    def __init__(self, model, workdir: Path):
        import torch

        self.torch, self.base, self.workdir = torch, model, workdir
        self.peft = None
        self.device = next(model.parameters()).device
        self.num_virtual: dict = {}

    def prepare(self, key, prompt) -> None:
        """prompt: a SoftPrompt (saved as a PEFT adapter and loaded by PEFT) or None (P = 0)."""
        from peft import PeftModel

        if prompt is None:
            self.num_virtual[key] = 0
            return
        path = prompt.save_peft(self.workdir / str(key))
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=key).eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=key)
        self.num_virtual[key] = prompt.num_virtual_tokens

    def requests(self, key, ids: np.ndarray, n_score: int):
        return key, self.torch.as_tensor(ids, device=self.device), n_score

    def run(self, batch) -> np.ndarray:
        """-> [B, n_score] float64 log-probs of each row's last n_score ids."""
        torch = self.torch
        key, ids, n_score = batch
        with torch.inference_mode():
            if self.num_virtual[key]:
                self.peft.set_adapter(key)
                logits = self.peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            else:
                logits = self.base(input_ids=ids).logits  # [B, P + L, V]
            lp = logits[:, -n_score - 1:-1].float().log_softmax(-1)  # [B, n_score, V]
            tgt = ids[:, -n_score:]
            return lp.gather(-1, tgt[..., None])[..., 0].cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------ backends
class RuntimeMethod:
    """One Runtime backend behind the driver's uniform interface."""

    def __init__(self, name: str, rt):
        self.name, self.rt = name, rt

    def prepare(self, key, prompt) -> None:
        if prompt is not None:
            self.rt.add_prompt(key, prompt)

    def requests(self, key, ids: np.ndarray, n_score: int) -> list[dict]:
        return [{"prompt": key if key is not None else None,
                 "context": row[:-n_score].tolist(), "continuation": row[-n_score:].tolist()}
                for row in ids]

    def run(self, batch) -> np.ndarray:
        return np.array([r.token_logprobs for r in self.rt.score(batch)], dtype=np.float64)


class _CopiedMethod:
    def __init__(self, impl: CopiedPrefix):
        self.name, self.impl = "copied", impl

    def prepare(self, key, prompt) -> None:
        self.impl.prepare(key, None if prompt is None else prompt.embeddings)

    def requests(self, key, ids: np.ndarray, n_score: int):
        import torch

        return key, torch.as_tensor(ids, device=self.impl.device), n_score

    def run(self, batch) -> np.ndarray:
        return self.impl.logprobs(*batch).astype(np.float64)


def load_methods(names, model: str, device: str, dtype: str, max_batch: int,
                 max_batch_tokens: int, bundle_dir: str | None = None, log=print,
                 bundle_int4: str | None = None):
    """{name: method or error string}; a backend that cannot load is reported, not fatal."""
    import tempfile

    from softprompt.runtime.api import Runtime

    out = {}
    shared = None  # the reference backend's LoadedModel also serves `copied` (both plain SDPA)
    for name in names:
        t0 = time.perf_counter()
        try:
            if name == "copied":
                if shared is None:
                    from softprompt.models import load_model

                    shared = load_model(model, dtype=dtype, device=device)
                out[name] = _CopiedMethod(CopiedPrefix(shared.model))
            elif name == "peft":  # its own copy of the model: PEFT wraps the module it is given
                from softprompt.models import load_model

                work = tempfile.TemporaryDirectory(prefix="softprompt-bench-peft-")
                out[name] = PeftBaseline(load_model(model, dtype=dtype, device=device).model,
                                         Path(work.name))
                out[name].tmp = work  # removed with the method
            elif name == "onnx-int4":
                from softprompt.export import bundle_for

                path = bundle_int4 or bundle_for(model, dtype="fp32", weights="int4")
                rt = Runtime.load(str(path), backend="onnx", max_batch=max_batch,
                                  max_batch_tokens=max_batch_tokens)
                out[name] = RuntimeMethod(name, rt)
            else:
                kw = dict(max_batch=max_batch, max_batch_tokens=max_batch_tokens)
                if name == "onnx":
                    rt = Runtime.load(model, backend="onnx", bundle_dir=bundle_dir,
                                      # bfloat16: under OpenVINO on CPU, a float32 graph on CUDA
                                      dtype="float32" if dtype == "bfloat16" and device.startswith("cuda")
                                      else dtype,
                                      providers=["CUDAExecutionProvider"] if device.startswith("cuda")
                                      else None, **kw)
                else:
                    rt = Runtime.load(model, backend=name, device=device, dtype=dtype, **kw)
                if name == "reference" and shared is None:
                    shared = rt.backend.lm
                out[name] = RuntimeMethod(name, rt)
            log(f"loaded {name} in {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001 - the report says which backend and why
            out[name] = f"{type(e).__name__}: {e}"
            log(f"could not load {name}: {out[name]}")
    return out


# --------------------------------------------------------------------------------- inputs
def make_prompt(P: int, table: np.ndarray, seed: int):
    """P rows of the embedding table (seeded): a realistic soft-prompt initialisation."""
    from softprompt.runtime.prompts import SoftPrompt

    if P == 0:
        return None
    rng = np.random.default_rng(seed + 1000 * P)
    return SoftPrompt(table[rng.integers(0, table.shape[0], P)].astype(np.float32), name=f"p{P}",
                      init="bench")


def make_ids(B: int, L: int, vocab: int, seed: int) -> np.ndarray:
    """[B, L] int64 token ids, seeded by (seed, B, L): the same batch for every method."""
    return np.random.default_rng([seed, B, L]).integers(0, vocab, size=(B, L), dtype=np.int64)
