"""The comparison report of a sweep: final Avg@k / Pass@k and the mean lazy likelihood
displacement (LLD) per configuration with the mean and a 95 % confidence interval over
seeds, Pass@k curves, LLD against step, and a heat map of the headline metric over two
swept keys (with the interval in each cell). Input is one row per run (params + final
metrics), so it can be rebuilt from MLflow alone.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path

import pandas as pd

from resrl.metrics import is_avg_key, is_pass_key, k_of

logger = logging.getLogger(__name__)


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
    """One row per configuration (group_keys), over its seeds: `<metric>` mean and `<metric>_ci95`
    over the finished runs that have the metric (NaN when none has it)."""
    rows = []
    for key, frame in _groups(runs, group_keys):
        row = dict(zip(group_keys, key))
        finished = frame[frame["status"] == "finished"]
        row["runs"] = len(frame)
        row["failed"] = int((frame["status"] != "finished").sum())
        for m in metrics:
            row[m], row[f"{m}_ci95"], _ = mean_ci95(_finite(finished[m]) if m in finished.columns else [])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*group_keys, "runs", "failed", *(c for m in metrics for c in (m, f"{m}_ci95"))])


def paired_differences(runs: pd.DataFrame, group_keys: list[str], reference: dict, metrics: list[str]) -> pd.DataFrame:
    """Each configuration minus the reference one, seed by seed, on each metric: mean and 95 %
    t half-width of the per-seed differences (seeds where either lacks the metric are left out).
    Seeds share the warm-start and the prompts, so pairing removes the seed-to-seed spread, which
    on a small testbed is larger than the differences between algorithms."""
    done = runs[runs["status"] == "finished"]
    is_ref = pd.Series(True, index=done.index)
    for k, v in reference.items():
        is_ref &= _matches(done[k], v)
    ref = done[is_ref].drop_duplicates("seed").set_index("seed")
    rows = []
    for key, frame in _groups(done[~is_ref], group_keys):
        row = dict(zip(group_keys, key))
        frame = frame.drop_duplicates("seed").set_index("seed")
        seeds = sorted(set(frame.index) & set(ref.index), key=_sort_key)
        row["seeds"] = len(seeds)
        for m in metrics:
            diffs = _finite(frame.at[s, m] - ref.at[s, m] for s in seeds) if m in frame.columns and m in ref.columns \
                else []
            row[m], row[f"{m}_ci95"], _ = mean_ci95(diffs)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*group_keys, "seeds", *(c for m in metrics for c in (m, f"{m}_ci95"))])


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
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if ci is None or math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def _fmt_diff(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:+.4f}" if math.isnan(ci) else f"{mean:+.4f} ± {ci:.4f}"
    return text if math.isnan(ci) or abs(mean) > ci else text + " (0 inside)"


def _label(keys: list[str], values) -> str:
    """A configuration's legend label: `rank=8, min_weight=0.1` (last part of each key)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values)) or "all"


def _sort_key(value) -> tuple:
    """Numbers in order, then text, then missing values: swept values may mix types (null and a path)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _groups(frame: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(values of `keys`, rows) per configuration, in a stable order; one group of all rows without keys."""
    if not keys:
        return [((), frame)]
    groups = [(k if isinstance(k, tuple) else (k,), f) for k, f in frame.groupby(keys, dropna=False, sort=False)]
    return sorted(groups, key=lambda g: tuple(_sort_key(v) for v in g[0]))


def _k_of(column: str) -> int:
    """k of a Pass@k / Avg@k column (a column that does not end in a number sorts last)."""
    k = k_of(column)
    return k if k is not None else 1 << 30


def _finite(values) -> list[float]:
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(v):
            out.append(v)
    return out


def _matches(column: pd.Series, value) -> pd.Series:
    """Rows whose value equals `value`, as numbers when both are numbers (8 == 8.0), else as text."""
    def same(v) -> bool:
        if isinstance(v, numbers.Real) and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(v) == float(value)
        return str(v) == str(value)

    return column.map(same).astype(bool)


def _normalize(runs: pd.DataFrame, group_keys: list[str], heatmap: list[str]) -> pd.DataFrame:
    """A copy the parts can rely on: `status` and `run_name` present, swept values hashable (a list
    value becomes its JSON text), metric columns numeric (anything else becomes NaN)."""
    runs = runs.copy().reset_index(drop=True)
    if "status" not in runs.columns:
        runs["status"] = "unknown"
    if "run_name" not in runs.columns:
        runs["run_name"] = "?"
    for key in dict.fromkeys([*group_keys, *heatmap, "seed"]):
        if key in runs.columns:
            runs[key] = runs[key].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    for col in runs.columns:
        if col.startswith(("eval/", "train/", "curve/")):
            runs[col] = pd.to_numeric(runs[col], errors="coerce")
    return runs


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


def _pass_at_k_plot(table: pd.DataFrame, group_keys: list[str], pass_cols: list[str], out_dir: Path,
                    sweep_id: str) -> Path | str:
    """Pass@k curves, one line per configuration (mean over seeds, the 95 % interval as a band);
    returns the file, or why there is none."""
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_dict("records") if _finite(r.get(c) for c in pass_cols)] if pass_cols else []
    if not rows:
        return "Pass@k curves: no finished run has Pass@k values"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ks = [_k_of(c) for c in pass_cols]
    for row in rows:
        label = _label(group_keys, [row[k] for k in group_keys])
        ys = [row[c] for c in pass_cols]
        err = [0.0 if math.isnan(row[f"{c}_ci95"]) else row[f"{c}_ci95"] for c in pass_cols]
        line, = ax.plot(ks, ys, marker="o", label=label)
        ax.fill_between(ks, [max(0.0, y - e) for y, e in zip(ys, err)], [min(1.0, y + e) for y, e in zip(ys, err)],
                        color=line.get_color(), alpha=0.12)  # the 95 % interval over seeds, cut to [0, 1]
    if len(set(ks)) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k")
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, out_dir / "pass_at_k.png", f"Pass@k by configuration ({sweep_id})")


# per-step curves a report plots: column of {step: value}, the metric it holds, file stem, y label, title
CURVES = [("lld_curve", "train/lld", "lld", "LLD: Δ log p(correct) per token", "Likelihood displacement of the positives"),
          ("disp_curve", "train/disp/seq_logp_change", "displacement", "Δ log p per positive response",
           "Change of each positive's sequence log-prob across an update")]
# per-run summaries a report tabulates beside the final evaluation
SUMMARY_COLUMNS = ("curve/pass_at_1_area", "train/lld_mean", "train/disp_mean")


def _lld_plot(done: pd.DataFrame, group_keys: list[str], out_dir: Path, sweep_id: str,
              curve: tuple = CURVES[0]) -> Path | str:
    """A per-step displacement curve (`curve`, one of CURVES), one line per configuration (mean over
    seeds, 95 % band)."""
    import matplotlib.pyplot as plt

    column, metric, stem, ylabel, title = curve
    name = "LLD" if stem == "lld" else stem
    if column not in done.columns:
        return f"{name} curves: no run has a {metric} history"
    lines = []
    for key, frame in _groups(done, group_keys):
        curves = [c for c in frame[column] if isinstance(c, dict) and c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)), key=float)
        stats = [mean_ci95(_finite([c[t] for c in curves])) for t in steps]
        kept = [(t, m, 0.0 if math.isnan(h) else h) for t, (m, h, _) in zip(steps, stats) if not math.isnan(m)]
        if kept:
            lines.append((_label(group_keys, key), kept))
    if not lines:
        return f"{name} curves: no finished run has {metric} values"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, kept in lines:
        steps, mean, half = [float(t) for t, _, _ in kept], [m for _, m, _ in kept], [h for _, _, h in kept]
        ax.plot(steps, mean, label=label, marker="." if len(steps) == 1 else None)
        ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, out_dir / f"{stem}.png", f"{title} ({sweep_id})")


def heatmap_cells(runs: pd.DataFrame, heatmap: list[str], headline: str) -> pd.DataFrame:
    """One row per cell of the heat map: the two axis values, `mean` and `ci95` of the headline metric
    over the cell's finished runs (seeds, and any other key not on the axes), and `runs` (how many
    values). Every pair of axis values among all runs is a cell, so a cell whose runs failed, or
    lack the metric, is there with runs = 0 and a NaN mean."""
    rows_key, cols_key = heatmap
    done = runs[runs["status"] == "finished"]
    cells = []
    row_values = sorted(runs[rows_key].drop_duplicates().tolist(), key=_sort_key)
    col_values = sorted(runs[cols_key].drop_duplicates().tolist(), key=_sort_key)
    for rv in row_values:
        for cv in col_values:
            in_cell = done[_matches(done[rows_key], rv) & _matches(done[cols_key], cv)]
            values = _finite(in_cell[headline]) if headline in in_cell.columns else []
            mean, half, n = mean_ci95(values)
            cells.append({rows_key: rv, cols_key: cv, "mean": mean, "ci95": half, "runs": n})
    return pd.DataFrame(cells, columns=[rows_key, cols_key, "mean", "ci95", "runs"])


def _heatmap_plot(runs: pd.DataFrame, heatmap: list[str], headline: str, out_dir: Path) -> dict[str, Path] | str:
    """The headline metric over two swept keys: mean over seeds with the 95 % half-width under it,
    as heatmap.png and heatmap.csv."""
    import matplotlib.pyplot as plt
    import numpy as np

    if not heatmap:
        return "heat map: none asked for (report.heatmap)"
    missing = [k for k in heatmap if k not in runs.columns]
    if missing:
        return f"heat map: {', '.join(missing)} not among the sweep's keys"
    cells = heatmap_cells(runs, heatmap, headline)
    if not (cells["runs"] > 0).any():
        return f"heat map: no finished run has {headline}"
    rows_key, cols_key = heatmap
    row_values = list(dict.fromkeys(cells[rows_key]))
    col_values = list(dict.fromkeys(cells[cols_key]))
    grid = np.full((len(row_values), len(col_values)), np.nan)
    half = np.full_like(grid, np.nan)
    for c in cells.to_dict("records"):
        i, j = row_values.index(c[rows_key]), col_values.index(c[cols_key])
        grid[i, j], half[i, j] = c["mean"], c["ci95"]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_values)), [str(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [str(r) for r in row_values])
    ax.set_xlabel(cols_key)
    ax.set_ylabel(rows_key)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "no value" if math.isnan(grid[i, j]) else _fmt(grid[i, j], half[i, j]).replace(" ± ", "\n± ")
            ax.text(j, i, text, ha="center", va="center", color="w" if not math.isnan(grid[i, j]) else "k",
                    fontsize=8)
    fig.colorbar(im, ax=ax, label=headline)
    ax.set_title(f"{headline}: {rows_key} x {cols_key}", fontsize=9)
    fig.tight_layout()
    files = {"heatmap": out_dir / "heatmap.png", "heatmap_csv": out_dir / "heatmap.csv"}
    fig.savefig(files["heatmap"])
    plt.close(fig)
    cells.to_csv(files["heatmap_csv"], index=False)
    return files


def _paired_section(runs: pd.DataFrame, group_keys: list[str], reference: dict, k_cols: list[str],
                    out_dir: Path) -> tuple[list[str], Path] | str:
    """The markdown lines of the paired differences against `reference`, and paired.csv."""
    missing = [k for k in reference if k not in runs.columns]
    if missing:
        return f"paired differences: reference key(s) {', '.join(missing)} not among the sweep's keys"
    done = runs[runs["status"] == "finished"]
    is_ref = pd.Series(True, index=done.index)
    for k, v in reference.items():
        is_ref &= _matches(done[k], v)
    ref_label = _label(list(reference), list(reference.values()))
    configs = {tuple(done.loc[i, k] for k in group_keys) for i in done.index[is_ref]}
    if not configs:
        return f"paired differences: no finished run of the reference ({ref_label})"
    if len(configs) > 1:
        return (f"paired differences: the reference ({ref_label}) matches {len(configs)} configurations; "
                "name a value for every swept key")
    if (~is_ref).sum() == 0:
        return "paired differences: no other configuration finished"
    diffs = paired_differences(done, group_keys, reference, k_cols)
    lines = ["", f"## Paired differences against {ref_label}", "",
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
    return lines, out_dir / "paired.csv"


def _tests_section(runs: pd.DataFrame, group_keys: list[str], reference: dict, k_cols: list[str],
                   primary: list[dict], out_dir: Path) -> tuple[list[str], Path] | None:
    """The markdown lines of the paired t-tests (primary uncorrected, the rest Holm), and tests.csv."""
    tests = comparisons(runs, group_keys, reference, k_cols, primary)
    if not len(tests):
        return None
    ref_label = _label(list(reference), list(reference.values()))
    lines = ["", f"## Tests: {ref_label} minus each configuration", "",
             "Paired t-tests over seeds. The primary comparisons were stated in the sweep file before it ran "
             "and are read at p < 0.05 as they are; every other comparison is one of a family of "
             f"{int((~tests['primary']).sum())}, Holm-corrected (p_holm).", ""]
    lines += ["| " + " | ".join(group_keys + ["metric", "seeds", "difference", "p", "p_holm", "primary"]) + " |",
              "|" + "---|" * (len(group_keys) + 6)]
    for row in tests.sort_values(["primary", "p"], ascending=[False, True]).to_dict("records"):
        cells = [str(row[k]) for k in group_keys] + [row["metric"], str(row["seeds"]), _fmt_diff(row["diff"], row["ci95"]),
                                                      f"{row['p']:.3g}", f"{row['p_holm']:.3g}",
                                                      "yes" if row["primary"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    tests.to_csv(out_dir / "tests.csv", index=False)
    return lines, out_dir / "tests.csv"


def write_report(runs: pd.DataFrame, out_dir: Path, *, sweep_id: str, group_keys: list[str], headline: str,
                 heatmap: list[str], reference: dict | None = None, primary: list[dict] | None = None,
                 errors: dict[str, str] | None = None) -> dict[str, Path]:
    """Markdown, PNGs and CSVs into out_dir; returns the written files.

    Every part (summary table, Pass@k curves, LLD curves, heat map, paired differences) works
    from what the runs have: one seed (no intervals), one point, points that failed, metrics
    that some or all runs lack. A part with nothing to show is left out, with a line in the
    report saying why. Given an `errors` dict, a part that raises anyway is recorded there
    (part -> "Type: message") and named in the report, and the other parts are still written
    (what a sweep does); without one, the error propagates (what the tests want).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    group_keys = [k for k in group_keys if k in runs.columns]
    runs = _normalize(runs, group_keys, heatmap)
    done = runs[runs["status"] == "finished"]
    metric_cols = [c for c in runs.columns if is_pass_key(c) or is_avg_key(c)]
    metric_cols.sort(key=lambda c: (not is_avg_key(c), _k_of(c), c))
    metric_cols += [c for c in SUMMARY_COLUMNS if c in runs.columns]
    pass_cols = [c for c in metric_cols if is_pass_key(c)]
    files: dict[str, Path] = {}
    notes: list[str] = []
    failed_parts: dict[str, str] = {}

    def part(name: str, make, fallback=None):
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - one part must not take the others down
            if errors is None:
                raise
            plt.close("all")
            failed_parts[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
            logger.warning("report part '%s' failed", name, exc_info=True)
            return fallback

    def keep(result, key: str | None = None):
        if isinstance(result, str):
            notes.append(result)
        elif isinstance(result, dict):
            files.update(result)
        elif result is not None:
            files[key] = result

    table = part("summary table", lambda: summarize(runs, group_keys, metric_cols), pd.DataFrame())
    keep(part("Pass@k curves", lambda: _pass_at_k_plot(table, group_keys, pass_cols, out_dir, sweep_id)), "curves")
    for curve in CURVES:
        keep(part(f"{'LLD' if curve[2] == 'lld' else curve[2]} curves", lambda: _lld_plot(done, group_keys, out_dir, sweep_id, curve)), curve[2])
    keep(part("heat map", lambda: _heatmap_plot(runs, heatmap, headline, out_dir)))

    n_done = len(done)
    lines = [f"# Sweep {sweep_id}", "",
             f"{len(runs)} runs, {n_done} finished, {len(runs) - n_done} not finished. Values: mean over seeds ± "
             "half-width of the 95 % t-interval (none with a single seed).", ""]
    if not metric_cols:
        notes.append("no run has evaluation metrics (eval/avg_at_k, eval/pass_at_k) or train/lld")
    header = group_keys + ["runs", "failed"] + [c.replace("eval/", "").replace("train/", "") for c in metric_cols]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in group_keys] + [str(row["runs"]), str(row["failed"])]
        cells += [_fmt(row[c], row[f"{c}_ci95"]) for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if reference:
        if "seed" not in runs.columns:
            notes.append("paired differences: the runs have no seed column")
        elif not group_keys:
            notes.append("paired differences: the sweep varies nothing but the seed")
        else:
            # Avg@k is the unbiased Pass@1 of the same samples (c / k per prompt, averaged): the same
            # number, so only one of the two enters the table and the Holm family
            avg_cols = [c for c in metric_cols if is_avg_key(c)][:1]
            k_cols = avg_cols + [c for c in pass_cols[:1] + pass_cols[-1:] if not (avg_cols and _k_of(c) == 1)] + \
                [c for c in metric_cols if c.startswith("train/")]
            paired = part("paired differences",
                          lambda: _paired_section(runs, group_keys, reference, list(dict.fromkeys(k_cols)), out_dir))
            if isinstance(paired, str):
                notes.append(paired)
            elif paired is not None:
                lines += paired[0]
                files["paired"] = paired[1]
                tests = part("tests", lambda: _tests_section(runs, group_keys, reference, list(dict.fromkeys(k_cols)),
                                                             primary or [], out_dir))
                if tests is not None:
                    lines += tests[0]
                    files["tests"] = tests[1]
    failed = runs[runs["status"] != "finished"]
    if len(failed):
        lines += ["", "## Not finished", ""]
        lines += [f"- {r['run_name']}: {r['status']}" for r in failed.to_dict("records")]
    if notes:
        lines += ["", "## Left out", ""] + [f"- {n}" for n in notes]
    if failed_parts:
        lines += ["", "## Parts that failed", ""] + [f"- {n}: {e}" for n, e in failed_parts.items()]
        errors.update(failed_parts)
    for name, path in files.items():
        if path.suffix == ".png":
            lines += ["", f"![{name}]({path.name})"]
    files["markdown"] = out_dir / "report.md"
    files["markdown"].write_text("\n".join(lines) + "\n")
    table.to_csv(out_dir / "summary.csv", index=False)
    files["csv"] = out_dir / "summary.csv"
    return files


def best_point(runs: pd.DataFrame, group_keys: list[str], headline: str) -> dict | None:
    """The run to register as the sweep's best: in the configuration with the highest mean of
    `headline` over its finished seeds, the finished run with the highest value (the first in
    table order on ties). None when no finished run has the metric. Higher is taken as better."""
    if headline not in runs.columns or "status" not in runs.columns:
        return None
    runs = _normalize(runs, [k for k in group_keys if k in runs.columns], [])
    done = runs[(runs["status"] == "finished") & runs[headline].notna()]
    if not len(done):
        return None
    groups = _groups(done, [k for k in group_keys if k in done.columns])
    best_key, best_rows = max(groups, key=lambda g: g[1][headline].mean())  # max keeps the first of equals
    row = best_rows.loc[best_rows[headline].idxmax()].to_dict()
    row["config_mean"] = float(best_rows[headline].mean())
    return row
