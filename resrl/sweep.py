"""Sweep definitions: a base config plus a grid (and/or a list) of overrides.

    name: rank-strength
    base: conf/smoke.yaml          # merged onto conf/default.yaml
    overrides: [trainer.steps=4]   # applied to every point
    grid:                          # cartesian product, in the order written
      algorithm.rank: [4, 16]
      algorithm.min_weight: [0.1, 0.5]
      seed: [0, 1]
    points:                        # optional extra points, each a mapping of overrides
      - {algorithm.name: grpo}
    concurrency: 2                 # grid points trained at once
    register: my-policies          # Model Registry name for the best point's policy (alias `best`);
                                   #   default: the sweep's name; null: register nothing
    report:
      headline: eval/pass_at_1     # metric of the heat map
      heatmap: [algorithm.rank, algorithm.min_weight]
      reference: {algorithm.rank: 8, algorithm.min_weight: 0.1}  # paired per-seed differences against it

A relative `base` resolves next to the sweep file, else in the project folder (so
`conf/smoke.yaml` works from any working directory); relative paths inside the
overrides (e.g. `run.output_dir`) are, as in `resrl train`, relative to the working
directory. Every point is loaded and checked like a `resrl train` config before anything runs.
A point is identified by the hash of its resolved config, so re-running a sweep
finds the points that already finished.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resrl.config import CONF_DIR, config_hash, load_config
from resrl.errors import ConfigError
from resrl.metrics import pass_key

PROJECT_DIR = CONF_DIR.parent

SWEEP_KEYS = {"name", "base", "overrides", "grid", "points", "concurrency", "report", "register"}
REPORT_KEYS = {"headline", "heatmap", "reference", "primary"}


@dataclass
class SweepPoint:
    overrides: dict            # the keys this point sets (grid/list), for labels and grouping
    cfg: DictConfig            # resolved, checked
    key: str                   # config hash

    def label(self, skip: tuple[str, ...] = ("seed",)) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides.items() if k not in skip) or "base"


@dataclass
class Sweep:
    sweep_id: str
    points: list[SweepPoint]
    concurrency: int
    spec: dict                 # the sweep file as read; logged to MLflow, where the report reads it back


@dataclass(frozen=True)
class ReportSettings:
    headline: str              # the heat map's metric
    heatmap: list[str]         # [] or two swept keys (rows, columns)
    reference: dict | None     # a configuration to pair every other one against, seed by seed
    primary: list[dict]        # comparisons stated before running: [{config: {...}, metric: ...}], not corrected


DEFAULT_HEADLINE = pass_key(1)


def report_settings(spec: dict) -> ReportSettings:
    """The `report:` section of a sweep file, checked, with its defaults."""
    report = spec.get("report") or {}
    if set(report) - REPORT_KEYS:
        raise ConfigError(f"unknown report key(s) {sorted(set(report) - REPORT_KEYS)}; allowed: {sorted(REPORT_KEYS)}")
    heatmap = list(report.get("heatmap") or [])
    if heatmap and len(heatmap) != 2:
        raise ConfigError("report.heatmap needs exactly two config keys (rows, columns)")
    primary = list(report.get("primary") or [])
    for p in primary:
        if not isinstance(p, dict) or set(p) != {"config", "metric"} or not isinstance(p["config"], dict):
            raise ConfigError(f"report.primary entries look like {{config: {{algorithm.name: nsr}}, metric: "
                              f"eval/avg_at_128}}, got {p!r}")
    if primary and not report.get("reference"):
        raise ConfigError("report.primary needs report.reference (the comparisons are against it)")
    return ReportSettings(headline=report.get("headline", DEFAULT_HEADLINE), heatmap=heatmap,
                          reference=report.get("reference"), primary=primary)


def registry_name(spec: dict, sweep_id: str) -> str | None:
    """Where the sweep's best policy is registered: `register:` of the sweep file, else the sweep's
    name (its id without the digest); None when the file says `register: null`."""
    if "register" in spec:
        return None if spec["register"] in (None, False, "") else str(spec["register"])
    return spec.get("name") or sweep_id.rsplit("-", 1)[0]


def _as_override(key: str, value) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def expand_grid(grid: dict, points: list[dict]) -> list[dict]:
    """Cartesian product of the grid (keys in order written), then the explicit points."""
    out = []
    if grid:
        keys = list(grid)
        for key in keys:
            if not isinstance(grid[key], list) or not grid[key]:
                raise ConfigError(f"sweep grid key '{key}' needs a non-empty list of values")
        out += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    out += [dict(p) for p in points]
    return out


def resolve_base(base: str | None, sweep_file: Path) -> str | None:
    """A relative `base` is looked up next to the sweep file, then in the project folder
    (where `conf/` lives), never in the working directory: a sweep means the same
    wherever it is started from."""
    if base is None or Path(base).is_absolute():
        return base
    tried = [sweep_file.resolve().parent / base, PROJECT_DIR / base]
    for candidate in tried:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"sweep base config '{base}' not found; looked in: {', '.join(map(str, tried))}")


def read_sweep_file(path: str | Path) -> dict:
    """The sweep file as a plain dict; a YAML syntax error, an object tag (`!!python/...`), a bad
    `${...}` or a file that is not a mapping is one ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        loaded = OmegaConf.load(path)
        if isinstance(loaded, DictConfig):
            return OmegaConf.to_container(loaded, resolve=True)
    except Exception as exc:  # noqa: BLE001 - YAML syntax, object tags, encodings, ${...}: the user's to fix
        raise ConfigError(f"sweep file '{path}' cannot be read: {' '.join(f'{type(exc).__name__}: {exc}'.split())}"
                          ) from None
    raise ConfigError(f"sweep file '{path}' must hold a mapping of keys (name, base, grid, ...), not "
                      f"{type(loaded).__name__}")


def load_sweep(path: str | Path, extra_overrides: list[str] = ()) -> Sweep:
    path = Path(path)
    spec = read_sweep_file(path)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {sorted(unknown)} in {path}; allowed: {sorted(SWEEP_KEYS)}")
    report_settings(spec)  # a mistake there fails now, not after training
    base = resolve_base(spec.get("base"), path)
    combos = expand_grid(spec.get("grid") or {}, spec.get("points") or [])
    if not combos:
        raise ConfigError(f"sweep {path} defines no points (give a grid or points)")
    common = list(spec.get("overrides") or []) + list(extra_overrides)
    points, seen = [], set()
    for combo in combos:
        try:
            cfg = load_config(base, common + [_as_override(k, v) for k, v in combo.items()])
        except ConfigError as exc:
            raise ConfigError(f"sweep point {combo}: {exc}") from None
        key = config_hash(cfg)
        if cfg.run.name:  # a fixed name would send every point to one run folder
            OmegaConf.update(cfg, "run.name", f"{cfg.run.name}-{key}")
        if key not in seen:  # identical configs train once
            seen.add(key)
            points.append(SweepPoint(combo, cfg, key))
    name = spec.get("name") or path.stem
    digest = hashlib.sha256(json.dumps(sorted(p.key for p in points)).encode()).hexdigest()[:8]
    concurrency = int(spec.get("concurrency", 1))
    if concurrency < 1:
        raise ConfigError("sweep concurrency must be >= 1")
    return Sweep(sweep_id=f"{name}-{digest}", points=points, concurrency=concurrency, spec=spec)
