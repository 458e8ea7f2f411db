"""Config loading: unknown keys, types and values fail early with messages that name them."""
import pytest

from resrl.config import ConfigError, config_hash, load_config, run_name


def test_defaults_load_and_resrl_is_default():
    cfg = load_config()
    assert cfg.algorithm.name == "resrl"
    assert cfg.algorithm.q_low == 0.2 and cfg.algorithm.q_high == 0.8 and cfg.algorithm.pos_weight == 0.1


def test_unknown_key_is_named_with_suggestions():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.rnak=4"])
    assert "algorithm.rnak" in str(e.value) and "algorithm.rank" in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="trainer.learning_rate"):
        load_config(f)


def test_leaf_under_wrong_section_is_suggested():
    with pytest.raises(ConfigError, match="algorithm.min_weight"):
        load_config(None, ["trainer.min_weight=0.3"])


@pytest.mark.parametrize("override, needle", [
    ("algorithm.rank=0", "algorithm.rank"),
    ("algorithm.q_low=0.9", "q_low"),
    ("algorithm.q_high=1.5", "q_high"),
    ("rollout.n=1", "rollout.n"),
    ("algorithm.name=ppo_magic", "algorithm.name"),
    ("loss.agg=sum", "loss.agg"),
    ("trainer.lr=abc", "trainer.lr"),
    ("rollout.prompts_per_step=3 rollout.n=3", "divisible"),
    ("trainer.zero_stage=4", "zero_stage"),
    ("loss.rollout_correction.mode=tis", "loss.rollout_correction.mode"),
    ("loss.rollout_correction.cap=0.5", "loss.rollout_correction.cap must be >= 1"),
    ("loss.rollout_correction.low=1.5", "loss.rollout_correction.low must be in"),
    ("rollout.backend=sglang", "rollout.backend must be one of auto, vllm, hf"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, override.split())


def test_single_sample_allowed_for_non_group_algorithms():
    cfg = load_config(None, ["algorithm.name=nsr", "rollout.n=1", "trainer.mini_batches=1"])
    assert cfg.rollout.n == 1


def test_model_path_must_be_a_hf_folder(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(None, [f"model.path={tmp_path / 'missing'}"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer"):
        load_config(None, [f"model.path={tmp_path}"])
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="safetensors"):
        load_config(None, [f"model.path={tmp_path}"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["algorithm.rank"])


def test_int_for_float_is_accepted_and_hash_is_stable():
    a = load_config(None, ["trainer.lr=1"])
    b = load_config(None, ["trainer.lr=1.0"])
    assert a.trainer.lr == 1.0 and config_hash(a) == config_hash(b)


def test_hash_ignores_bookkeeping_keys_but_not_algorithm():
    base = load_config()
    assert config_hash(base) == config_hash(load_config(None, ["run.output_dir=/elsewhere", "run.progress=false"]))
    other = load_config(None, ["algorithm.rank=16"])
    assert config_hash(base) != config_hash(other)
    assert run_name(other).startswith("resrl-") and run_name(other) != run_name(base)


def test_the_defaults_file_declares_hash_tags_read_from_its_comments():
    from resrl.config import key_tags

    tags = key_tags()
    assert not tags["run.output_dir"].hashed and not tags["trainer.max_abs_weight_accepted"].hashed
    assert tags["eval.final_k"].type is int and tags["eval.final_k"].hashed
    assert tags["algorithm.rank"].hashed and tags["algorithm.rank"].type is None  # only a @range: hashed, typed by its default
    assert "algorithm.name" not in tags  # untagged


@pytest.mark.parametrize("tag, same", [("@absent=0.5", True), ("@absent=0.0", False), ("", False)])
def test_a_key_added_with_its_absent_value_finds_the_old_run(tag, same, tmp_path, monkeypatch):
    """A new key tagged @absent=VALUE leaves every existing run's hash (and so its run folder) as it
    was while it has that value; set to another value, or added untagged, it makes a new run."""
    import resrl.config as config

    before = load_config(None, ["algorithm.rank=4"])
    text = config.DEFAULT_CONFIG.read_text().replace(
        "  rank: 8 ", f"  new_strength: 0.5     # {tag}  a key added after runs were made\n  rank: 8 ", 1)
    assert "new_strength" in text
    defaults = tmp_path / "default.yaml"
    defaults.write_text(text)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", defaults)
    after = load_config(None, ["algorithm.rank=4"])
    assert after.algorithm.new_strength == 0.5
    assert (config_hash(after) == config_hash(before)) is same
    assert (config.run_dir(after) == config.run_dir(before)) is same
    assert config_hash(load_config(None, ["algorithm.rank=4", "algorithm.new_strength=0.7"])) != config_hash(before)


def test_cli_reports_config_error_before_loading_anything(capsys):
    from resrl.cli import main

    assert main(["train", "algorithm.rnk=3"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.rnk" in err and "algorithm.rank" in err


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lr=-1"], "trainer.lr must be > 0, got -1.0."),
    (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1], got 1.5."),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size must be >= 1, got 0."),
    (["loss.clip_high=-0.1"], "loss.clip_high must be >= 0, got -0.1."),
    (["data.overlong_prompts=cut"], "data.overlong_prompts must be drop or truncate, got 'cut'."),
    (["trainer.betas=[0.9,1.0]"], "trainer.betas must be two numbers in [0, 1), got [0.9, 1.0]."),
])
def test_value_errors_show_the_bad_value(overrides, message, capsys):
    from resrl.cli import main

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message
    assert main(["train", *overrides]) == 2
    assert capsys.readouterr().err == f"resrl: error: {message}\n"  # one line, no traceback


def test_library_user_errors_are_user_errors():
    """Mistakes a user can make through the library are UserErrors too, so the CLI prints them as one line."""
    from resrl.algorithms import get_algorithm
    from resrl.errors import UserError
    from resrl.rewards import compute_score

    with pytest.raises(UserError, match="unknown algorithm 'ppo'"):
        get_algorithm("ppo")
    with pytest.raises(UserError, match="no reward function registered for data_source 'mine'"):
        compute_score("mine", "#### 1", "1")


def test_default_yaml_lists_only_accepted_choices():
    """The comments of conf/default.yaml that list a key's choices name only values validation accepts
    (a new algorithm or source need not be added there for the suite to pass)."""
    import re

    from resrl.algorithms import ALGORITHMS, LOSS_AGGREGATIONS
    from resrl.config import DEFAULT_CONFIG
    from resrl.data import DATA_SOURCES

    text = DEFAULT_CONFIG.read_text()

    def listed(section: str, key: str) -> set[str]:
        block = re.search(rf"^{section}:\n((?:[ #].*\n|\n)*)", text, re.MULTILINE).group(1)
        line = re.search(rf"^  {key}:[^#]*#\s*(.*)$", block, re.MULTILINE).group(1)
        return {word.strip() for word in line.split("|")}

    assert listed("data", "source") <= set(DATA_SOURCES)
    assert listed("algorithm", "name") <= set(ALGORITHMS)
    assert listed("loss", "agg") <= set(LOSS_AGGREGATIONS)
    for source in listed("data", "source"):
        load_config(None, [f"data.source={source}", "data.path=x"] if source != "synthetic" else [])


def test_cuda_without_a_cuda_device_is_refused_at_load(monkeypatch):
    """Before data preparation (it used to surface only when the trainer started)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA device is visible"):
        load_config(None, ["trainer.device=cuda"])
    assert load_config(None, ["trainer.device=auto"]).trainer.device == "auto"


def test_mlflow_bookkeeping_keys_leave_the_hash_of_existing_runs():
    """run.system_metrics, run.log_model, run.concurrency_limit and run.sweep_deployment came after runs existed: a
    config without them (as those runs were hashed) has the same hash, so those runs are found
    and resumed, not redone."""
    from omegaconf import OmegaConf, open_dict

    cfg = load_config(None, ["run.system_metrics=false", "run.log_model=false", "run.concurrency_limit=other",
                             "run.sweep_deployment=null"])
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(old):
        for key in ("system_metrics", "log_model", "concurrency_limit", "sweep_deployment"):
            del old.run[key]
    assert config_hash(cfg) == config_hash(old) == config_hash(load_config())


def test_range_tags_parse_and_check_by_hand():
    from resrl.config import Range

    cases = {  # tag -> (accepted, rejected, rule)
        ">=1": ([1, 2, 10 ** 6], [0, -1, 0.5, None, True, "1"], ">= 1"),
        ">0": ([1e-12, 3], [0, -1e-12, None], "> 0"),
        "[0,1]": ([0, 0.5, 1], [-0.01, 1.01, None], "in [0, 1]"),
        "(0,1]": ([1e-9, 1], [0, 1.5], "in (0, 1]"),
        "[0,1)": ([0, 0.999], [1], "in [0, 1)"),
        ">0|null": ([None, 2.5], [0, -3], "> 0 or null"),
    }
    for tag, (ok, bad, rule) in cases.items():
        r = Range.parse(tag, "k")
        assert r.rule() == rule
        assert all(r.accepts(v) for v in ok), tag
        assert not any(r.accepts(v) for v in bad), tag
    with pytest.raises(ConfigError, match="@range=1..2"):
        Range.parse("1..2", "k")


def test_every_range_tag_is_enforced_and_declared_once():
    """Each @range key of conf/default.yaml: its default passes, a value outside its range fails
    with the key and the rule in the message, and resrl/config.py holds no second rule for it."""
    import re

    from omegaconf import OmegaConf

    from conftest import ROOT
    from resrl.config import key_tags, load_config, validate

    defaults = load_config()
    ranged = {k: t.range for k, t in key_tags().items() if t.range is not None}
    assert len(ranged) >= 40 and "algorithm.rank" in ranged and "trainer.lr" in ranged
    validate(load_config())
    source = (ROOT / "resrl" / "config.py").read_text()
    for key, r in ranged.items():
        outside = r.low - 1 if r.low is not None else r.high + 1
        if r.low is not None and r.low_open:
            outside = r.low
        declared = key_tags()[key].type or type(OmegaConf.select(defaults, key))
        if declared is int:
            outside = int(outside)
        with pytest.raises(ConfigError, match=re.escape(f"{key} must be {r.rule()}")):
            validate(load_config(None, [f"{key}={outside}"]))
        assert f'"{key}"' not in source, f"{key} has a rule in resrl/config.py besides its @range tag"
