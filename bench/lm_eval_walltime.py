"""lm-evaluation-harness on the demo's held-out sentiment set: the ``softprompt`` model beside
lm-eval's own ``hf`` model with ``peft=`` on the same adapter, wall times side by side.

    python -m softprompt.bench.lm_eval_walltime [--hf-batch-sizes 1,8] [--out results.json]

The task (40 reviews x 2 labels = 80 log-likelihood requests, multiple choice) is written to a
temporary directory as lm-eval YAML + JSONL; nothing is downloaded (HF_HUB_OFFLINE=1). Each
row is one ``lm_eval.simple_evaluate`` call on an already loaded model (load time listed
apart), and every row's per-request log-likelihoods are compared with the first ``hf`` row's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def write_task(root: Path) -> str:
    """The held-out sentiment set as the lm-eval multiple-choice task ``demo_sentiment``."""
    from softprompt.runtime.demo import DEMO_DIR, TASKS

    task = TASKS["sentiment"]
    (root / "sentiment.yaml").write_text(f"""task: demo_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DEMO_DIR / "sentiment_test.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: {json.dumps(task.template.replace("{text}", "{{text.strip()}}"))}
doc_to_choice: {list(task.label_names)!r}
doc_to_target: "{{{{{list(task.label_names)!r}.index(label)}}}}"
metric_list:
  - metric: acc
""")
    return "demo_sentiment"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="onnx,torch", help="softprompt backends to time")
    ap.add_argument("--hf-batch-sizes", default="1,8", help="lm-eval hf batch sizes to time")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from softprompt.lm_eval import SoftPromptLM
    from softprompt.runtime.demo import PROMPTS_DIR
    from softprompt.models import default_model_dir

    adapter = str(PROMPTS_DIR / "sentiment")
    from softprompt.runtime.prompts import SoftPrompt

    prompt_len = SoftPrompt.load(adapter).num_virtual_tokens
    root = Path(tempfile.mkdtemp(prefix="softprompt-lm-eval-"))
    name = write_task(root)
    tasks = TaskManager(include_path=str(root))
    # every model on CPU in float32 (the hf rows' device and dtype), whatever the machine has
    makers = [(f"softprompt backend={b}", lambda b=b: SoftPromptLM(model="default", prompt=adapter,
                                                                   backend=b, device="cpu",
                                                                   dtype="float32"))
              for b in args.backends.split(",") if b]
    makers += [(f"hf peft= batch_size={n}", lambda n=n: HFLM(
        pretrained=str(default_model_dir()), peft=adapter, device="cpu", dtype="float32",
        batch_size=int(n))) for n in args.hf_batch_sizes.split(",") if n]
    rows, ref = [], None
    for label, make in makers:
        t0 = time.perf_counter()
        lm = make()
        t1 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tasks, log_samples=True)
        t2 = time.perf_counter()
        lls = [float(ll) for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])
               for ll, _ in s["filtered_resps"]]
        if label.startswith("hf") and ref is None:
            ref = lls
        rows.append({"model": label, "load_s": round(t1 - t0, 2), "evaluate_s": round(t2 - t1, 2),
                     "acc": res["results"][name]["acc,none"], "loglikelihoods": lls})
        del lm
    from transformers import AutoTokenizer

    from softprompt.runtime.demo import TASKS, load_examples

    tok, task = AutoTokenizer.from_pretrained(default_model_dir()), TASKS["sentiment"]
    lengths = [len(tok.encode(task.format(e["text"]) + label)) for e in load_examples("sentiment")
               for label in task.labels]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"device: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"every model on CPU in float32; task {name}: {len(lengths)} requests of "
          f"{min(lengths)}-{max(lengths)} tokens (context + label), P={prompt_len} (the adapter's)")
    print("| model | load (s) | simple_evaluate (s) | acc | max abs dlogprob vs hf |")
    print("|---|---|---|---|---|")
    for r in rows:
        d = max(abs(a - b) for a, b in zip(r["loglikelihoods"], ref)) if ref else float("nan")
        r["max_abs_diff_vs_hf"] = d
        print(f"| {r['model']} | {r['load_s']} | {r['evaluate_s']} | {r['acc']} | {d:.1e} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
