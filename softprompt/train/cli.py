"""``softprompt train``: its parser and command (added to ``softprompt/cli.py`` as a lazy verb)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _labels(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a soft prompt with PEFT, evaluated on the runtime "
                       "every epoch (resumable; --serve-url uploads it)",
                       description="Train a soft prompt with PEFT and transformers' Trainer on rows "
                       "{context, continuation} (or {text, label} with --labels), evaluate it on "
                       "held-out rows through the runtime every epoch, keep the best epoch, and "
                       "write a PEFT adapter and metrics.json into --out. See docs/training.md.")
    p.add_argument("model", nargs="?", default="default",
                   help="'default', a Hugging Face model directory or hub id, or a .gguf file "
                        "(default: %(default)s)")
    p.add_argument("--data", required=True, help="training rows: JSONL, CSV or Parquet")
    p.add_argument("--out", required=True, help="output directory: the adapter, metrics.json, "
                   "checkpoints/")
    p.add_argument("--eval", default=None, metavar="HELD_OUT",
                   help="held-out rows scored through the runtime every epoch; the best epoch is kept")
    p.add_argument("--type", default="prompt_tuning",
                   help="PEFT prompt-learning type: prompt_tuning, p_tuning (an MLP or LSTM encoder), "
                        "prefix_tuning (K/V of every layer) or cartridge (K/V, first token frozen); "
                        "multitask_prompt_tuning and cpt are not trained here (default: %(default)s)")
    p.add_argument("--virtual-tokens", type=int, default=20, metavar="N", help="P (default: %(default)s)")
    p.add_argument("--init", default=None, metavar='text:"..."|vocab|random',
                   help="prompt_tuning: PEFT TEXT from the given text, SAMPLE_VOCAB (vocab, its "
                        "default) or RANDOM; prefix_tuning and cartridge: random (default) or text "
                        "(the model's own K/V of the text's first P tokens, PEFT's "
                        "initialize_kv_prefix_from_text; not with --prefix-projection); p_tuning: "
                        "random only")
    p.add_argument("--encoder", default=None, choices=["mlp", "lstm"],
                   help="p_tuning's prompt encoder (default: mlp)")
    p.add_argument("--prefix-projection", action="store_true",
                   help="prefix_tuning through PEFT's projection MLP (its output is what is saved)")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--lr-scheduler", default="constant",
                   help="transformers' lr_scheduler_type (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--labels", nargs="?", const="", default=None, type=str, metavar="L1,L2,...",
                   help="rows are {text, label}: classify over these labels (without a list: the "
                        "training rows' labels, in order of first appearance); accuracy is the "
                        "evaluation metric")
    p.add_argument("--template", default="{text}",
                   help="context of a {text, label} row, e.g. 'Review: {text}\\nSentiment:' "
                        "(backslash escapes \\n and \\t are read; default: %(default)s)")
    p.add_argument("--label-prefix", default=" ", help="put before each label to make its "
                   "continuation (default: a space)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype for training and evaluation (default: %(default)s)")
    p.add_argument("--eval-backend", default="torch", choices=["torch", "reference", "onnx"],
                   help="runtime backend of the evaluation (default: %(default)s, the cached prefix)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (after a crash or kill)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--serve-url", default=None, metavar="URL",
                   help="upload the result to a running 'softprompt serve' (POST /v1/prompts)")
    p.add_argument("--name", default=None, help="the prompt's name on the server (default: the "
                   "--out directory's name)")
    p.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the server's admin key (default: $SOFTPROMPT_ADMIN_KEY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def cmd_train(args) -> int:
    from pathlib import Path

    from .data import TrainError
    from .run import TrainConfig, train
    from .upload import upload

    cfg = TrainConfig(data=args.data, out=args.out, model=args.model, eval=args.eval, type=args.type,
                      virtual_tokens=args.virtual_tokens, init=args.init, encoder=args.encoder,
                      prefix_projection=args.prefix_projection, lr=args.lr,
                      epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      lr_scheduler=args.lr_scheduler,
                      labels=None if args.labels is None else _labels(args.labels),
                      template=_unescape(args.template), label_prefix=_unescape(args.label_prefix),
                      device=args.device, dtype=args.dtype, eval_backend=args.eval_backend,
                      resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        m = train(cfg)
        summary = {k: m[k] for k in ("adapter", "best_epoch", "best", "initial") if k in m}
        summary["last_epoch"] = m["epochs"][-1] if m["epochs"] else None
        print(json.dumps(summary), flush=True)
        if args.serve_url:
            name = args.name or Path(args.out).resolve().name
            card = upload(args.out, args.serve_url, name,
                          admin_key=args.admin_key or os.environ.get("SOFTPROMPT_ADMIN_KEY"))
            print(f"softprompt train: uploaded as {card.get('id', name)!r} to {args.serve_url} "
                  f"(P={card.get('num_virtual_tokens')})", file=sys.stderr)
    except TrainError as e:
        raise SystemExit(f"softprompt train: {e}") from None
    return 0
