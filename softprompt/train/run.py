"""``train``: a soft prompt trained with PEFT and transformers' Trainer, evaluated on the runtime.

PEFT does the model (``get_peft_model`` with a ``PromptTuningConfig``: TEXT, SAMPLE_VOCAB or
RANDOM init, only the prompt's embeddings trainable) and transformers' ``Trainer`` does the
loop: AdamW, the learning-rate schedule, batches in a seeded order, a checkpoint at the end of
every epoch (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``), resuming from
the last one (``--resume``), and keeping the best epoch (``load_best_model_at_end``). What is
ours:

- the rows (``data.py``), tokenised exactly as the runtime tokenises a request (context with
  the tokenizer's special tokens, continuation without), the loss on the continuation's tokens;
- evaluation through the served path: ``Trainer.evaluate`` is replaced by ``RuntimeEvaluator``,
  which registers the epoch's prompt in one ``Runtime`` built once on the same model
  (``rt.add_prompt``: its prefix computed and cached) and scores the held-out rows in batches:
  accuracy with ``rt.classify`` for a label set, mean log-likelihood with ``rt.score`` otherwise.
  The figures are therefore those ``rt.classify`` / ``rt.score`` give for the saved adapter;
- a progress bar over rows (loss, rows/s, ETA), the output directory and ``metrics.json``.

Output directory ``out``: ``adapter_config.json`` + ``adapter_model.safetensors`` (the best
epoch's prompt, or the last one without ``--eval``; replaced file by file, weights first, so a
watching server never reads a config newer than its weights), ``metrics.json``,
``train_job.json`` (what the run is: a resumed run must match it) and ``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import Example, Task, TrainError, examples, file_digest

# PEFT's prompt-learning types, and the ones the runtime serves (and so can be trained here).
PROMPT_LEARNING_TYPES = ("prompt_tuning", "p_tuning", "prefix_tuning", "multitask_prompt_tuning",
                         "cpt")
SERVED_TYPES = ("prompt_tuning",)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the order they are replaced
EVAL_PROMPT = "softprompt-train-eval"  # the name each epoch's prompt gets in the eval runtime


@dataclass
class TrainConfig:
    """One training run (``softprompt train``'s flags).

    model: as ``Runtime.load`` takes it (``default``, a directory, a hub id, a ``.gguf``).
    data / eval: JSONL, CSV or Parquet rows (``data.py``); eval is optional.
    out: the output directory. type: the PEFT prompt-learning type (``prompt_tuning``).
    init: ``vocab`` (PEFT SAMPLE_VOCAB), ``random`` (RANDOM) or ``text:...`` (TEXT).
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
    init: str = "vocab"
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
        return d


def check_type(peft_type: str) -> str:
    """``peft_type`` normalised (``prompt_tuning``), or a one-line TrainError naming what is
    served."""
    t = str(peft_type).lower().replace("-", "_")
    if t in SERVED_TYPES:
        return t
    if t in PROMPT_LEARNING_TYPES:
        raise TrainError(f"--type {t} is not served by the runtime yet, so it is not trained "
                         f"here; supported: {', '.join(SERVED_TYPES)}")
    raise TrainError(f"unknown --type {peft_type!r}: PEFT's prompt-learning types are "
                     f"{', '.join(PROMPT_LEARNING_TYPES)}; supported: {', '.join(SERVED_TYPES)}")


def peft_init(init: str) -> tuple[str, str | None]:
    """(PEFT ``PromptTuningInit`` name, init text) of an ``--init`` value."""
    if init == "vocab":
        return "SAMPLE_VOCAB", None
    if init == "random":
        return "RANDOM", None
    if init.startswith("text:") and init[5:].strip():
        return "TEXT", init[5:]
    raise TrainError(f"--init must be text:\"...\" (non-empty), vocab or random, got {init!r}")


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
    """Scores a prompt on held-out rows through a ``Runtime`` (the served path): the prompt is
    registered as ``EVAL_PROMPT`` (replacing the previous epoch's) and every row goes through
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


def prompt_of(peft_model):
    """The PEFT model's current prompt as a ``SoftPrompt`` (what ``save_pretrained`` writes)."""
    import torch

    from softprompt.runtime.prompts import SoftPrompt

    with torch.no_grad():
        emb = peft_model.get_prompt_embedding_to_save("default")
    return SoftPrompt(emb.float(), name=EVAL_PROMPT, init="peft")


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
        """transformers' Trainer whose evaluation is the runtime's (``RuntimeEvaluator``)."""

        evaluator: RuntimeEvaluator | None = None

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluator(prompt_of(self.model)).items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

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


def save_adapter(peft_model, out: Path, base_name: str | None) -> None:
    """The PEFT adapter into ``out``: written beside it, then each file moved in (weights first)."""
    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = base_name
    cfg.tokenizer_name_or_path = base_name
    with tempfile.TemporaryDirectory(dir=out, prefix=".adapter-") as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False)  # no hub lookup
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
def train(cfg: TrainConfig, callbacks: Sequence = ()) -> dict:
    """Train, evaluate every epoch, save the adapter and ``metrics.json`` into ``cfg.out``;
    returns the metrics. ``callbacks``: extra transformers ``TrainerCallback``s."""
    check_type(cfg.type)
    init, init_text = peft_init(cfg.init)
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
    from peft import PromptTuningConfig, TaskType, get_peft_model
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

    peft_cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P,
                                  prompt_tuning_init=init, prompt_tuning_init_text=init_text,
                                  tokenizer_name_or_path=str(model_dir(cfg.model)) if init_text else None)
    with warnings.catch_warnings():  # transformers' deprecated name, called by PEFT
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        model = get_peft_model(lm.model, peft_cfg)

    rt = evaluator = None
    if held is not None:
        rt = Runtime.load(cfg.model, backend=cfg.eval_backend, device=None if cfg.eval_backend == "onnx" else device,
                          dtype=cfg.dtype)
        evaluator = RuntimeEvaluator(rt, task, held)
    try:
        if evaluator is not None and "initial" not in job:
            job["initial"] = evaluator(prompt_of(model))  # the untrained (init) prompt
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
            label_names=["labels"], save_only_model=False)
        trainer = _trainer_class()(model=model, args=args, train_dataset=dataset,
                                   eval_dataset=held or None, data_collator=Collator(pad_id),
                                   callbacks=[*_callbacks(len(dataset), cfg.batch_size, cfg.progress,
                                                          evaluator), *callbacks])
        trainer.evaluator = evaluator
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        if resume_from and cfg.progress:
            print(f"softprompt train: resuming from {resume_from}", flush=True)
        with warnings.catch_warnings():  # the same, called by the Trainer
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            trainer.train(resume_from_checkpoint=resume_from)
        seconds = time.perf_counter() - t0
        base_name = display_name(cfg.model)
        save_adapter(model, out, base_name)
        state = trainer.state
        epochs = _epoch_summary(state.log_history, evaluator.metric if evaluator else None)
        metrics: dict[str, Any] = {
            "model": base_name, "type": cfg.type, "num_virtual_tokens": P, "init": cfg.init,
            "rows": len(dataset), "eval_rows": len(held) if held else 0, "epochs": epochs,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": str(device),
            "train_seconds": round(seconds, 2), "adapter": str(out)}
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
