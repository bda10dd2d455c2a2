"""Train the demo soft prompts with PEFT prompt tuning and measure them on held-out data.

    python -m softprompt.runtime.demo.train_prompts [--task all] [--epochs 3] [--seed 0]

For each task in ``softprompt.runtime.demo.TASKS``: wrap the frozen default model in a PEFT
``PROMPT_TUNING`` adapter (20 virtual tokens, TEXT init from ``task.init_text``), train only
the prompt with AdamW on the cross-entropy of the label tokens given prompt + context,
evaluate held-out accuracy of the text-init prompt (before training) and of the trained
prompt, and save the adapter to ``prompts/<task>/``. Results go to ``results.json``.
Runs on CPU in a few minutes; seeded and deterministic for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from . import DEMO_DIR, PROMPTS_DIR, TASKS, Task, load_examples

NUM_VIRTUAL_TOKENS = 20
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"


def _encode(task: Task, tokenizer, examples: list[dict]):
    """(context ids, [label ids per label]) per example; label ids checked to concatenate."""
    label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in task.labels]
    out = []
    for ex in examples:
        ctx = task.format(ex["text"])
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        for lab, ids in zip(task.labels, label_ids):
            joint = tokenizer(ctx + lab, add_special_tokens=False)["input_ids"]
            if joint != ctx_ids + ids:
                raise ValueError(f"{task.name}: label {lab!r} does not tokenize the same after "
                                 f"the context {ctx!r}")
        out.append((ctx_ids, task.label_index(ex["label"])))
    return out, label_ids


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 outside the continuation)."""
    n = max(len(c) + len(t) for c, t in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (c, t) in enumerate(seqs):
        ids[i, :len(c) + len(t)] = torch.tensor(c + t)
        mask[i, :len(c) + len(t)] = 1
        labels[i, len(c):len(c) + len(t)] = torch.tensor(t)
    return ids, mask, labels


def _continuation_logprobs(peft_model, ids, mask, labels) -> torch.Tensor:
    """Summed log-prob of each row's labelled tokens, given the soft prompt + context."""
    logits = peft_model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, -ids.shape[1]:]  # drop the virtual-token positions PEFT prepends
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (tgt != -100)).sum(-1)


@torch.no_grad()
def evaluate(peft_model, data, label_ids, pad_id: int, batch_size: int = 32) -> float:
    """Accuracy: the label whose continuation has the highest summed log-prob wins."""
    scores = []
    if all(len(t) == 1 for t in label_ids):  # one forward per example: next-token log-probs
        first = torch.tensor([t[0] for t in label_ids])
        for i in range(0, len(data), batch_size):
            ctxs = [c for c, _ in data[i:i + batch_size]]
            ids, mask, _ = _batch([(c, []) for c in ctxs], pad_id)
            logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
            last = logits[torch.arange(len(ctxs)), torch.tensor([len(c) - 1 for c in ctxs])]
            scores.append(torch.log_softmax(last.float(), dim=-1)[:, first])
        scores = torch.cat(scores)
    else:  # general case: score every (example, label) continuation
        seqs = [(c, t) for c, _ in data for t in label_ids]
        for i in range(0, len(seqs), batch_size):
            scores.append(_continuation_logprobs(peft_model, *_batch(seqs[i:i + batch_size], pad_id)))
        scores = torch.cat(scores).view(len(data), len(label_ids))
    gold = torch.tensor([y for _, y in data])
    return float((scores.argmax(-1) == gold).float().mean())


def train_task(task: Task, base, tokenizer, model_dir: str, epochs: int, seed: int,
               lr: float, batch_size: int, out_dir: Path) -> dict:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                             prompt_tuning_init=PromptTuningInit.TEXT,
                             prompt_tuning_init_text=task.init_text,
                             tokenizer_name_or_path=model_dir)
    model = get_peft_model(base, cfg)
    model.eval()  # no dropout anywhere; only the prompt embeddings get gradients
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, label_ids = _encode(task, tokenizer, load_examples(task, "train"))
    test, _ = _encode(task, tokenizer, load_examples(task, "test"))

    text_init_acc = evaluate(model, test, label_ids, pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{task.name}", unit="step")
    for epoch in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            rows = [train[i] for i in order[s * batch_size:(s + 1) * batch_size]]
            ids, mask, labels = _batch([(c, label_ids[y]) for c, y in rows], pad_id)
            # mean over examples of the label tokens' cross-entropy (summed within a label)
            loss = -_continuation_logprobs(model, ids, mask, labels).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - t0
    trained_acc = evaluate(model, test, label_ids, pad_id)

    # Name the base model, not the machine-local path it was loaded from.
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    model.peft_config["default"].tokenizer_name_or_path = BASE_MODEL_NAME
    out = out_dir / task.name
    model.save_pretrained(str(out), save_embedding_layers=False)  # no hub lookup for the name
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    return {"trained_acc": round(trained_acc, 4), "text_init_acc": round(text_init_acc, 4),
            "n_test": len(test), "epochs": epochs, "train_seconds": round(train_seconds, 1),
            "lr": lr, "batch_size": batch_size, "seed": seed,
            "num_virtual_tokens": NUM_VIRTUAL_TOKENS}


def check_saved(out: Path, base, hidden_size: int) -> None:
    """The saved adapter loads both as a SoftPrompt and as a PEFT model."""
    from peft import PeftModel

    from ..prompts import SoftPrompt

    sp = SoftPrompt.from_peft(out).validate(hidden_size)
    assert sp.num_virtual_tokens == NUM_VIRTUAL_TOKENS, sp.num_virtual_tokens
    pm = PeftModel.from_pretrained(base, str(out))
    got = pm.get_prompt_embedding_to_save("default").detach().float().numpy()
    assert (abs(got - sp.embeddings) < 1e-6).all(), "PEFT and SoftPrompt loads differ"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="all", choices=["all", *TASKS])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=PROMPTS_DIR)
    ap.add_argument("--results", type=Path, default=DEMO_DIR / "results.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from softprompt.models import default_model_dir, load_model

    lm = load_model("default")
    model_dir = str(default_model_dir())
    base, tok = lm.model, lm.tokenizer

    tasks = list(TASKS) if args.task == "all" else [args.task]
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name in tasks:
        results[name] = train_task(TASKS[name], base, tok, model_dir, args.epochs, args.seed,
                                   args.lr, args.batch_size, args.out)
        base.requires_grad_(False)
        check_saved(args.out / name, base, lm.hidden_size)
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
