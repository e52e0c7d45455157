"""Profiles, and the one-source-of-truth rule for versions."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from pfl import config

ROOT = Path(__file__).resolve().parent.parent


def test_profiles_share_fields_and_differ_in_sizes():
    s, p = config.smoke(), config.paper()
    assert s.to_dict().keys() == p.to_dict().keys()
    assert (p.backbone.model_name, p.backbone.image_size) == ("ViT-L-14-336", 518)
    assert (p.model.n_prompts, p.model.n_ctx, p.model.n_state, p.model.flow_length) == (3, 5, 5, 10)
    assert (p.model.mc_train, p.model.mc_test) == (1, 10)
    assert (p.train.lr, p.train.batch_size, p.train.epochs) == (1e-4, 32, 20)


def test_smoke_model_is_the_papers_but_for_the_prior_scale():
    """The smoke profile's new modules are the paper's, with the flow prior at the token scale
    (README "The prompt posterior"); the paper keeps N(0, I), and the authors'-code preset uses
    N(0, I) on any base profile."""
    s, p = config.smoke().model, config.paper().model
    assert (s.prior_std, p.prior_std) == (0.02, 1.0)
    assert dataclasses.replace(s, prior_std=1.0) == p
    for base in (config.smoke(), config.paper()):
        assert config.official(base).model.prior_std == 1.0


def test_active_profile_from_environment(monkeypatch):
    monkeypatch.delenv("PFL_PROFILE", raising=False)
    assert config.active().name == "smoke"
    monkeypatch.setenv("PFL_PROFILE", "paper")
    assert config.active().name == "paper"
    monkeypatch.setenv("PFL_PROFILE", "big")
    with pytest.raises(ValueError, match="PFL_PROFILE"):
        config.active()


def test_profile_round_trips_through_dict():
    p = config.smoke().replace(model={"n_prompts": 2}, train={"epochs": 7})
    q = config.Profile.from_dict(p.to_dict())
    assert q == p and q.model.n_prompts == 2 and q.train.epochs == 7
    with pytest.raises(ValueError, match="unknown ModelConfig"):
        config.Profile.from_dict({"name": "x", "model": {"bogus": 1}})


def test_environment_yml_pins_what_pyproject_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {d.split("==")[0].lower(): d.split("==")[1] for d in deps if "==" in d}
    env = (ROOT / "environment.yml").read_text()
    env_pins = dict(re.findall(r"^\s*-\s*([A-Za-z0-9_.-]+)==([^\s]+)", env, re.M))
    assert {k.lower(): v for k, v in env_pins.items()} == pinned
    assert re.search(r"python=3\.11", env)
    assert "-e .[notebooks,dev]" in env
