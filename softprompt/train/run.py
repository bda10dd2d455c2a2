"""``train``: a soft prompt trained with PEFT and transformers' Trainer, evaluated on the runtime.

PEFT does the model (``get_peft_model``, only the prompt's parameters trainable) with the config
of ``--type`` (``peft_config``): ``prompt_tuning`` (``PromptTuningConfig``: TEXT, SAMPLE_VOCAB or
RANDOM init), ``p_tuning`` (``PromptEncoderConfig``, an MLP or LSTM encoder), ``prefix_tuning``
(``PrefixTuningConfig``, with or without the projection MLP) and ``cartridge``
(``CartridgeConfig``, its first token frozen); the two K/V types start random or from the
model's own K/V of a text (PEFT's ``initialize_kv_prefix_from_text``). Multitask prompt tuning
and CPT are refused (``REFUSED``). transformers' ``Trainer`` does the
loop: AdamW, the learning-rate schedule, batches in a seeded order, a checkpoint at the end of
every epoch (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``), resuming from
the last one (``--resume``), and keeping the best epoch (``load_best_model_at_end``). What is
ours:

- the rows (``data.py``), tokenised exactly as the runtime tokenises a request (context with
  the tokenizer's special tokens, continuation without), the loss on the continuation's tokens;
- evaluation through the served path: ``Trainer.evaluate`` is replaced by ``RuntimeEvaluator``:
  the epoch's adapter is saved as ``save_pretrained`` saves it and registered in one ``Runtime``
  built once on the same model (``rt.add_prompt(name, adapter_dir)``, as any adapter of any type
  is loaded: its prefix computed and cached), and the held-out rows are scored in batches:
  accuracy with ``rt.classify`` for a label set, mean log-likelihood with ``rt.score`` otherwise.
  The figures are therefore those ``rt.classify`` / ``rt.score`` give for the saved adapter;
- checkpoints of the encoder types (``p_tuning``, ``prefix_tuning`` with ``--prefix-projection``):
  PEFT's adapter file holds the encoder's output, not the encoder, and loading it back into a
  trainable model would feed that output through the encoder again; so their checkpoints also
  hold the prompt encoder's own weights (``ENCODER_FILE``), which resume and the best-epoch
  reload restore instead;
- a progress bar over rows (loss, rows/s, ETA), the output directory and ``metrics.json``.

Output directory ``out``: ``adapter_config.json`` + ``adapter_model.safetensors`` (the best
epoch's prompt, or the last one without ``--eval``; replaced file by file, weights first, so a
watching server never reads a config newer than its weights), ``metrics.json``,
``train_job.json`` (what the run is: a resumed run must match it) and ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .data import Example, Task, TrainError, examples, file_digest

# PEFT's prompt-learning types; the runtime serves all of them, and these four are trained here.
PROMPT_LEARNING_TYPES = ("prompt_tuning", "p_tuning", "prefix_tuning", "cartridge",
                         "multitask_prompt_tuning", "cpt")
TRAINED_TYPES = ("prompt_tuning", "p_tuning", "prefix_tuning", "cartridge")
SERVED_TYPES = TRAINED_TYPES  # the earlier name (then: the types the runtime served)
KV_TYPES = ("prefix_tuning", "cartridge")  # a K/V prefix of every layer, not input embeddings
REFUSED = {  # why the other two are not trained here (the runtime serves adapters made elsewhere)
    "multitask_prompt_tuning": "it needs a task id per training row (PEFT's task_ids) and trains "
                               "T prompts at once",
    "cpt": "it needs its token-type template (cpt_token_ids and cpt_tokens_type_mask, built from "
           "example inputs and labels)",
}
# the --init values each type takes (the first is its default), and the encoders of p_tuning
INITS = {"prompt_tuning": ("vocab", "text", "random"), "p_tuning": ("random",),
         "prefix_tuning": ("random", "text"), "cartridge": ("random", "text")}
ENCODERS = ("mlp", "lstm")
ENCODER_FILE = "prompt_encoder.safetensors"  # in a checkpoint of an encoder type (above)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the order they are replaced
EVAL_PROMPT = "softprompt-train-eval"  # the name each epoch's prompt gets in the eval runtime


@dataclass
class TrainConfig:
    """One training run (``softprompt train``'s flags).

    model: as ``Runtime.load`` takes it (``default``, a directory, a hub id, a ``.gguf``).
    data / eval: JSONL, CSV or Parquet rows (``data.py``); eval is optional.
    out: the output directory. type: the PEFT prompt-learning type, one of ``TRAINED_TYPES``.
    init: ``vocab`` (prompt_tuning's SAMPLE_VOCAB), ``random`` (prompt_tuning's RANDOM; the
        others' PEFT initialisation) or ``text:...`` (prompt_tuning's TEXT; for the K/V types the
        model's own K/V of the text's first P tokens); None: the type's default (``INITS``).
    encoder: p_tuning's encoder, ``mlp`` (None: mlp) or ``lstm``.
    prefix_projection: prefix_tuning through PEFT's projection MLP.
    labels: None for ``{context, continuation}`` rows; a tuple of label names (empty: from the
        training rows) for ``{text, label}`` rows, with ``template`` and ``label_prefix``.
    eval_backend: the runtime backend that scores the held-out rows (``torch``: the cached
        prefix; ``reference``; ``onnx``: exports the model once).
    """

    data: str
    out: str
    model: str = "default"
    eval: str | None = None
    type: str = "prompt_tuning"
    virtual_tokens: int = 20
    init: str | None = None
    encoder: str | None = None
    prefix_projection: bool = False
    lr: float = 3e-2
    epochs: int = 3
    batch_size: int = 8
    seed: int = 0
    lr_scheduler: str = "constant"
    labels: tuple[str, ...] | None = None
    template: str = "{text}"
    label_prefix: str = " "
    device: str | None = None
    dtype: str = "float32"
    eval_backend: str = "torch"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in metrics.json as is

    # the options a resumed run must share with the run it continues
    def identity(self) -> dict:
        keep = ("model", "type", "virtual_tokens", "init", "lr", "epochs", "batch_size", "seed",
                "lr_scheduler", "labels", "template", "label_prefix", "dtype", "eval_backend")
        d = {k: v for k, v in asdict(self).items() if k in keep}
        d["labels"] = None if self.labels is None else list(self.labels)
        d["data_sha256"] = file_digest(self.data)
        d["eval_sha256"] = file_digest(self.eval) if self.eval else None
        if self.type == "p_tuning":  # only where they apply: a prompt_tuning run's record is as before
            d["encoder"] = self.encoder
        if self.type == "prefix_tuning":
            d["prefix_projection"] = self.prefix_projection
        return d


def check_type(peft_type: str) -> str:
    """``peft_type`` normalised (``prefix_tuning``; PEFT's ``PREFIX_TUNING`` and
    ``prefix-tuning`` too), or a one-line TrainError naming what is trained here."""
    t = str(peft_type).lower().replace("-", "_")
    if t in TRAINED_TYPES:
        return t
    if t in REFUSED:
        raise TrainError(f"--type {t} is not trained here: {REFUSED[t]}; train it with PEFT, the "
                         f"runtime serves it; trained here: {', '.join(TRAINED_TYPES)}")
    raise TrainError(f"unknown --type {peft_type!r}: PEFT's prompt-learning types are "
                     f"{', '.join(PROMPT_LEARNING_TYPES)}; trained here: {', '.join(TRAINED_TYPES)}")


def peft_init(init: str) -> tuple[str, str | None]:
    """(PEFT ``PromptTuningInit`` name, init text) of an ``--init`` value."""
    if init == "vocab":
        return "SAMPLE_VOCAB", None
    if init == "random":
        return "RANDOM", None
    if init.startswith("text:") and init[5:].strip():
        return "TEXT", init[5:]
    raise TrainError(f"--init must be text:\"...\" (non-empty), vocab or random, got {init!r}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its type normalised and the type's defaults filled in (``init``,
    ``encoder``), or a one-line TrainError for an option the type does not take."""
    t = check_type(cfg.type)
    init = INITS[t][0] if cfg.init is None else cfg.init
    kind = peft_init(init)[0].lower().replace("sample_", "")  # vocab, random or text (checked)
    if kind not in INITS[t] or (kind == "text" and cfg.prefix_projection):
        what = {"prompt_tuning": "text:\"...\" (PEFT TEXT), vocab (SAMPLE_VOCAB) or random",
                "p_tuning": "random only (PEFT's encoder has no other initialisation)",
                "prefix_tuning": "random only with --prefix-projection (PEFT cannot load K/V into "
                                 "the projection)" if cfg.prefix_projection else
                                 "text:\"...\" (the model's K/V of the text) or random",
                "cartridge": "text:\"...\" (the model's K/V of the text) or random"}[t]
        raise TrainError(f"--init {init.split(':')[0]} does not apply to --type {t}: it takes {what}")
    if cfg.encoder is not None and t != "p_tuning":
        raise TrainError(f"--encoder applies to --type p_tuning only, not {t}")
    encoder = None if t != "p_tuning" else (cfg.encoder or "mlp").lower()
    if encoder is not None and encoder not in ENCODERS:
        raise TrainError(f"--encoder must be mlp or lstm, got {cfg.encoder!r}")
    if cfg.prefix_projection and t != "prefix_tuning":
        raise TrainError(f"--prefix-projection applies to --type prefix_tuning only, not {t}")
    return replace(cfg, type=t, init=init, encoder=encoder)


def peft_config(cfg: TrainConfig, tokenizer_path: str):
    """The PEFT config (task type CAUSAL_LM) of a resolved ``cfg``."""
    import peft

    common = dict(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=cfg.virtual_tokens)
    if cfg.type == "prompt_tuning":
        init, text = peft_init(cfg.init)
        return peft.PromptTuningConfig(**common, prompt_tuning_init=init, prompt_tuning_init_text=text,
                                       tokenizer_name_or_path=tokenizer_path if text else None)
    if cfg.type == "p_tuning":
        return peft.PromptEncoderConfig(**common, encoder_reparameterization_type=cfg.encoder.upper())
    if cfg.type == "prefix_tuning":
        return peft.PrefixTuningConfig(**common, prefix_projection=cfg.prefix_projection)
    # the first token frozen as an attention sink (PEFT's default), when there is another to train
    return peft.CartridgeConfig(**common, num_frozen_tokens=min(1, cfg.virtual_tokens - 1))


def init_kv_from_text(model, tokenizer, text: str, P: int) -> None:
    """A K/V type's prefix := the model's own K/V of ``text``'s first P tokens (PEFT's
    ``initialize_kv_prefix_from_text``; plain text with the tokenizer's special tokens, no chat
    template)."""
    from peft import initialize_kv_prefix_from_text

    n = len(tokenizer(text)["input_ids"])
    if n < P:
        raise TrainError(f"--init text: the K/V prefix is the model's K/V of the text's first {P} "
                         f"tokens, and the text has {n}: give a longer text or fewer --virtual-tokens")
    initialize_kv_prefix_from_text(model, tokenizer, text=text, use_chat_template=False)


def needs_encoder_state(peft_model) -> bool:
    """Whether the adapter file lacks trainable weights: an encoder between the trained
    parameters and the saved prompt (P-tuning's MLP/LSTM, prefix tuning's projection)."""
    c = peft_model.peft_config["default"]
    return c.peft_type.value == "P_TUNING" or bool(getattr(c, "prefix_projection", False))


# ------------------------------------------------------------------------------- the rows
def encode(ex: Example, tokenizer) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example, tokenised as ``Runtime.check`` tokenises the request
    (context with special tokens, continuation without); labels are -100 except on the
    continuation (or on every context token when there is none)."""
    ctx = tokenizer.encode(ex.context, True)
    if ex.continuation is None:
        return ctx, list(ctx)
    cont = tokenizer.encode(ex.continuation, False)
    if not cont:
        raise TrainError(f"continuation {ex.continuation!r} tokenizes to nothing")
    return ctx + cont, [-100] * len(ctx) + cont


class Collator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding) tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------ evaluation
class RuntimeEvaluator:
    """Scores a prompt on held-out rows through a ``Runtime`` (the served path): the prompt (an
    adapter directory, or anything ``rt.add_prompt`` takes) is registered as ``EVAL_PROMPT``
    (replacing the previous epoch's) and every row goes through
    one ``rt.classify`` (a label set: ``accuracy``) or ``rt.score`` call (``loglik``: the mean
    summed log-probability of a row's continuation, and ``loglik_per_token``)."""

    def __init__(self, rt, task: Task, rows: list[Example]):
        self.rt, self.task, self.rows = rt, task, rows
        self.metric = "accuracy" if task.classify else "loglik"

    def __call__(self, prompt) -> dict[str, float]:
        self.rt.add_prompt(EVAL_PROMPT, prompt)
        if self.task.classify:
            labels = self.task.continuations()
            res = self.rt.classify(EVAL_PROMPT, [r.context for r in self.rows], labels)
            hits = sum(r.label is not None and c.label == labels[r.label] for r, c in zip(self.rows, res))
            return {"accuracy": hits / len(self.rows)}
        res = self.rt.score([{"prompt": EVAL_PROMPT, "context": r.context,
                              "continuation": r.continuation} for r in self.rows])
        tokens = sum(len(s.token_logprobs) for s in res)
        total = sum(s.logprob for s in res)
        return {"loglik": total / len(res), "loglik_per_token": total / max(tokens, 1)}


def evaluate_adapter(peft_model, evaluator: RuntimeEvaluator, base_name: str | None) -> dict[str, float]:
    """The PEFT model's current adapter, saved as ``save_adapter`` saves it (into a temporary
    directory), scored by ``evaluator``: the runtime loads it as it loads any adapter."""
    with tempfile.TemporaryDirectory(prefix="softprompt-eval-") as tmp:
        write_adapter(peft_model, Path(tmp), base_name)
        return evaluator(tmp)


# ----------------------------------------------------------------------------- callbacks
def _callbacks(n_rows: int, batch_size: int, enabled: bool, evaluator: RuntimeEvaluator | None):
    from transformers import TrainerCallback

    def rows_at(step: int) -> int:
        per_epoch = math.ceil(n_rows / batch_size)
        return (step // per_epoch) * n_rows + min((step % per_epoch) * batch_size, n_rows)

    class Progress(TrainerCallback):
        """A bar over rows: loss, epoch, rows/s and ETA (tqdm's rate and remaining time)."""

        bar: Any = None

        def on_train_begin(self, args, state, control, **kw):
            if enabled:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=rows_at(state.max_steps), initial=rows_at(state.global_step),
                                unit="row", desc="train", dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:  # logged after each step
                self.bar.set_postfix(epoch=f"{state.epoch:.2f}", loss=f"{logs['loss']:.4f}")

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(rows_at(state.global_step) - rows_at(state.global_step - 1))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if enabled and metrics and evaluator is not None:
                line = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items()
                                 if k.startswith("eval_"))
                msg = f"epoch {round(state.epoch or 0)}: {line}"
                if self.bar is not None:
                    self.bar.write(msg)
                else:
                    print(msg, flush=True)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return [Progress()]


def _trainer_class():
    from transformers import Trainer

    class RuntimeTrainer(Trainer):
        """transformers' Trainer whose evaluation is the runtime's (``RuntimeEvaluator``), and
        whose checkpoints of an encoder type also hold the encoder (``ENCODER_FILE``)."""

        evaluator: RuntimeEvaluator | None = None
        base_name: str | None = None

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            got = evaluate_adapter(self.model, self.evaluator, self.base_name)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in got.items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            if self.args.should_save and needs_encoder_state(self.model):
                from safetensors.torch import save_file

                state = self.model.prompt_encoder["default"].state_dict()
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                          os.path.join(output_dir or self.args.output_dir, ENCODER_FILE))

        def _restore_encoder(self, checkpoint: str) -> None:
            from safetensors.torch import load_file

            path = Path(checkpoint) / ENCODER_FILE
            if not path.is_file():
                raise TrainError(f"{checkpoint} has no {ENCODER_FILE}: its prompt encoder cannot be "
                                 "restored; use --overwrite to start again")
            encoder = self.model.prompt_encoder["default"]
            device = next(encoder.parameters()).device
            encoder.load_state_dict({k: v.to(device) for k, v in load_file(path).items()}, strict=True)

        # PEFT's load_adapter would put the encoder's output where its input goes: restore the
        # encoder itself (the other types: the adapter file is the whole trained state)
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if needs_encoder_state(self.model):
                self._restore_encoder(resume_from_checkpoint)
            else:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self):
            if needs_encoder_state(self.model):
                self._restore_encoder(self.state.best_model_checkpoint)
            else:
                super()._load_best_model()

    return RuntimeTrainer


# --------------------------------------------------------------------------- the output dir
def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint (trainer state and RNG state written: a run killed while
    saving leaves an incomplete last one, which is skipped)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file() and (p / "rng_state.pth").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _prepare_out(cfg: TrainConfig, identity: dict) -> tuple[Path, str | None, dict]:
    """The output directory, the checkpoint to resume from and the job record."""
    out = Path(cfg.out)
    job_file, ckpt_dir = out / "train_job.json", out / "checkpoints"
    if cfg.overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in (*ADAPTER_FILES, "metrics.json", "train_job.json"):
            (out / name).unlink(missing_ok=True)
    resume_from = last_checkpoint(ckpt_dir)
    if job_file.is_file() or resume_from:
        if not cfg.resume:
            raise TrainError(f"{out} holds an earlier training run: pass --resume to continue it "
                             "or --overwrite to start again")
        job = json.loads(job_file.read_text()) if job_file.is_file() else {}
        diff = sorted(k for k in identity if job.get("identity", {}).get(k) != identity[k])
        if diff:
            raise TrainError(f"--resume: {out} was trained with other settings or data "
                             f"({', '.join(diff)} differ); use --overwrite to start again")
        return out, resume_from, job
    out.mkdir(parents=True, exist_ok=True)
    return out, None, {"identity": identity}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_adapter(peft_model, dest: Path, base_name: str | None) -> None:
    """``PeftModel.save_pretrained`` into ``dest``, naming the base model ``base_name``."""
    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = base_name
    cfg.tokenizer_name_or_path = base_name
    peft_model.save_pretrained(str(dest), save_embedding_layers=False)  # no hub lookup


def save_adapter(peft_model, out: Path, base_name: str | None) -> None:
    """The PEFT adapter into ``out``: written beside it, then each file moved in (weights first)."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".adapter-") as tmp:
        write_adapter(peft_model, Path(tmp), base_name)
        for name in ADAPTER_FILES:
            os.replace(Path(tmp) / name, out / name)


def _epoch_summary(log_history: list[dict], metric: str | None) -> list[dict]:
    """Per epoch: its mean training loss and, with evaluation, its held-out figures."""
    out: dict[int, dict] = {}
    for rec in log_history:
        if "epoch" not in rec:
            continue
        e = max(1, math.ceil(rec["epoch"] - 1e-9))
        row = out.setdefault(e, {"epoch": e, "_losses": []})
        if "loss" in rec:
            row["_losses"].append(rec["loss"])
        for k, v in rec.items():
            if k.startswith("eval_") and k != "eval_epoch":
                row[k.removeprefix("eval_")] = v
    rows = []
    for e in sorted(out):
        row = out[e]
        losses = row.pop("_losses")
        if losses:
            row["loss"] = sum(losses) / len(losses)
        if metric is None or metric in row or losses:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------- training
class _DropDeprecatedCache(logging.Filter):
    def filter(self, record):
        return "cache_params` are deprecated" not in record.getMessage()


@contextmanager
def _quiet():
    """Third-party deprecations PEFT 0.21 trips on transformers 5.24 (names it still calls:
    ``is_gradient_checkpointing``, and ``past_key_values=`` for the K/V types' prefix)."""
    log, drop = logging.getLogger("transformers.utils.generic"), _DropDeprecatedCache()
    log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            warnings.filterwarnings("ignore", ".*past_key_values.* is deprecated.*", FutureWarning)
            yield
    finally:
        log.removeFilter(drop)


def train(cfg: TrainConfig, callbacks: Sequence = ()) -> dict:
    """Train, evaluate every epoch, save the adapter and ``metrics.json`` into ``cfg.out``;
    returns the metrics. ``callbacks``: extra transformers ``TrainerCallback``s."""
    cfg = resolve(cfg)
    for name, value, low in (("--virtual-tokens", cfg.virtual_tokens, 1), ("--epochs", cfg.epochs, 1),
                             ("--batch-size", cfg.batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise TrainError(f"{name} must be an integer >= {low}, got {value!r}")
    if not cfg.lr > 0:
        raise TrainError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.eval_backend not in ("torch", "reference", "onnx"):
        raise TrainError(f"--eval-backend must be torch, reference or onnx, got {cfg.eval_backend!r}")
    task = Task(cfg.labels, cfg.template, cfg.label_prefix)
    train_rows, task = examples(cfg.data, task)
    held = examples(cfg.eval, task)[0] if cfg.eval else None
    identity = cfg.identity()
    out, resume_from, job = _prepare_out(cfg, identity)

    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from softprompt.models import display_name, load_model, model_dir
    from softprompt.runtime.api import Runtime
    from softprompt.runtime.requests import Tokenizer

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(cfg.seed)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=device)
    tok = Tokenizer.for_model(lm)
    if tok.tok is None:
        raise TrainError(f"model {cfg.model!r} has no tokenizer files: training needs text")
    P = cfg.virtual_tokens
    max_pos = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    dataset = []
    for ex in train_rows:
        ids, labels = encode(ex, tok)
        if max_pos and P + len(ids) > max_pos:
            raise TrainError(f"a training row has {len(ids)} tokens: with {P} virtual tokens "
                             f"that is over the model's {max_pos} positions")
        dataset.append({"input_ids": ids, "labels": labels})
    pad_id = tok.prefix_token_id if lm.tokenizer.pad_token_id is None else lm.tokenizer.pad_token_id

    peft_cfg = peft_config(cfg, str(model_dir(cfg.model)))
    with _quiet():
        # gradient checkpointing stays off (transformers' default): PEFT refuses the K/V types with it
        model = get_peft_model(lm.model, peft_cfg)
        if cfg.type in KV_TYPES and cfg.init.startswith("text:"):
            init_kv_from_text(model, lm.tokenizer, cfg.init[5:], P)
    base_name = display_name(cfg.model)

    rt = evaluator = None
    if held is not None:
        rt = Runtime.load(cfg.model, backend=cfg.eval_backend, device=None if cfg.eval_backend == "onnx" else device,
                          dtype=cfg.dtype)
        evaluator = RuntimeEvaluator(rt, task, held)
    try:
        if evaluator is not None and "initial" not in job:
            job["initial"] = evaluate_adapter(model, evaluator, base_name)  # the untrained prompt
        _write_json(out / "train_job.json", job)
        args = TrainingArguments(
            output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
            learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type=cfg.lr_scheduler,
            seed=cfg.seed, data_seed=cfg.seed, save_strategy="epoch",
            eval_strategy="epoch" if evaluator else "no", load_best_model_at_end=bool(evaluator),
            metric_for_best_model=evaluator.metric if evaluator else None, greater_is_better=True,
            logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True,
            use_cpu=str(device) == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
            label_names=["labels"], save_only_model=False)  # no gradient checkpointing: see above
        trainer = _trainer_class()(model=model, args=args, train_dataset=dataset,
                                   eval_dataset=held or None, data_collator=Collator(pad_id),
                                   callbacks=[*_callbacks(len(dataset), cfg.batch_size, cfg.progress,
                                                          evaluator), *callbacks])
        trainer.evaluator, trainer.base_name = evaluator, base_name
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        if resume_from and cfg.progress:
            print(f"softprompt train: resuming from {resume_from}", flush=True)
        with _quiet():
            trainer.train(resume_from_checkpoint=resume_from)
        seconds = time.perf_counter() - t0
        save_adapter(model, out, base_name)
        state = trainer.state
        epochs = _epoch_summary(state.log_history, evaluator.metric if evaluator else None)
        metrics: dict[str, Any] = {
            "model": base_name, "type": cfg.type, "peft_type": peft_cfg.peft_type.value,
            "num_virtual_tokens": P, "init": cfg.init,
            "rows": len(dataset), "eval_rows": len(held) if held else 0, "epochs": epochs,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device),
            "train_seconds": round(seconds, 2), "adapter": str(out)}
        if cfg.encoder is not None:
            metrics["encoder"] = cfg.encoder
        if cfg.type == "prefix_tuning":
            metrics["prefix_projection"] = cfg.prefix_projection
        if task.classify:
            metrics["labels"] = list(task.labels)
        if evaluator is not None:
            metric = evaluator.metric
            # the epoch whose checkpoint Trainer kept as the best and loaded at the end
            step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
            best_epoch = math.ceil(step / math.ceil(len(dataset) / cfg.batch_size))
            best = next(e for e in epochs if e["epoch"] == best_epoch)
            metrics.update(metric=metric, eval_backend=cfg.eval_backend, initial=job.get("initial"),
                           best_epoch=best["epoch"], best={k: v for k, v in best.items() if k != "epoch"})
        metrics.update(cfg.extra)
        _write_json(out / "metrics.json", metrics)
        return metrics
    finally:
        if rt is not None:
            rt.close()
