"""The command lines' own options: --print-config (resolve, validate, print, start nothing) and the
--help block naming where each config group's keys are documented. Fast: no Ray, no training."""

import dataclasses
import time

import pytest
import ray
import yaml

from reckoning_ray import config as config_module
from reckoning_ray.config import load_config
from reckoning_ray.train import main as train_main
from reckoning_ray.tune import main as tune_main

MAINS = {"train": train_main, "tune": tune_main}


@pytest.mark.parametrize("command", ["train", "tune"])
def test_print_config_prints_the_resolved_config_and_starts_nothing(command, capsys, tmp_path):
    t0 = time.perf_counter()
    status = MAINS[command](["--print-config", "train.epochs=3", "inner.lr_init=0.05"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert status == 0
    assert not ray.is_initialized()
    assert elapsed < 10, elapsed  # a config load, not a Ray start or a data set
    assert "epochs: 3" in out
    printed = yaml.safe_load(out)  # nothing but the YAML on stdout
    assert printed["train"]["epochs"] == 3 and printed["inner"]["lr_init"] == 0.05
    assert printed["preset"] == "embedded"
    # it is the config a run would use, and a valid --config file
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    assert yaml.safe_load(config_module.to_yaml(load_config(str(path)))) == printed
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("argv, words", [
    (["--print-config", "train.epochs=0"], ["train.epochs=0 is invalid", "must be >= 1"]),
    (["--print-config", "train.epochz=3"], ["unknown config key 'train.epochz'"]),
    # the preset's own validation runs too: the paper preset needs its data files
    (["paper", "--print-config"], ["data.path"]),
])
def test_print_config_with_a_bad_config_exits_2_with_the_one_line_error(command, argv, words, capsys):
    assert MAINS[command](argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for word in words:
        assert word in lines[0]
    assert not ray.is_initialized()


def test_print_config_of_a_saved_config_file(tmp_path, capsys):
    saved = tmp_path / "best_config.yaml"
    config_module.save_config(load_config(None, ["outer.lr=0.002"]), saved)
    assert train_main(["--config", str(saved), "train.patience=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["outer"]["lr"] == 0.002 and printed["train"]["patience"] == 7


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_names_every_config_group_and_the_dataclass_documenting_it(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text
    assert "reckoning_ray/config.py" in text
    expected = {
        "model": "ModelConfig", "data": "DataConfig", "inner": "InnerConfig", "outer": "OuterConfig",
        "eval": "EvalConfig", "train": "TrainConfig", "tracking": "TrackingConfig",
        "resources": "ResourcesConfig", "tune": "TuneConfig", "data.generator": "GeneratorConfig",
    }
    # the list above is the whole schema (the --help block is generated from it)
    schema_groups = {f.name for f in dataclasses.fields(config_module.Config) if f.name != "preset"}
    assert schema_groups <= set(expected)
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines()
            if line.startswith("  ") and line.split() and line.split()[0].endswith(".*")}
    for group, dataclass_name in expected.items():
        assert rows.get(f"{group}.*") == dataclass_name, (group, rows)
        assert hasattr(config_module, dataclass_name)


def test_tune_print_config_checks_the_search_space(capsys):
    assert tune_main(["--print-config", "space=no-such-space"]) == 2
    assert "tune.space='no-such-space' is not a search space" in capsys.readouterr().err
