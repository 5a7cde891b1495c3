"""The settings and their one vocabulary of dotted keys (expand_and_cluster.config), as the
library, the command line and the suites use it."""

from __future__ import annotations

import dataclasses

import pytest

from expand_and_cluster.cli import _settings, build_parser
from expand_and_cluster.config import (
    RUN_DEFAULTS,
    ClusterConfig,
    RecoverConfig,
    RepairConfig,
    TrainConfig,
    parse_assignments,
    parse_setting,
)
from expand_and_cluster.errors import InputError


def test_keys_name_every_field_of_every_nested_config():
    keys = RecoverConfig.keys()
    for name, cls in [("train", TrainConfig), ("cluster", ClusterConfig), ("repair", RepairConfig)]:
        for f in dataclasses.fields(cls):
            assert f"{name}.{f.name}" in keys
    assert keys["train.max_epochs"] is int and keys["cluster.gamma"] is float
    assert "held_out_fraction" in keys and "activation" not in keys


def test_settings_round_trip_through_updated():
    cfg = RecoverConfig("g", hidden_layers=2, width=7).updated(
        {"cluster.gamma": 0.75, "repair.trial_queries": 100, "train.patience": 3}
    )
    settings = cfg.settings()
    assert settings["cluster.gamma"] == 0.75 and settings["width"] == 7
    assert RecoverConfig("g").updated(settings) == cfg


def test_max_epochs_applies_the_schedule_scaling_rule_unless_told_otherwise():
    cfg = RecoverConfig("tanh").updated({"train.max_epochs": 300})
    assert (cfg.train.max_epochs, cfg.train.patience, cfg.train.cooldown) == (300, 30, 15)
    assert cfg.search.epochs == 100
    assert cfg.train == TrainConfig().scaled(300)
    small = RecoverConfig("tanh").updated({"train.max_epochs": 40})
    assert (small.train.patience, small.train.cooldown, small.search.epochs) == (10, 5, 20)
    given = RecoverConfig("tanh").updated(
        {"train.max_epochs": 300, "train.patience": 7, "search.epochs": 11}
    )
    assert (given.train.patience, given.train.cooldown, given.search.epochs) == (7, 15, 11)
    # Other settings leave the schedule alone.
    assert RecoverConfig("tanh").updated({"train.lr": 0.01}).train.patience == 200


def test_stretched_multiplies_the_whole_schedule():
    t = TrainConfig(max_epochs=300, patience=30, cooldown=15).stretched(4)
    assert (t.max_epochs, t.patience, t.cooldown) == (1200, 120, 60)


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(InputError, match="unknown setting 'train.epochs'; known: .*max_epochs"):
        RecoverConfig("tanh").updated({"train.epochs": 3})
    with pytest.raises(InputError, match="gamma: expected a value in"):
        RecoverConfig("tanh").updated({"cluster.gamma": 2.0})
    with pytest.raises(InputError, match="n_students: expected an integer >= 1"):
        RecoverConfig("tanh").updated({"train.n_students": "0"})
    with pytest.raises(InputError, match="activation: unknown activation"):
        RecoverConfig("swish")
    with pytest.raises(InputError, match="device"):
        RecoverConfig("tanh", device="tpu")


@pytest.mark.parametrize(
    "key, text, value",
    [
        ("train.max_epochs", "12", 12),
        ("cluster.gamma", "0.25", 0.25),
        ("repair.enabled", "false", False),
        ("repair.enabled", "1", True),
        ("train.batch_size", "none", None),
        ("width", "None", None),
        ("train.dtype", "float64", "float64"),
    ],
)
def test_parse_setting(key, text, value):
    assert parse_setting(key, text) == value


def test_parse_assignments_errors():
    assert parse_assignments(["train.lr=0.5", " cluster.metric = l2 "]) == {
        "train.lr": 0.5,
        "cluster.metric": "l2",
    }
    with pytest.raises(InputError, match="--set: expected KEY=VALUE"):
        parse_assignments(["train.lr"])
    with pytest.raises(InputError, match="--set: train.max_epochs: expected int"):
        parse_assignments(["train.max_epochs=1.5"])
    with pytest.raises(InputError, match="--set: unknown setting 'nope'"):
        parse_assignments(["nope=1"])


def test_to_dict_from_dict_round_trip_and_older_dicts():
    cfg = RecoverConfig("relu", repair=RepairConfig.off()).updated({"train.max_epochs": 50})
    assert RecoverConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["repair"]["enabled"]  # a checkpoint written before the field existed
    assert RecoverConfig.from_dict(old).repair.enabled
    with pytest.raises(InputError, match="not a RecoverConfig of this version"):
        RecoverConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_command_line_flags_set_the_same_dotted_keys():
    args = build_parser().parse_args(
        ["recover", "--queries", "q.npz", "--activation", "tanh", "--out", "o", "--epochs",
         "80", "--gamma", "0.75", "--no-repair", "--set", "train.patience=4", "--quiet"]
    )  # fmt: skip
    settings = _settings(args)
    assert settings["train.max_epochs"] == 80 and settings["cluster.gamma"] == 0.75
    assert settings["repair.enabled"] is False and settings["train.patience"] == 4
    assert settings["train.progress"] is False
    # The flags' defaults are the run defaults.
    for key, value in RUN_DEFAULTS.items():
        if key not in ("train.max_epochs", "cluster.gamma"):
            assert settings[key] == value
    cfg = RecoverConfig("tanh").updated(settings)
    assert (cfg.train.max_epochs, cfg.train.patience, cfg.train.cooldown) == (80, 4, 5)
    assert cfg.search.epochs == 26 and not cfg.repair.enabled
