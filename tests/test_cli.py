"""The command lines' own options: --print-config (resolve, validate, print, start nothing),
--help-config (every key's type, default and documentation, read from the schema) and the --help
block naming the config groups. Fast: no Ray, no training."""

import dataclasses
import re
import typing

import pytest
import ray
import yaml
from omegaconf import OmegaConf

from reckoning_ray.core import config as config_module
from reckoning_ray.core import schema
from reckoning_ray.core.config import load_config
from reckoning_ray.train import main as train_main
from reckoning_ray.tune import main as tune_main

MAINS = {"train": train_main, "tune": tune_main}


@pytest.mark.parametrize("command", ["train", "tune"])
def test_print_config_prints_the_resolved_config_and_starts_nothing(command, capsys, tmp_path, monkeypatch):
    # a config load, not a Ray start, a data set or a model
    def started(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"--print-config {what}")
        return fail

    monkeypatch.setattr(ray, "init", started("started Ray"))
    monkeypatch.setattr("reckoning_ray.core.data.sources.read_records", started("read the data"))
    monkeypatch.setattr("reckoning_ray.core.data.sources.load_splits", started("built the data set"))
    status = MAINS[command](["--print-config", "train.epochs=3", "inner.lr_init=0.05"])
    out = capsys.readouterr().out
    assert status == 0
    assert not ray.is_initialized()
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
def test_help_names_every_config_group_and_points_to_help_config(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--print-config" in text and "--help-config" in text
    assert "config.py" not in text  # the keys are documented by --help-config, not by a source file
    rows = {line.split()[0]: line for line in text.splitlines()
            if line.startswith("  ") and line.split() and line.split()[0].endswith(".*")}
    # every group of the schema, each with the first words of its dataclass's docstring
    assert set(rows) == {f"{group}.*" for group, _ in CONFIG_GROUPS}
    for group, cls in CONFIG_GROUPS:
        assert " ".join(cls.__doc__.split()[:3]) in rows[f"{group}.*"], (group, rows[f"{group}.*"])


def _config_groups(cls=schema.Config, prefix=""):
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            yield f"{prefix}{f.name}", kind
            yield from _config_groups(kind, f"{prefix}{f.name}.")


CONFIG_GROUPS = list(_config_groups())
SCHEMA = OmegaConf.to_container(OmegaConf.structured(schema.Config), enum_to_str=True)
KEY_LINE = re.compile(r"^\s*(?P<key>[\w.]+): (?P<type>.+?) = (?P<default>.*)$")


def _help_config(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _shown_keys(text):
    return {m["key"]: m for m in map(KEY_LINE.match, text.splitlines()) if m}


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_config_lists_every_key_with_its_type_default_and_doc(command, capsys):
    status, out, _ = _help_config(MAINS[command], ["--help-config"], capsys)
    assert status == 0
    shown = _shown_keys(out)
    schema_keys = [f"{prefix}{f.name}" for prefix, cls in [("", schema.Config)]
                   + [(f"{g}.", c) for g, c in CONFIG_GROUPS]
                   for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    assert sorted(shown) == sorted(schema_keys)
    for key, line in shown.items():
        # the default is shown as an override writes it: it reads back as the schema's default
        default = line["default"]
        assert OmegaConf.select(OmegaConf.from_dotlist([f"{key}={default}"]), key) == OmegaConf.select(
            OmegaConf.create(SCHEMA), key), (key, default)
    lines = out.splitlines()
    for key in ("inner.lr_init", "data.generator.labels", "train.run_name"):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        prefix, cls = key.rsplit(".", 1)[0], dict(CONFIG_GROUPS)[key.rsplit(".", 1)[0]]
        doc = next(f.metadata["doc"] for f in dataclasses.fields(cls) if f"{prefix}.{f.name}" == key)
        assert doc.split()[0] in lines[at + 1], (key, lines[at + 1])
    assert shown["inner.steps"]["type"] == "int or null" and shown["inner.optimizer"]["type"] == "adamw | sgd"
    assert shown["data.generator.labels"]["default"] == '["yes", "no"]'  # bare yes / no would be booleans


def test_help_config_of_a_group_prints_that_group_and_its_subgroups_only(capsys):
    status, out, _ = _help_config(train_main, ["--help-config", "inner"], capsys)
    assert status == 0
    shown = _shown_keys(out)
    def leaves(cls, prefix):  # a subgroup (inner.lora) shows its own keys
        for f in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[f.name]
            yield from leaves(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]

    assert set(shown) == set(leaves(schema.InnerConfig, "inner.")) and "inner.lora.r" in shown
    status, out, _ = _help_config(tune_main, ["--help-config", "data"], capsys)
    assert status == 0
    assert {key.split(".")[0] for key in _shown_keys(out)} == {"data"}
    assert "data.generator.num_rules" in _shown_keys(out)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_config_of_an_unknown_group_exits_2_naming_the_groups(command, capsys):
    status, out, err = _help_config(MAINS[command], ["--help-config", "innr"], capsys)
    assert status == 2 and out == ""
    assert "'innr'" in err
    for group, _ in CONFIG_GROUPS:
        assert group in err


def test_tune_print_config_checks_the_search_space(capsys):
    assert tune_main(["--print-config", "space=no-such-space"]) == 2
    assert "tune.space='no-such-space' is not a search space" in capsys.readouterr().err
