"""The published warm-start (resrl/published.py): the default config finds it, `prepare` copies
it instead of training, and a copy that fails its sha256 check is skipped, never used."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from resrl import published
from resrl.cache import file_sha256
from resrl.config import load_config
from resrl.prepare import cache_keys, prepare

WEIGHTS = "model.safetensors"


def default_key() -> str:
    return cache_keys(load_config())["warmstart"]


def test_the_default_config_has_a_verified_published_warmstart():
    key = default_key()
    assert published.verified(key) is not None, (
        f"the default config's warm-start key is {key}, and resrl/published/ has no verified copy of it: "
        "re-publish it with `python -m resrl.publish_warmstart` (about 3 min) and commit the folder")
    manifest = json.loads((published.folder(key) / published.MANIFEST).read_text())
    assert WEIGHTS in manifest["files"] and "config.json" in manifest["files"]
    assert 0 < manifest["metrics"]["warmstart/final_loss"] < 1


@pytest.fixture
def published_copy(tmp_path):
    """A copy of the default's published folder in a root of its own, to damage."""
    key = default_key()
    root = tmp_path / "published"
    shutil.copytree(published.folder(key), published.folder(key, root))
    return key, root


def test_a_published_copy_with_a_changed_byte_is_skipped(published_copy, tmp_path, caplog):
    key, root = published_copy
    assert published.verified(key, root) is not None
    weights = published.folder(key, root) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="resrl.published"):
        assert published.copy_into(key, out, root) is None
    assert not list(out.iterdir())
    assert WEIGHTS in caplog.text and "sha256" in caplog.text


@pytest.mark.parametrize("damage", ["missing file", "other key", "unreadable manifest"])
def test_a_published_copy_that_fails_its_manifest_is_skipped(published_copy, damage):
    key, root = published_copy
    d = published.folder(key, root)
    manifest_path = d / published.MANIFEST
    if damage == "missing file":
        (d / "config.json").unlink()
    elif damage == "other key":
        manifest = json.loads(manifest_path.read_text())
        manifest["key"] = "0" * 12
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest_path.write_text("{not json")
    assert published.verified(key, root) is None


def test_no_published_copy_for_another_key():
    assert published.verified("0" * 12) is None


def _fake_training(calls):
    def warm_start(base_dir, out_dir, train_rows, cfg, progress=True):
        calls.append(out_dir)
        shutil.copytree(base_dir, out_dir, dirs_exist_ok=True)  # the untrained base stands in for a result
        return {"warmstart/final_loss": 9.0}
    return warm_start


def test_prepare_copies_the_published_warmstart_instead_of_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("resrl.warmstart.warm_start", _fake_training(calls))
    cfg = load_config(None, [f"run.cache_dir={tmp_path / 'cache'}"])
    key = cache_keys(cfg)["warmstart"]
    got = prepare(cfg, progress=False)
    assert got["warmstart_source"] == "published" and got["warmstart_reused"] is False and not calls
    manifest = json.loads((published.folder(key) / published.MANIFEST).read_text())
    assert got["policy_dir"].endswith(key)
    assert file_sha256(tmp_path / "cache" / "warmstart" / key / WEIGHTS) == manifest["files"][WEIGHTS]
    assert got["metrics"]["warmstart/final_loss"] == manifest["metrics"]["warmstart/final_loss"]
    again = prepare(cfg, progress=False)
    assert again["warmstart_source"] == "cache" and again["warmstart_reused"] is True and not calls


@pytest.mark.parametrize("why", ["switched off", "damaged"])
def test_prepare_trains_the_warmstart_when_the_published_copy_is_off_or_damaged(why, published_copy, tmp_path,
                                                                                 monkeypatch):
    key, root = published_copy
    calls = []
    monkeypatch.setattr("resrl.warmstart.warm_start", _fake_training(calls))
    overrides = [f"run.cache_dir={tmp_path / 'cache'}"]
    if why == "switched off":
        overrides.append("run.published_warmstart=false")
    else:
        (published.folder(key, root) / WEIGHTS).write_bytes(b"not the weights")
    monkeypatch.setattr(published, "ROOT", root)
    got = prepare(load_config(None, overrides), progress=False)
    assert got["warmstart_source"] == "trained" and len(calls) == 1
    assert got["metrics"]["warmstart/final_loss"] == 9.0
