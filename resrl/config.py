"""Loading and checking run configurations.

`conf/default.yaml` is the one place that declares every key: its default, its comment
and its tags (`key_tags`: the type of a null default, whether it counts in the run's hash,
the value that reproduces runs made before it existed). A user's config file and
`key=value` overrides are merged onto it; a key the defaults do not have is an error that
names it and suggests close matches, and values are checked (`validate`) before any model
or engine is loaded.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resrl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"
_NO_VALUE = object()  # no @absent tag



@dataclass(frozen=True)
class KeyTags:
    """What conf/default.yaml's comment tags declare about one key (see the file's header)."""
    type: type | None = None      # @type=...: the type of a key whose default is null
    hashed: bool = True           # False with @nohash
    absent: Any = _NO_VALUE       # @absent=VALUE: the value that reproduces runs made before the key existed
    range: "Range | None" = None  # @range=...: the values the key accepts (checked by `validate`)


@dataclass(frozen=True)
class Range:
    """A numeric key's accepted values, from its @range tag: `>=1`, `>0`, `[0,1]`, `(0,1]`, ...;
    a trailing `|null` also accepts null (so does a key whose default is null)."""
    low: float | None
    high: float | None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    @classmethod
    def parse(cls, text: str, where: str) -> "Range":
        nullable = text.endswith("|null")
        body = text.removesuffix("|null")
        if m := re.fullmatch(r"(>=|>)(-?[\d.e+-]+)", body):
            return cls(float(m.group(2)), None, low_open=m.group(1) == ">", nullable=nullable)
        if m := re.fullmatch(r"([\[(])(-?[\d.e+-]+),(-?[\d.e+-]+)([\])])", body):
            return cls(float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")", nullable)
        raise ConfigError(f"{where} has @range={text}; write >=A, >A, [A,B], (A,B], [A,B) or (A,B), "
                          "optionally followed by |null")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def rule(self) -> str:
        """The rule as an error message says it: '>= 1', 'in (0, 1]', '> 0 or null'."""
        def num(x: float) -> str:
            return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {num(self.low)}"
        else:
            text = f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"
        return text + (" or null" if self.nullable else "")


_TAG = re.compile(r"@(type|nohash|absent|range)(?:=(\S+))?")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_TAGS_CACHE: dict[str, tuple[str, dict[str, "KeyTags"]]] = {}  # path -> (its text, its tags)


def key_tags(path: Path | None = None) -> dict[str, KeyTags]:
    """The tags of every key of the defaults file that has any, by dotted key (read from its comments)."""
    path = Path(path or DEFAULT_CONFIG)
    text = path.read_text()
    cached = _TAGS_CACHE.get(str(path))
    if cached is not None and cached[0] == text:
        return cached[1]
    out: dict[str, KeyTags] = {}
    stack: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        stack = stack[:len(m.group(1)) // 2] + [m.group(2)]
        comment = m.group(3).split(" # ", 1)[1] if " # " in m.group(3) else ""
        found = dict(_TAG.findall(comment.split("  ", 1)[0]))  # tags open the comment
        if not found:
            continue
        key = ".".join(stack)
        if "type" in found and found["type"] not in _TYPES:
            raise ConfigError(f"{path}: {key} has @type={found['type']}; use one of {', '.join(_TYPES)}")
        default = yaml.safe_load(m.group(3).split(" # ", 1)[0] or "null")
        rng = Range.parse(found["range"], f"{path}: {key}") if "range" in found else None
        if rng is not None and default is None and not rng.nullable:  # a null default is always accepted
            rng = Range(rng.low, rng.high, rng.low_open, rng.high_open, nullable=True)
        out[key] = KeyTags(type=_TYPES.get(found.get("type")), hashed="nohash" not in found,
                           absent=yaml.safe_load(found["absent"]) if "absent" in found else _NO_VALUE, range=rng)
    _TAGS_CACHE[str(path)] = (text, out)
    return out


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


def _check_type(key: str, default: Any, value: Any, source: str) -> None:
    declared = key_tags().get(key)
    if default is None and declared is not None and declared.type is not None:
        default = declared.type()  # an example value of the declared type
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
    """Short hash of everything that changes what a run computes: every key but the @nohash ones,
    and but the @absent ones at the value that reproduces runs made before they existed (so adding
    a key does not make finished runs unfinished)."""
    tags = key_tags()

    def counts(key, value):
        tag = tags.get(key)
        return tag is None or (tag.hashed and not (tag.absent is not _NO_VALUE and value == tag.absent))
    flat = {k: v for k, v in flatten(cfg).items() if counts(k, v)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


# run.name becomes one folder under run.output_dir (and the MLflow run's name): one path component of
# safe characters, so no name (also one a Prefect deployment's caller passes) can put a run elsewhere
RUN_NAME_RULE = ("one folder name of at most 128 letters, digits, '.', '_' or '-', starting with a letter, "
                 "digit or '_' (no '/', no '..')")
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_run_name(name) -> None:
    """ConfigError unless `name` is null or a safe folder name (RUN_NAME_RULE)."""
    if name is not None and not (isinstance(name, str) and _RUN_NAME.fullmatch(name)):
        raise ConfigError(f"run.name must be {RUN_NAME_RULE}, got {name!r}.")


def run_name(cfg: DictConfig) -> str:
    return cfg.run.name or f"{cfg.algorithm.name}-{config_hash(cfg)}"


def run_dir(cfg: DictConfig) -> Path:
    check_run_name(cfg.run.name)  # also for configs that did not pass through validate
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


def model_max_positions(model_cfg: DictConfig) -> int | None:
    """Tokens (prompt + response) the model (the `model` section) takes: the embedded model's
    `model.tiny.max_positions`, or `max_position_embeddings` in model.path's config.json (None when it has none)."""
    if model_cfg.path is None:
        return int(model_cfg.tiny.max_positions)
    try:
        value = json.loads((Path(model_cfg.path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path '{model_cfg.path}': config.json cannot be read: {_one_line(exc)}") from None
    return value if isinstance(value, int) else None


def _either(values) -> str:
    """("a", "b", "c") -> "a, b or c" (a rule's allowed values, as the messages spell them)."""
    values = list(values)
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    """ConfigError naming the key, the rule it breaks and the value it has."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}.")


def check_ranges(cfg: DictConfig) -> None:
    """Every key with a @range tag in conf/default.yaml holds a value in it (ConfigError naming the first that does not)."""
    for key, tags in key_tags().items():
        if tags.range is not None:
            value = OmegaConf.select(cfg, key)
            _check(tags.range.accepts(value), key, tags.range.rule(), value)


def validate(cfg: DictConfig) -> None:
    """Check values; raises ConfigError naming the key and showing its value. Loads no model.
    A key's own range is declared beside it (@range in conf/default.yaml, `check_ranges`); the rules
    here are those a tag cannot say: choices named by the modules, and rules across keys."""
    from resrl import synthetic  # local: keeps import light
    from resrl.algorithms import ALGORITHMS, KL_TYPES, LOSS_AGGREGATIONS, ROLLOUT_CORRECTIONS, SVD_METHODS
    from resrl.data import DATA_SOURCES, OVERLONG_PROMPTS
    from resrl.devices import DEVICES, DTYPES, check_dtype, resolve_device

    check_run_name(cfg.run.name)  # first: where the run's files go
    check_ranges(cfg)
    a, r, t, e, loss = cfg.algorithm, cfg.rollout, cfg.trainer, cfg.eval, cfg.loss
    _check(a.name in ALGORITHMS, "algorithm.name", f"one of {', '.join(sorted(ALGORITHMS))}", a.name)
    _require(0.0 <= a.q_low < a.q_high <= 1.0,
             f"algorithm.q_low/q_high must satisfy 0 <= q_low < q_high <= 1, got {a.q_low}/{a.q_high}.")
    _check(a.svd in SVD_METHODS, "algorithm.svd", _either(SVD_METHODS), a.svd)
    _check(a.hidden_layer != 0, "algorithm.hidden_layer", "-1, -2, ... or a layer >= 1 (0 is the embedding output)",
           a.hidden_layer)
    if ALGORITHMS[a.name].needs_groups:
        _check(r.n >= 2, "rollout.n", f">= 2 for the group-normalized algorithm '{a.name}'", r.n)
    _check(r.n >= 1, "rollout.n", ">= 1", r.n)
    _check(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", "-1 (off) or >= 1", r.top_k)
    from resrl.rollout import ROLLOUT_BACKENDS

    _check(r.backend in ROLLOUT_BACKENDS, "rollout.backend", f"one of {', '.join(ROLLOUT_BACKENDS)}", r.backend)
    _check(loss.agg in LOSS_AGGREGATIONS, "loss.agg", f"one of {', '.join(LOSS_AGGREGATIONS)}", loss.agg)
    _check(loss.dual_clip is None or (isinstance(loss.dual_clip, (int, float)) and loss.dual_clip > 1.0),
           "loss.dual_clip", "> 1 or null", loss.dual_clip)
    _check(loss.kl_type in KL_TYPES, "loss.kl_type", _either(KL_TYPES), loss.kl_type)
    rc = loss.rollout_correction
    _check(rc.mode in ROLLOUT_CORRECTIONS, "loss.rollout_correction.mode", f"one of {', '.join(ROLLOUT_CORRECTIONS)}",
           rc.mode)
    batch = r.prompts_per_step * r.n
    _require(batch % t.mini_batches == 0,
             f"rollout.prompts_per_step * rollout.n ({batch}) must be divisible by trainer.mini_batches "
             f"({t.mini_batches}).")
    _check(t.zero_stage in (0, 1, 2, 3), "trainer.zero_stage", "0, 1, 2 or 3", t.zero_stage)
    _check(t.device in DEVICES, "trainer.device", _either(DEVICES), t.device)
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "trainer.betas", "two numbers in [0, 1)",
           list(t.betas))
    _check(cfg.model.dtype in DTYPES, "model.dtype", _either(DTYPES), cfg.model.dtype)
    d, s = cfg.data, cfg.data.synthetic
    _check(d.source in DATA_SOURCES, "data.source", f"one of {', '.join(DATA_SOURCES)}", d.source)
    _check(d.overlong_prompts in OVERLONG_PROMPTS, "data.overlong_prompts", _either(OVERLONG_PROMPTS),
           d.overlong_prompts)
    _require(2 <= s.min_terms <= s.max_terms,
             f"data.synthetic needs 2 <= min_terms <= max_terms, got {s.min_terms}/{s.max_terms}.")
    _check(len(s.ops) >= 1 and set(s.ops) <= set("+-*"), "data.synthetic.ops", "made of + - *", s.ops)
    _check(s.hard_last_operand is None or 0 <= s.hard_last_operand <= s.max_operand + 1,
           "data.synthetic.hard_last_operand", f"in 0..{s.max_operand + 1} or null", s.hard_last_operand)
    if cfg.reward.function is not None:
        _check(":" in cfg.reward.function, "reward.function", "'module:function'", cfg.reward.function)
        from resrl.rewards import load_reward_function

        load_reward_function(cfg.reward.function)  # imported now: a typo fails here, not after data preparation
    if d.source == "synthetic":
        synthetic.check_settings(s)  # task, flaw, orders, and room for the asked number of problems
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path)
    max_new = max(r.max_tokens, e.max_tokens)
    positions = model_max_positions(cfg.model)
    _require(positions is None or max_new <= positions,  # with the prompts: checked after data preparation
             f"rollout.max_tokens/eval.max_tokens ({max_new}) exceed the model's {positions} positions "
             "(model.tiny.max_positions, or max_position_embeddings of model.path).")
    if cfg.warmstart.enabled:
        w = cfg.warmstart
        _check(w.steps >= 1, "warmstart.steps", ">= 1", w.steps)
        _check(w.batch_size >= 1, "warmstart.batch_size", ">= 1", w.batch_size)
        _check(w.lr > 0, "warmstart.lr", "> 0", w.lr)
    check_dtype(cfg.model.dtype, resolve_device(cfg.trainer.device))  # also: trainer.device=cuda without CUDA
    n = t.num_processes  # data-parallel ranks sample whole prompt groups
    _require(isinstance(n, int) and n >= 1, f"trainer.num_processes must be an integer >= 1, got {n}.")
    _require(n <= r.prompts_per_step,
             f"trainer.num_processes ({n}) is more than rollout.prompts_per_step ({r.prompts_per_step}): each "
             f"rank samples whole prompt groups, so a step has work for at most {r.prompts_per_step} ranks.")
