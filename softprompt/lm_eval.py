"""EleutherAI lm-evaluation-harness model ``softprompt``: evaluate a soft prompt on lm-eval tasks.

    import lm_eval
    import softprompt.lm_eval  # registers the model name "softprompt"

    lm_eval.simple_evaluate(
        model="softprompt", tasks=["hellaswag"],
        model_args="model=default,prompt=runtime/demo/prompts/sentiment,backend=onnx")

or from the shell: ``softprompt eval default --prompt DIR --tasks hellaswag``. Install with
``pip install "softprompt-runtime[eval]"``.

lm-eval 0.4 discovers models only through its own registry (no plugin entry points), so
importing this module registers the class. It imports ``lm_eval.models`` first: lm-eval fills
its registry with the built-in models lazily, only while the registry is empty, so a model
registered before that would make ``hf``, ``vllm``... vanish.

Semantics follow lm-eval's ``hf`` model with ``peft=`` on a prompt-tuning adapter, request by
request: the same tokenisation (special tokens as the tokenizer adds them; none when the text
already starts with the BOS string), the same empty-context handling (the prefix token: BOS,
else EOS), the same left truncation to ``max_length`` request tokens, the same rolling windows
(``loglikelihood_rolling``, first window after the prefix token), and ``is_greedy`` from the
same forward as the log-probability. The soft prompt's P virtual tokens come on top of
``max_length``, as they do in PEFT.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  -- fills the registry with lm-eval's own models first
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .runtime.api import Runtime

PROMPT_NAME = "prompt"
_GEN_LENGTH_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@register_model("softprompt")
class SoftPromptLM(TemplateLM):
    """A softprompt ``Runtime`` (one model, at most one soft prompt) as an lm-eval model.

    Args (``model_args`` keys):
        model: ``default``, a Hugging Face directory, a hub id, a ``.gguf`` or a bundle.
        prompt: the prompt: a PEFT adapter dir of any served type or hub id, ``.safetensors``,
            ``.npy``, a prompt object, or a list of parts (``Runtime.add_prompt``); omitted =
            the bare model (P = 0).
        backend, device, dtype: as ``Runtime.load``.
        max_length: request tokens per forward (context + continuation); longer inputs are
            cut from the left and rolling windows have this length (default: the model's
            positions minus P, or 2048 when unknown).
        max_gen_toks: default new tokens for ``generate_until`` (256, as lm-eval's ``hf``).
        prefix_token_id: the token used for an empty context (default BOS, else EOS).
        batch_size: rows per forward (lm-eval's ``--batch_size``; ``auto`` = 64).
        max_batch_tokens: cap on rows x length per forward (default 4096).
        allow_pickle: load ``.bin``/``.pt`` prompt files (``torch.load(weights_only=True)``).
    """

    def __init__(self, model: str = "default", prompt: Any = None, backend: str = "auto",
                 device: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 prefix_token_id: int | None = None, batch_size: int | str = 64,
                 max_batch_size: int | None = None, max_batch_tokens: int = 4096,
                 allow_pickle: bool = False, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"softprompt lm-eval model: unknown model_args {sorted(unknown)}; "
                             "expected model, prompt, backend, device, dtype, max_length, "
                             "max_gen_toks, prefix_token_id, batch_size, max_batch_tokens")
        rows = max_batch_size or (64 if str(batch_size).startswith("auto") else int(batch_size))
        self.rt = Runtime.load(model, backend=backend, device=device, dtype=dtype,
                               max_batch=int(rows), max_batch_tokens=int(max_batch_tokens))
        self.prompt = None
        if prompt is not None:
            self.rt.add_prompt(PROMPT_NAME, prompt, allow_pickle=allow_pickle)
            self.prompt = PROMPT_NAME
        self.model_name = str(model)
        num_virtual = self.rt.prompts[PROMPT_NAME].num_virtual_tokens if self.prompt else 0
        positions = self.rt.backend.max_positions
        self._max_length = int(max_length) if max_length else \
            (positions - num_virtual if positions else 2048)
        self._max_gen_toks = int(max_gen_toks)
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)
        tok = self.rt.tokenizer
        if self.prefix_token_id is None:
            raise ValueError(f"model {model!r} declares no BOS or EOS token; pass "
                             "prefix_token_id=N in model_args")
        self._bos_text = None if tok.tok is None else \
            tok.tok.decode([self.prefix_token_id], skip_special_tokens=False)

    # --------------------------------------------------------------------- lm-eval facts
    @property
    def eot_token_id(self) -> int:
        tok = self.rt.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else min(tok.eos_token_ids)

    @property
    def prefix_token_id(self) -> int | None:
        """lm-eval's ``HFLM.prefix_token_id``: the token placed before a text that has no
        context (an empty context, the first rolling window)."""
        return self._prefix if self._prefix is not None else self.rt.tokenizer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.model_name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """As ``HFLM.tok_encode`` for a causal model: the tokenizer's special tokens, unless the
        text already starts with the BOS string (or the caller says otherwise)."""
        special = True if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            special = False
        return self.rt.tokenizer.encode(string, special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.rt.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------- scoring
    def _requests(self, pairs) -> list[dict]:
        """(context ids, continuation ids) -> runtime requests, cut from the left to
        ``max_length + 1`` tokens as lm-eval's ``hf`` model cuts them (the last token is only
        predicted, never fed)."""
        out = []
        for ctx, cont in pairs:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit "
                                 f"max_length={self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            out.append({"prompt": self.prompt, "context": whole[:-len(cont)],
                        "continuation": list(cont)})
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``[(key, context ids, continuation ids)]`` -> ``[(logprob, is_greedy)]``, every
        request in one ``Runtime.score`` call (the runtime batches them)."""
        results = self.rt.score(self._requests((c, x) for _, c, x in requests),
                                progress=not disable_tqdm)
        out = []
        for (key, _, _), r in zip(requests, results):
            answer = (float(r.logprob), bool(r.is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of ``max_length`` tokens, the first
        after the prefix token, each later one conditioned on the tokens before it, summed
        (lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``, as ``hf``)."""
        windows, owner = [], []
        for i, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm,
                                           desc="rolling windows")):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ---------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations through the runtime's engine,
        cut before the first ``until`` string or the EOS text; the context keeps its last
        ``max_length - max_gen_toks`` tokens, as lm-eval's ``hf`` model."""
        eos = self.rt.tokenizer.tok.decode([self.eot_token_id], skip_special_tokens=False) \
            if self.rt.tokenizer.tok is not None else None
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            new = next((int(kw.pop(k)) for k in _GEN_LENGTH_KEYS if kw.get(k) is not None),
                       self.max_gen_toks)
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0) or 0.0)
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks={new} must be below max_length={self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - new):]
            r = self.rt.generate(self.prompt, [ids], max_new_tokens=new,
                                 temperature=temperature if sample else 0.0,
                                 top_p=kw.get("top_p"), top_k=kw.get("top_k"), seed=kw.get("seed"),
                                 stop=[s for s in until if s])[0]
            self.cache_hook.add_partial("generate_until", req.args, r.text)
            out.append(r.text)
        return out


def evaluate(model: str, prompt: str | None, tasks: list[str], *, include_path: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None, **model_args) -> dict:
    """Run lm-eval ``tasks`` on ``model`` under soft prompt ``prompt``; lm-eval's results dict.

    include_path: a directory of extra task YAML files (lm-eval's ``--include_path``).
    model_args: further ``SoftPromptLM`` arguments (backend, dtype, max_length, ...).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = SoftPromptLM(model=model, prompt=prompt, **model_args)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=TaskManager(include_path=include_path))
