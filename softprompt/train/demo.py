"""Retrain the two demo soft prompts with ``softprompt train``.

    python -m softprompt.train.demo [--task all] [--epochs 3] [--seed 0] [--print]

A thin caller: for each task in ``softprompt.runtime.demo.TASKS`` it runs ``softprompt train``
on the default model with the task's data (``runtime/demo/<task>_train.jsonl``, held out
``<task>_test.jsonl``), labels, template and TEXT init (20 virtual tokens, AdamW lr 3e-2,
batch 8), writes the adapter to ``runtime/demo/prompts/<task>/`` and the held-out accuracy of
the untrained (text-init) and the trained prompt to ``runtime/demo/results.json``. ``--print``
shows the commands instead of running them. The data and the shipped prompts stay in
``runtime/demo/`` (``softprompt.runtime.demo``); this script lives in the top layer because it
drives the trainer, which the runtime must not import.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

from softprompt.runtime.demo import DEMO_DIR, PROMPTS_DIR, TASKS

NUM_VIRTUAL_TOKENS = 20


def commands(epochs: int = 3, seed: int = 0, out: Path = PROMPTS_DIR, work: Path | None = None,
             tasks=None) -> dict[str, list[str]]:
    """{task: ``softprompt train`` argv}: ``out/<task>`` receives the adapter (``work/<task>``
    the run itself when given: checkpoints and metrics stay out of the shipped folder)."""
    argv = {}
    for name in tasks or TASKS:
        t = TASKS[name]
        argv[name] = ["train", "default", "--data", str(DEMO_DIR / f"{name}_train.jsonl"),
                      "--eval", str(DEMO_DIR / f"{name}_test.jsonl"),
                      "--out", str((work or out) / name), "--labels", ",".join(t.label_names),
                      "--template", t.template.replace("\n", "\\n"), "--label-prefix", " ",
                      "--init", f"text:{t.init_text}", "--virtual-tokens", str(NUM_VIRTUAL_TOKENS),
                      "--lr", "3e-2", "--batch-size", "8", "--epochs", str(epochs),
                      "--seed", str(seed), "--overwrite"]
    return argv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="all", choices=["all", *TASKS])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=PROMPTS_DIR)
    ap.add_argument("--work", type=Path, default=Path("demo-train"),
                    help="where the runs keep checkpoints and metrics (default: %(default)s)")
    ap.add_argument("--results", type=Path, default=DEMO_DIR / "results.json")
    ap.add_argument("--print", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    cmds = commands(args.epochs, args.seed, args.out, args.work, tasks)
    if args.print:
        for cmd in cmds.values():
            print(shlex.join(["softprompt", *cmd]))
        return 0
    from softprompt.cli import main as softprompt

    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name, cmd in cmds.items():
        softprompt(cmd)
        run = args.work / name
        m = json.loads((run / "metrics.json").read_text())
        (args.out / name).mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(run / f, args.out / name / f)
        results[name] = {"trained_acc": round(m["best"]["accuracy"], 4),
                         "text_init_acc": round(m["initial"]["accuracy"], 4),
                         "n_test": m["eval_rows"], "epochs": args.epochs,
                         "best_epoch": m["best_epoch"], "train_seconds": m["train_seconds"],
                         "lr": m["lr"], "batch_size": m["batch_size"], "seed": m["seed"],
                         "num_virtual_tokens": m["num_virtual_tokens"]}
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| task | trained acc | text-init acc | n_test | epochs | train s |")
    print("|---|---|---|---|---|---|")
    for name in tasks:
        r = results[name]
        print(f"| {name} | {r['trained_acc']:.3f} | {r['text_init_acc']:.3f} | {r['n_test']} "
              f"| {r['epochs']} | {r['train_seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
