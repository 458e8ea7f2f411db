"""The comparison report of a sweep: final Avg@k / Pass@k and the mean lazy likelihood
displacement (LLD) per configuration with the mean and a 95 % confidence interval over
seeds, Pass@k curves, LLD against step, and a heat map of the headline metric over two
swept keys (with the interval in each cell). Input is one row per run (params + final
metrics), so it can be rebuilt from MLflow alone.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and the half-width of a two-sided 95 % Student-t interval (nan for one value)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t.ppf(0.975, n - 1) * sd / math.sqrt(n), n


def summarize(runs: pd.DataFrame, group_keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per configuration (group_keys), over its seeds: `<metric>` mean and `<metric>_ci95`."""
    rows = []
    for key, frame in runs.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), runs)]:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_keys, key))
        finished = frame[frame["status"] == "finished"]
        row["runs"] = len(frame)
        row["failed"] = int((frame["status"] != "finished").sum())
        for m in metrics:
            values = [float(v) for v in finished.get(m, pd.Series(dtype=float)).dropna()]
            row[m], row[f"{m}_ci95"], _ = mean_ci95(values)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, group_keys: list[str], reference: dict, metrics: list[str]) -> pd.DataFrame:
    """Each configuration minus the reference one, seed by seed, on each metric: mean and 95 %
    t half-width of the per-seed differences. Seeds share the warm-start and the prompts, so
    pairing removes the seed-to-seed spread, which on a small testbed is larger than the
    differences between algorithms."""
    done = runs[runs["status"] == "finished"]
    is_ref = pd.Series(True, index=done.index)
    for k, v in reference.items():
        is_ref &= done[k].astype(str) == str(v)
    ref = done[is_ref].set_index("seed")
    rows = []
    for key, frame in done[~is_ref].groupby(group_keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_keys, key))
        frame = frame.set_index("seed")
        seeds = sorted(set(frame.index) & set(ref.index))
        row["seeds"] = len(seeds)
        for m in metrics:
            diffs = [float(frame.at[s, m]) - float(ref.at[s, m]) for s in seeds
                     if m in frame.columns and m in ref.columns]
            row[m], row[f"{m}_ci95"], _ = mean_ci95(diffs)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_p_value(diffs: list[float]) -> float:
    """Two-sided p-value of a paired t-test (the per-seed differences against 0); nan below 2 seeds."""
    from scipy.stats import ttest_1samp

    if len(diffs) < 2:
        return math.nan
    if all(d == diffs[0] for d in diffs):
        return 0.0 if diffs[0] != 0 else 1.0
    return float(ttest_1samp(diffs, 0.0).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); nan stays nan."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m, out, running = len(order), [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def comparisons(runs: pd.DataFrame, group_keys: list[str], reference: dict, metrics: list[str],
                primary: list[dict]) -> pd.DataFrame:
    """Every configuration against the reference on each metric, paired by seed: the mean difference
    (reference minus configuration), its 95 % t half-width, the paired t-test's p-value and, for all
    but the pre-stated `primary` comparisons ({config: {...}, metric: ...}), the Holm-adjusted
    p-value over that family. Primary comparisons are tested at 0.05 unadjusted, as stated before
    the sweep ran."""
    done = runs[runs["status"] == "finished"]
    is_ref = pd.Series(True, index=done.index)
    for k, v in reference.items():
        is_ref &= done[k].astype(str) == str(v)
    ref = done[is_ref].set_index("seed")
    rows = []
    for key, frame in done[~is_ref].groupby(group_keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        config = dict(zip(group_keys, key))
        frame = frame.set_index("seed")
        seeds = sorted(set(frame.index) & set(ref.index))
        for m in metrics:
            if m not in frame.columns or m not in ref.columns:
                continue
            diffs = [float(ref.at[s, m]) - float(frame.at[s, m]) for s in seeds
                     if frame.at[s, m] == frame.at[s, m] and ref.at[s, m] == ref.at[s, m]]
            mean, half, n = mean_ci95(diffs)
            is_primary = any(p.get("metric") == m and all(str(config.get(k)) == str(v)
                                                           for k, v in (p.get("config") or {}).items())
                             for p in primary)
            rows.append({**config, "metric": m, "seeds": n, "diff": mean, "ci95": half,
                         "p": paired_p_value(diffs), "primary": is_primary})
    table = pd.DataFrame(rows)
    if len(table):
        secondary = ~table["primary"]
        table["p_holm"] = math.nan
        table.loc[secondary, "p_holm"] = holm(list(table.loc[secondary, "p"]))
    return table


def curve_area(curve: dict) -> float:
    """Mean of a metric over a run's evaluations, weighting each by the steps it covers
    (trapezoids over the step axis, divided by the span): the learning curve's area, so a
    faster riser scores higher at the same final value. One evaluation: its value."""
    steps = sorted(curve)
    if not steps:
        return math.nan
    if len(steps) == 1:
        return float(curve[steps[0]])
    area = sum((b - a) * (curve[a] + curve[b]) / 2 for a, b in zip(steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def _fmt_diff(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.4f}" if math.isnan(ci) else f"{mean:+.4f} ± {ci:.4f}"
    return text if math.isnan(ci) or abs(mean) > ci else text + " (0 inside)"


def _label(keys: list[str], values) -> str:
    """A configuration's legend label: `rank=8, min_weight=0.1` (last part of each key)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values)) or "all"


def _save(fig, ax, path: Path, title: str) -> Path:
    """The line plots' common finish: grid, legend, title, saved and closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# per-step curves a report can plot: (column of {step: value}, file stem, y label, title)
CURVES = [("lld_curve", "lld", "LLD: Δ log p(correct) per token", "Likelihood displacement of the positives"),
          ("disp_curve", "displacement", "Δ log p per positive response",
           "Change of each positive's sequence log-prob across an update")]
# per-run summaries a report tabulates beside the final evaluation
SUMMARY_COLUMNS = ("curve/pass_at_1_area", "train/lld_mean", "train/disp_mean")


def write_report(runs: pd.DataFrame, out_dir: Path, *, sweep_id: str, group_keys: list[str], headline: str,
                 heatmap: list[str], reference: dict | None = None,
                 primary: list[dict] | None = None) -> dict[str, Path]:
    """Markdown + PNGs into out_dir; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    metric_cols = sorted(c for c in runs.columns if c.startswith("eval/pass_at_") or c.startswith("eval/avg_at_"))
    metric_cols.sort(key=lambda c: (not c.startswith("eval/avg"), int(c.rsplit("_", 1)[1])))
    metric_cols += [c for c in SUMMARY_COLUMNS if c in runs.columns]
    table = summarize(runs, group_keys, metric_cols)
    files = {}

    # Pass@k curves, one line per configuration (mean over seeds, CI as error bars)
    pass_cols = [c for c in metric_cols if c.startswith("eval/pass_at_")]
    if pass_cols and len(table):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ks = [int(c.rsplit("_", 1)[1]) for c in pass_cols]
        for row in table.to_dict("records"):
            label = _label(group_keys, [row[k] for k in group_keys])
            ys = [row[c] for c in pass_cols]
            err = [0 if math.isnan(row[f"{c}_ci95"]) else row[f"{c}_ci95"] for c in pass_cols]
            line, = ax.plot(ks, ys, marker="o", label=label)
            ax.fill_between(ks, [max(0.0, y - e) for y, e in zip(ys, err)], [min(1.0, y + e) for y, e in zip(ys, err)],
                            color=line.get_color(), alpha=0.12)  # the 95 % interval over seeds, cut to [0, 1]
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k")
        ax.set_ylim(0, 1.02)
        files["curves"] = _save(fig, ax, out_dir / "pass_at_k.png", f"Pass@k by configuration ({sweep_id})")

    # per-step displacement curves, one line per configuration (mean over seeds, 95 % band)
    for column, stem, ylabel, title in CURVES:
        if column not in runs.columns or not len(table):
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        done = runs[runs["status"] == "finished"]
        for key, frame in done.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), done)]:
            key = key if isinstance(key, tuple) else (key,)
            curves = [c for c in frame[column] if isinstance(c, dict) and c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            stats = [mean_ci95([c[t] for c in curves if c[t] == c[t]]) for t in steps]
            mean = [m for m, _, _ in stats]
            half = [0.0 if math.isnan(h) else h for _, h, _ in stats]
            label = _label(group_keys, key)
            ax.plot(steps, mean, label=label)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        files[stem] = _save(fig, ax, out_dir / f"{stem}.png", f"{title} ({sweep_id})")

    # heat map of the headline metric over two swept keys: mean over seeds (and anything else
    # not on the axes) with the 95 % half-width under it
    if len(heatmap) == 2 and all(k in runs.columns for k in heatmap) and headline in runs.columns:
        done = runs[runs["status"] == "finished"]
        grid = done.pivot_table(index=heatmap[0], columns=heatmap[1], values=headline, aggfunc="mean")
        half = done.pivot_table(index=heatmap[0], columns=heatmap[1], values=headline,
                                aggfunc=lambda v: mean_ci95([float(x) for x in v])[1])
        fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
        im = ax.imshow(grid.values.astype(float), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        ax.set_xlabel(heatmap[1])
        ax.set_ylabel(heatmap[0])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v, h = grid.values[i, j], half.values[i, j]
                if not math.isnan(v):
                    ax.text(j, i, _fmt(v, h).replace(" ± ", "\n± "), ha="center", va="center", color="w",
                            fontsize=8)
        fig.colorbar(im, ax=ax, label=headline)
        ax.set_title(f"{headline}: {heatmap[0]} x {heatmap[1]}", fontsize=9)
        fig.tight_layout()
        files["heatmap"] = out_dir / "heatmap.png"
        fig.savefig(files["heatmap"])
        plt.close(fig)

    lines = [f"# Sweep {sweep_id}", "",
             f"{len(runs)} runs, {int((runs['status'] == 'finished').sum())} finished, "
             f"{int((runs['status'] != 'finished').sum())} not finished. Values: mean over seeds ± half-width "
             "of the 95 % t-interval (none with a single seed).", ""]
    header = group_keys + ["runs", "failed"] + [c.replace("eval/", "").replace("train/", "") for c in metric_cols]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in group_keys] + [str(row["runs"]), str(row["failed"])]
        cells += [_fmt(row[c], row[f"{c}_ci95"]) for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if reference and "seed" in runs.columns and group_keys:
        k_cols = [c for c in metric_cols if c.startswith("eval/avg_at_")][:1] + pass_cols[:1] + pass_cols[-1:] + \
            [c for c in metric_cols if c.startswith("train/")]
        k_cols = list(dict.fromkeys(k_cols))
        diffs = paired_differences(runs, group_keys, reference, k_cols)
        ref_label = _label(list(reference), list(reference.values()))
        lines += ["", f"## Paired differences against {ref_label}", "",
                  "Each configuration minus the reference, seed by seed (same warm-start, same prompts); mean ± "
                  "half-width of the 95 % t-interval of the differences. An interval that contains 0 is not a "
                  "difference this sweep can tell.", ""]
        header = group_keys + ["seeds"] + [c.replace("eval/", "").replace("train/", "") for c in k_cols]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in diffs.to_dict("records"):
            cells = [str(row[k]) for k in group_keys] + [str(row["seeds"])]
            cells += [_fmt_diff(row[c], row[f"{c}_ci95"]) for c in k_cols]
            lines.append("| " + " | ".join(cells) + " |")
        diffs.to_csv(out_dir / "paired.csv", index=False)
        files["paired"] = out_dir / "paired.csv"
        tests = comparisons(runs, group_keys, reference, k_cols, primary or [])
        if len(tests):
            lines += ["", f"## Tests: {ref_label} minus each configuration", "",
                      "Paired t-tests over seeds. The primary comparisons were stated in the sweep file before "
                      "it ran and are read at p < 0.05 as they are; every other comparison is one of a family "
                      f"of {int((~tests['primary']).sum())}, Holm-corrected (p_holm).", ""]
            lines += ["| " + " | ".join(group_keys + ["metric", "seeds", "difference", "p", "p_holm", "primary"]) + " |",
                      "|" + "---|" * (len(group_keys) + 6)]
            for row in tests.sort_values(["primary", "p"], ascending=[False, True]).to_dict("records"):
                cells = [str(row[k]) for k in group_keys] + [row["metric"], str(row["seeds"]),
                                                              _fmt_diff(row["diff"], row["ci95"]),
                                                              f"{row['p']:.3g}", f"{row['p_holm']:.3g}",
                                                              "yes" if row["primary"] else ""]
                lines.append("| " + " | ".join(cells) + " |")
            tests.to_csv(out_dir / "tests.csv", index=False)
            files["tests"] = out_dir / "tests.csv"
    failed = runs[runs["status"] != "finished"]
    if len(failed):
        lines += ["", "## Not finished", ""]
        lines += [f"- {r.get('run_name', '?')}: {r['status']}" for r in failed.to_dict("records")]
    for name, path in files.items():
        if path.suffix == ".png":
            lines += ["", f"![{name}]({path.name})"]
    files["markdown"] = out_dir / "report.md"
    files["markdown"].write_text("\n".join(lines) + "\n")
    table.to_csv(out_dir / "summary.csv", index=False)
    files["csv"] = out_dir / "summary.csv"
    return files
