"""Loading and checking run configurations.

`conf/default.yaml` is the one place that lists every key and its default. A user's
config file and `key=value` overrides are merged onto it; a key the defaults do not
have is an error that names it and suggests close matches, and values are checked
(`validate`) before any model or engine is loaded.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resrl.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"

# Keys that change where or how a run is recorded but not what it computes; they are
# left out of the config hash, so changing them keeps resuming the same run.
_NOT_HASHED = (
    "run.name",
    "run.output_dir",
    "run.cache_dir",
    "run.experiment",
    "run.tracking_uri",
    "run.resume",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.progress",
    "run.sweep_id",
    "run.parent_run_id",
)


class ConfigError(UserError):
    """A configuration key or value that cannot be used."""


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _unknown_key_error(key: str, known: Iterable[str], source: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a right leaf under a wrong section: match on the last component
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config key '{key}' (from {source}).{hint} "
                       f"All keys are listed in {DEFAULT_CONFIG}.")


def _check_keys(update: DictConfig, base_flat: dict[str, Any], source: str) -> None:
    for key, value in flatten(update).items():
        if key in base_flat:
            _check_type(key, base_flat[key], value, source)
            continue
        # a dict-valued default that is empty ({}) accepts any sub-key
        if any(key.startswith(k + ".") and base_flat[k] == {} for k in base_flat):
            continue
        raise _unknown_key_error(key, base_flat, source)


# Types of the keys whose default is null (the default cannot tell); a test checks that
# every null default of conf/default.yaml is listed here.
NULL_DEFAULT_TYPES: dict[str, type] = {
    "run.name": str, "run.tracking_uri": str, "run.sweep_id": str, "run.parent_run_id": str,
    "data.path": str, "data.num_train": int, "data.num_test": int, "model.path": str,
    "reward.function": str, "eval.final_k": int,
}


def _check_type(key: str, default: Any, value: Any, source: str) -> None:
    if default is None and key in NULL_DEFAULT_TYPES:
        default = NULL_DEFAULT_TYPES[key]()  # an example value of the declared type
    if default is None or value is None:
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
    }.get(type(default), lambda v: True)
    if not ok(value):
        raise ConfigError(f"Config key '{key}' (from {source}) must be a {type(default).__name__}, "
                          f"got {value!r}.")


def load_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then `config_file` (YAML), then `key=value` overrides; checked."""
    cfg = OmegaConf.load(DEFAULT_CONFIG)
    base_flat = flatten(cfg)
    layers: list[tuple[DictConfig, str]] = []
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"Config file '{path}' is a folder; give a YAML file (e.g. conf/smoke.yaml).")
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # noqa: BLE001 - YAML syntax, encoding: the user's to fix
            raise ConfigError(f"Config file '{path}' cannot be read: {_one_line(exc)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"Config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}.")
        layers.append((loaded, str(path)))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value (e.g. algorithm.rank=16).")
    try:
        if overrides:
            layers.append((OmegaConf.from_dotlist(overrides), "the command line"))
        for layer, source in layers:
            _check_keys(layer, base_flat, source)
            cfg = OmegaConf.merge(cfg, layer)
        OmegaConf.resolve(cfg)  # a bad ${...} fails here, not in the middle of a run
    except OmegaConfBaseException as exc:
        raise ConfigError(f"Config cannot be resolved: {_one_line(exc)}") from None
    # ints given for float keys become floats, so hashes and logged params are stable
    for key, default in base_flat.items():
        if isinstance(default, float) and isinstance(OmegaConf.select(cfg, key), int):
            OmegaConf.update(cfg, key, float(OmegaConf.select(cfg, key)))
    validate(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    """An exception as one line (YAML and OmegaConf messages span several)."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


def config_hash(cfg: DictConfig) -> str:
    """Short hash of everything that changes what a run computes."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_name(cfg: DictConfig) -> str:
    return cfg.run.name or f"{cfg.algorithm.name}-{config_hash(cfg)}"


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.output_dir) / run_name(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(data: dict) -> DictConfig:
    return OmegaConf.create(data)


# ----------------------------------------------------------------------------- values

def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_model_dir(path: str | Path) -> None:
    """A Hugging Face causal-LM folder: config.json, a tokenizer and safetensors weights."""
    p = Path(path)
    _require(p.is_dir(), f"model.path '{p}' is not a directory (give a local Hugging Face model folder).")
    _require((p / "config.json").is_file(),
             f"model.path '{p}' is not a Hugging Face model folder: it has no config.json.")
    has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    _require(has_tok, f"model.path '{p}' has no tokenizer (tokenizer.json, tokenizer.model or vocab.json).")
    has_weights = any(p.glob("*.safetensors"))
    if not has_weights and any(p.glob("*.bin")):
        raise ConfigError(f"model.path '{p}' holds only pickled *.bin weights; resrl loads safetensors only "
                          "(convert once with transformers: model.save_pretrained(dir, safe_serialization=True)).")
    _require(has_weights, f"model.path '{p}' has no *.safetensors weights.")


def model_max_positions(cfg: DictConfig) -> int | None:
    """Tokens (prompt + response) the model takes: the embedded model's `model.tiny.max_positions`,
    or `max_position_embeddings` in model.path's config.json (None when it has none)."""
    if cfg.model.path is None:
        return int(cfg.model.tiny.max_positions)
    try:
        value = json.loads((Path(cfg.model.path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path '{cfg.model.path}': config.json cannot be read: {_one_line(exc)}") from None
    return value if isinstance(value, int) else None


def validate(cfg: DictConfig) -> None:
    """Check values; raises ConfigError naming the key. Loads no model."""
    from resrl.algorithms import ALGORITHMS, LOSS_AGGREGATIONS  # local: keeps import light
    from resrl.data import DATA_SOURCES

    a, r, t, e, loss = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.eval, cfg.loss
    _require(a.name in ALGORITHMS,
             f"algorithm.name '{a.name}' is not one of: {', '.join(sorted(ALGORITHMS))}.")
    _require(a.rank >= 1, f"algorithm.rank must be >= 1, got {a.rank}.")
    _require(0.0 <= a.q_low < a.q_high <= 1.0,
             f"algorithm.q_low/q_high must satisfy 0 <= q_low < q_high <= 1, got {a.q_low}/{a.q_high}.")
    _require(0.0 <= a.min_weight <= 1.0, f"algorithm.min_weight must be in [0, 1], got {a.min_weight}.")
    _require(a.pos_weight >= 0.0, f"algorithm.pos_weight must be >= 0, got {a.pos_weight}.")
    _require(a.wr_lambda >= 0.0, f"algorithm.wr_lambda must be >= 0, got {a.wr_lambda}.")
    _require(a.max_pos_tokens >= 2, f"algorithm.max_pos_tokens must be >= 2, got {a.max_pos_tokens}.")
    _require(a.svd in ("randomized", "exact"), f"algorithm.svd must be 'randomized' or 'exact', got '{a.svd}'.")
    _require(a.oversample >= 0 and a.power_iters >= 0, "algorithm.oversample and power_iters must be >= 0.")
    _require(a.hidden_layer != 0, "algorithm.hidden_layer 0 is the embedding output; use -1, -2, ... or a layer >= 1.")
    _require(a.eps > 0, f"algorithm.eps must be > 0, got {a.eps}.")
    if ALGORITHMS[a.name].needs_groups:
        _require(r.n >= 2, f"rollout.n must be >= 2 for the group-normalized algorithm '{a.name}', got {r.n}.")
    _require(r.n >= 1 and r.prompts_per_step >= 1, "rollout.n and rollout.prompts_per_step must be >= 1.")
    _require(r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}.")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}.")
    _require(r.top_k == -1 or r.top_k >= 1, f"rollout.top_k must be -1 (off) or >= 1, got {r.top_k}.")
    _require(r.max_tokens >= 1, f"rollout.max_tokens must be >= 1, got {r.max_tokens}.")
    _require(r.kv_cache_gb > 0, f"rollout.kv_cache_gb must be > 0, got {r.kv_cache_gb}.")
    _require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization must be in (0, 1].")
    _require(loss.agg in LOSS_AGGREGATIONS,
             f"loss.agg '{loss.agg}' is not one of: {', '.join(LOSS_AGGREGATIONS)}.")
    _require(loss.clip_low >= 0 and loss.clip_high >= 0, "loss.clip_low and loss.clip_high must be >= 0.")
    _require(loss.dual_clip is None or (isinstance(loss.dual_clip, (int, float)) and loss.dual_clip > 1.0),
             f"loss.dual_clip must be > 1 or null, got {loss.dual_clip}.")
    _require(loss.kl_type in ("k1", "k2", "k3"), f"loss.kl_type must be k1, k2 or k3, got '{loss.kl_type}'.")
    _require(loss.kl_coef >= 0, "loss.kl_coef must be >= 0.")
    _require(t.steps >= 0, f"trainer.steps must be >= 0, got {t.steps}.")
    _require(t.lr > 0, f"trainer.lr must be > 0, got {t.lr}.")
    _require(t.adam_eps > 0, f"trainer.adam_eps must be > 0, got {t.adam_eps}.")
    _require(t.mini_batches >= 1 and t.epochs >= 1 and t.micro_batch_size >= 1,
             "trainer.mini_batches, trainer.epochs and trainer.micro_batch_size must be >= 1.")
    batch = r.prompts_per_step * r.n
    _require(batch % t.mini_batches == 0,
             f"rollout.prompts_per_step * rollout.n ({batch}) must be divisible by trainer.mini_batches "
             f"({t.mini_batches}).")
    _require(t.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}.")
    _require(t.device in ("auto", "cpu", "cuda"), f"trainer.device must be auto, cpu or cuda, got '{t.device}'.")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "trainer.betas must be two numbers in [0, 1).")
    _require(e.k >= 1, f"eval.k must be >= 1, got {e.k}.")
    _require(e.final_k is None or e.final_k >= 1, f"eval.final_k must be >= 1 or null, got {e.final_k}.")
    _require(e.every >= 1, f"eval.every must be >= 1, got {e.every}.")
    _require(e.num_prompts is None or e.num_prompts >= 1, "eval.num_prompts must be >= 1 or null.")
    _require(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"model.dtype must be auto, float32, bfloat16 or float16, got '{cfg.model.dtype}'.")
    _require(cfg.data.source in DATA_SOURCES,
             f"data.source '{cfg.data.source}' is not one of: {', '.join(DATA_SOURCES)}.")
    _require(cfg.data.overlong_prompts in ("drop", "truncate"), "data.overlong_prompts must be drop or truncate.")
    _require(0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1].")
    s = cfg.data.synthetic
    _require(2 <= s.min_terms <= s.max_terms, "data.synthetic needs 2 <= min_terms <= max_terms.")
    _require(s.max_operand >= 1 and s.num_train >= 1 and s.num_test >= 1,
             "data.synthetic.max_operand, num_train and num_test must be >= 1.")
    _require(len(s.ops) >= 1 and set(s.ops) <= set("+-*"), "data.synthetic.ops must use only + - *.")
    from resrl import synthetic
    from resrl.synthetic import FLAWS
    _require(s.flaw in FLAWS, f"data.synthetic.flaw must be one of {', '.join(FLAWS)}, got '{s.flaw}'.")
    _require(0.0 <= s.flawed_fraction <= 1.0,
             f"data.synthetic.flawed_fraction must be in [0, 1], got {s.flawed_fraction}.")
    _require(s.flaw == "none" or s.max_terms >= 3,
             f"data.synthetic.flaw={s.flaw} needs problems of >= 3 terms (two steps); max_terms is {s.max_terms}.")
    _require(0 <= cfg.reward.max_error_fraction <= 1,
             f"reward.max_error_fraction must be in [0, 1], got {cfg.reward.max_error_fraction}.")
    ls = cfg.reward.length_scale
    _require(0 <= ls.end_scale <= 1, "reward.length_scale.end_scale must be in [0, 1].")
    _require(ls.start_tokens >= 0, "reward.length_scale.start_tokens must be >= 0.")
    if cfg.reward.function is not None:
        _require(":" in cfg.reward.function, "reward.function must look like 'module:function'.")
        from resrl.rewards import load_reward_function

        load_reward_function(cfg.reward.function)  # imported now: a typo fails here, not after data preparation
    if cfg.data.source == "synthetic":
        synthetic.check_problem_space(s)
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path)
    max_new = max(r.max_tokens, e.max_tokens)
    positions = model_max_positions(cfg)
    _require(positions is None or max_new <= positions,  # with the prompts: checked after data preparation
             f"rollout.max_tokens/eval.max_tokens ({max_new}) exceed the model's {positions} positions "
             "(model.tiny.max_positions, or max_position_embeddings of model.path).")
    if cfg.warmstart.enabled:
        _require(cfg.warmstart.steps >= 1 and cfg.warmstart.batch_size >= 1 and cfg.warmstart.lr > 0,
                 "warmstart.steps, batch_size and lr must be positive.")
    _require(cfg.run.checkpoint_every >= 1 and cfg.run.keep_checkpoints >= 1,
             "run.checkpoint_every and run.keep_checkpoints must be >= 1.")
    from resrl.parallel import check_config

    check_config(cfg)  # trainer.num_processes against the prompt groups, dtype against the device
