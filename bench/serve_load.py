"""Load benchmark of ``softprompt serve``: the same closed-loop load through the HTTP server and
straight into an in-process Runtime, side by side in one run.

C clients each send their next request as soon as the previous one is answered (closed loop),
at C = 1, 8, 32 by default. A request scores one (context, label) pair of the shipped demo
tasks under its soft prompt (``POST /v1/score`` with one item, or ``Runtime.score([item])``
from C threads), or with ``--generate-every K`` every K-th request is a greedy completion of
``--max-tokens`` tokens (``POST /v1/completions`` / ``Runtime.generate``). Both paths run on
the same model and backend; the server is a subprocess on 127.0.0.1, the in-process Runtime
lives in this process, and only one of them works at a time; the paths alternate over
``--rounds`` so that drift in the machine's load falls on both. Every HTTP answer is checked
against the in-process answer of the same request (log-probs within 1e-3, identical text).

    python -m softprompt.bench.serve_load --concurrency 1,8,32 --requests 192 --rounds 3 --out bench/out/serve_load

Writes results.json, results.md and serve-load.png into --out and prints the table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def workload(n: int, generate_every: int, max_tokens: int) -> list[tuple[str, dict]]:
    """n requests cycling over the demo test sets: ("score", item) or ("generate", body)."""
    from softprompt.runtime.demo import TASKS, load_examples

    pairs = [(t, TASKS[t].format(ex["text"]), lab) for t in TASKS
             for ex in load_examples(t) for lab in TASKS[t].labels]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        task, ctx, lab = pairs[int(rng.integers(len(pairs)))]
        if generate_every and i % generate_every == generate_every - 1:
            out.append(("generate", {"model": task, "prompt": ctx, "max_tokens": max_tokens,
                                     "temperature": 0, "ignore_eos": True}))
        else:
            out.append(("score", {"prompt": task, "context": ctx, "continuation": lab}))
    return out


def run_closed_loop(jobs, concurrency: int, call) -> tuple[float, list[float], list]:
    """Run ``call(job)`` for every job from ``concurrency`` threads, each taking the next job
    when its previous one finishes. Returns (wall seconds, per-request latencies, results)."""
    results, latencies = [None] * len(jobs), [0.0] * len(jobs)
    next_job = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker():
        state = {}
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                return
            t0 = time.perf_counter()
            results[i] = call(jobs[i], state)
            latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, results


def in_process_call(rt):
    def call(job, state):
        kind, body = job
        if kind == "score":
            return rt.score([body])[0].token_logprobs
        return rt.generate(body["model"], [body["prompt"]], max_new_tokens=body["max_tokens"],
                           stop_at_eos=False)[0].text
    return call


def http_call(port: int):
    def call(job, state):
        kind, body = job
        conn = state.get("conn")
        if conn is None:  # one keep-alive connection per client
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        path = "/v1/score" if kind == "score" else "/v1/completions"
        payload = {"requests": [body]} if kind == "score" else body
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
        if kind == "score":
            return data["data"][0]["token_logprobs"]
        return data["choices"][0]["text"]
    return call


def start_server(args, port: int, log: Path) -> subprocess.Popen:
    from softprompt.runtime.demo import PROMPTS_DIR, TASKS

    cmd = [sys.executable, "-m", "softprompt.cli", "serve", args.model, "--backend", args.backend,
           "--port", str(port), "--max-queue", "4096", "--log-level", "warning"]
    for t in TASKS:
        cmd += ["--prompt", f"{t}={PROMPTS_DIR / t}"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    for _ in range(1200):  # up to 10 min: a first run may export the model
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/ready")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready after 10 minutes")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def summary(path: str, c: int, walls: list[float], lat: list[float], n: int) -> dict:
    """Median throughput over the rounds; latency percentiles over every request of them."""
    ms = np.array(lat) * 1000
    rps = [n / w for w in walls]
    return {"path": path, "concurrency": c, "requests_per_round": n, "rounds_rps": rps,
            "throughput_rps": float(np.median(rps)), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def check_same(kind_jobs, a, b) -> None:
    for (kind, _), x, y in zip(kind_jobs, a, b):
        if kind == "score":
            np.testing.assert_allclose(x, y, atol=1e-3, rtol=0)
        elif x != y:
            raise AssertionError(f"HTTP completion {y!r} differs from in-process {x!r}")


def table(rows: list[dict]) -> str:
    lines = ["| concurrency | in-process req/s | HTTP req/s | HTTP / in-process "
             "| in-process p50 / p99 ms | HTTP p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    for c in sorted({r["concurrency"] for r in rows}):
        ip = next(r for r in rows if r["concurrency"] == c and r["path"] == "in-process")
        ht = next(r for r in rows if r["concurrency"] == c and r["path"] == "http")
        lines.append(f"| {c} | {ip['throughput_rps']:.1f} | {ht['throughput_rps']:.1f} | "
                     f"{ht['throughput_rps'] / ip['throughput_rps']:.0%} | "
                     f"{ip['p50_ms']:.0f} / {ip['p99_ms']:.0f} | {ht['p50_ms']:.0f} / {ht['p99_ms']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("in-process", "o-"), ("http", "s--")):
        rs = sorted((r for r in rows if r["path"] == name), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        ax1.plot(cs, [r["throughput_rps"] for r in rs], style, label=name)
        ax2.plot(cs, [r["p50_ms"] for r in rs], style, label=f"{name} p50")
        ax2.plot(cs, [r["p99_ms"] for r in rs], style, alpha=0.5, label=f"{name} p99")
    for ax, ylabel in ((ax1, "requests / s"), (ax2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}),
                      [str(c) for c in sorted({r["concurrency"] for r in rows})])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softprompt.bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="auto")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=192, help="measured requests per run")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per path and concurrency, alternating the paths' order")
    p.add_argument("--generate-every", type=int, default=0,
                   help="every K-th request is a completion (0: scores only)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", default="bench/out/serve_load")
    args = p.parse_args(argv)
    conc = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from softprompt import Runtime
    from softprompt.bench.labels import prompt_lengths, runtime_label
    from softprompt.machine import cpu_model, package_versions
    from softprompt.runtime.demo import PROMPTS_DIR, TASKS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args, port, out / "server.log")
    try:
        rt = Runtime.load(args.model, backend=args.backend)
        for t in TASKS:
            rt.add_prompt(t, PROMPTS_DIR / t)
        rt.warmup()
        jobs = workload(args.requests, args.generate_every, args.max_tokens)
        rows = []
        paths = {"in-process": in_process_call(rt), "http": http_call(port)}
        for c in conc:
            walls, lats, answers = {k: [] for k in paths}, {k: [] for k in paths}, {}
            for name, call in paths.items():
                run_closed_loop(jobs[: 2 * c], c, call)  # warm-up, not measured
            for r in range(args.rounds):  # alternate which path goes first: drift cancels
                for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                    wall, lat, res = run_closed_loop(jobs, c, paths[name])
                    walls[name].append(wall)
                    lats[name] += lat
                    answers.setdefault(name, res)
                    print(f"C={c:3d} round {r} {name:10s} {len(jobs) / wall:7.1f} req/s", flush=True)
            check_same(jobs, answers["in-process"], answers["http"])
            for name in paths:
                rows.append(summary(name, c, walls[name], lats[name], len(jobs)))
                x = rows[-1]
                print(f"C={c:3d} {name:10s} median {x['throughput_rps']:7.1f} req/s  p50 "
                      f"{x['p50_ms']:7.1f} ms  p99 {x['p99_ms']:7.1f} ms", flush=True)
        backend, model = rt.backend.name, rt.model_name
        ran, prompts = runtime_label(rt), prompt_lengths(rt, list(TASKS))
        rt.close()
    finally:
        code = stop_server(proc)
    mix = (f"every {args.generate_every}th request a {args.max_tokens}-token greedy completion"
           if args.generate_every else "score requests only")
    cmd = "python -m softprompt.bench.serve_load " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    env = {"device": cpu_model(), "cpu_count": os.cpu_count(), "backend": backend, "runtime": ran,
           "prompts": prompts,
           "model": model, "workload": mix, "server_exit_code": code,
           "load_average": list(os.getloadavg()), "versions": package_versions(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": cmd}
    md = (f"{env['device']} ({env['cpu_count']} cores), {model}, {ran} (the server: the same "
          f"--backend {args.backend}); one request = one (context, label) pair of the demo tasks "
          f"({prompts}, ~20-40 tokens); {mix}; closed loop; {args.rounds} rounds of {args.requests} requests "
          f"per path and concurrency, paths alternating; throughput: median of the rounds, "
          f"latency: over all their requests.\n\n"
          + table(rows) + f"\n\nCommand: `{cmd}`\n")
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "results.md").write_text(md)
    plot(rows, f"softprompt serve vs in-process: {model}, {backend}, {env['device']}",
         out / "serve-load.png")
    print("\n" + md)
    print(f"server exit code after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
