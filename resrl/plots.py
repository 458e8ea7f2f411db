"""Plots saved as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_pass_at_k(curves: dict[str, dict[int, float]], path: Path, title: str = "Pass@k") -> Path:
    """One line per label: Pass@k against k (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, table in curves.items():
        ks = sorted(table)
        ax.plot(ks, [table[k] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
