"""The two figures of ``softprompt bench``, from its results: throughput.png (sequences/s against
the prompt length P, one line per method) and speedup.png (over PEFT, with the ideal (P + L) / L
of not recomputing the prompt), one panel per (B, L). matplotlib is imported only here.
"""

from __future__ import annotations

from pathlib import Path

from softprompt.bench.methods import BASELINE

COLORS = {"peft": "tab:blue", "reference": "tab:gray", "copied": "tab:orange", "torch": "tab:green",
          "onnx": "tab:red", "onnx-int4": "tab:purple"}


def plot(results: list, env: dict, out: Path) -> list[Path]:
    """throughput.png (seq/s vs P) and speedup.png (vs peft, with the ideal (P+L)/L) in ``out``;
    ``results``: the driver's ``Result`` rows, ``env``: its environment record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r.B, r.L) for r in results})
    backends = list(dict.fromkeys(r.backend for r in results))
    name = env["model"]["name"]
    name = "SmolLM2-135M-Instruct" if name == "default" else Path(name).name
    title = f"{name} · {env['dtype']} · {env['device_name']} · batch scoring, 1 scored token/row"
    if len(title) > 55 * len(combos):  # one line per panel width
        title = title.replace(" · batch scoring", "\nbatch scoring")
    paths = []
    for what, ylabel in (("throughput", "sequences / s"), ("speedup", "speedup over PEFT")):
        fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.2), squeeze=False,
                                 dpi=100)
        for ax, (B, L) in zip(axes[0], combos):
            rows = [r for r in results if r.B == B and r.L == L]
            Ps = sorted({r.P for r in rows})
            x = {P: i for i, P in enumerate(Ps)}  # evenly spaced: the grid is 0, 1, 5, 20, 100, 150
            if what == "speedup":
                ax.plot(range(len(Ps)), [(P + L) / L for P in Ps], "k--", lw=1,
                        label="ideal (P+L)/L")
                ax.axhline(1.0, color=COLORS[BASELINE], lw=0.8, ls=":")
            for be in backends:
                pts = [(r.P, r.seq_per_s if what == "throughput" else r.speedup_vs_peft)
                       for r in rows if r.backend == be]
                pts = [(p, y) for p, y in pts if y is not None]
                if pts and not (what == "speedup" and be == BASELINE):
                    ax.plot([x[p] for p, _ in pts], [y for _, y in pts], "o-", ms=3.5, lw=1.4,
                            label=be, color=COLORS.get(be))
            ax.set_xticks(range(len(Ps)))
            ax.set_xticklabels([str(p) for p in Ps], fontsize=8)
            ax.set_xlabel("virtual tokens P")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.set_title(f"B={B}, L={L}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out / f"{what}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
