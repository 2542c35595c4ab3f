"""The typed config: presets, overrides, and a clear error for every bad input."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reckoning_ray.core.config import (
    available_presets,
    flatten,
    inner_steps_for,
    load_config,
    node_type_for,
    save_config,
)
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.schema import Config

from conftest import SHARED_DATA as SHARED
PROOFWRITER = SHARED / "proofwriter-owa-natlang-dev.jsonl"


def test_presets_ship_with_the_package_and_say_how_to_run_them():
    assert {"embedded", "paper"} <= set(available_presets())
    for name in ("embedded", "paper"):
        text = (Path(__file__).resolve().parents[1] / "reckoning_ray" / "conf" / f"{name}.yaml").read_text()
        assert text.startswith("#")
        assert "python -m reckoning_ray." in text.split("\n\n")[0] or "python -m reckoning_ray." in text[:1200]


def test_embedded_is_the_default_and_differs_from_schema_only_where_it_says():
    cfg = load_config()
    assert cfg.preset == "embedded"
    assert cfg.model.name_or_path == "embedded"
    assert cfg.data.source == "generate"
    assert cfg.inner.optimizer == "sgd" and cfg.inner.steps == 1
    # keys the preset does not set keep the schema's documented default
    assert cfg.inner.eps == Config().inner.eps == 1e-8


def test_paper_preset_has_the_papers_hyper_parameters():
    cfg = load_config("paper", [f"data.path={PROOFWRITER}"])
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.inner.optimizer == "adamw"
    assert cfg.inner.lr_init == 3e-5 and cfg.outer.lr == 3e-5
    assert cfg.inner.eps == 1e-8 and cfg.outer.eps == 1e-8
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2, 2, 6)
    assert cfg.train.validations_per_epoch == 2
    assert cfg.train.metric == "val/label_accuracy"
    assert [inner_steps_for(cfg, h) for h in (2, 3, 4, 5, 6)] == [4, 4, 4, 5, 5]
    assert node_type_for(cfg) == "a100"
    # Table 1: the authors' selection, the proof's facts only, dropout on, one GPU per run
    assert (cfg.data.selection, cfg.data.distractors, list(cfg.data.hops)) == ("paper", 0, [])
    assert cfg.model.dropout == 0.1
    assert (cfg.resources.num_workers, cfg.resources.gpus_per_worker) == (1, 1)
    # where the paper is silent, the authors' code: weight decay 0.05, clip 0.1, 6% warmup, patience 5
    assert (cfg.outer.weight_decay, cfg.outer.clip, cfg.outer.warmup_ratio) == (0.05, 0.1, 0.06)
    assert cfg.outer.schedule == "linear" and cfg.train.patience == 5


def test_paper_variants_extend_the_paper_preset_and_change_only_their_keys():
    paper = load_config("paper", [f"data.path={PROOFWRITER}"])
    distractors = load_config("paper-distractors", [f"data.path={PROOFWRITER}"])
    icr = load_config("paper-icr", [f"data.path={PROOFWRITER}"])
    assert distractors.preset == "paper-distractors" and distractors.data.distractors == 6
    assert icr.preset == "paper-icr" and icr.train.method == "icr" and node_type_for(icr) == "rtx3090"
    # FT-ICR: batch 16, validation once per epoch, lr 3e-5, 6 epochs, dropout 0.1
    assert (icr.train.batch_size, icr.train.grad_accum, icr.train.validations_per_epoch) == (16, 1, 1)
    assert (icr.outer.lr, icr.train.epochs, icr.model.dropout) == (3e-5, 6, 0.1)
    changed = {"preset", "data.distractors", "tune.name"}  # runs are named per run, not per preset
    flat_paper, flat_variant = flatten(paper), flatten(distractors)
    assert {k for k in flat_paper if flat_paper[k] != flat_variant[k]} == changed


def test_a_preset_that_extends_itself_is_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(str(loop))


def test_overrides_merge_with_types():
    cfg = load_config(None, ["train.epochs=3", "inner.lr_init=1e-4", "data.hops=[1,2]", "inner.steps=null"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.inner.lr_init == pytest.approx(1e-4)
    assert list(cfg.data.hops) == [1, 2]
    assert inner_steps_for(cfg, 1) == 4


def test_fixed_inner_steps_win_over_the_hop_table():
    cfg = load_config(None, ["inner.steps=3"])
    assert {inner_steps_for(cfg, h) for h in range(8)} == {3}


def test_hop_table_ranges_and_nearest_fallback():
    cfg = load_config(None, ["inner.steps=null", "inner.steps_by_hops.7-9=6"])
    assert [inner_steps_for(cfg, h) for h in (0, 4, 5, 6, 7, 9, 12)] == [4, 4, 5, 5, 6, 6, 6]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["trian.epochs=2"], ["unknown config key 'trian.epochs'", "top-level groups"]),
        (["train.epoch=2"], ["unknown config key 'train.epoch'", "epochs"]),
        (["train.epochs=many"], ["train.epochs", "'many'", "Integer"]),
        (["outer.lr=0"], ["outer.lr=0.0", "must be > 0"]),
        (["outer.lr=-1e-3"], ["outer.lr", "must be > 0"]),
        (["inner.lr_init=0"], ["inner.lr_init", "must be > 0"]),
        (["inner.steps=0"], ["inner.steps=0", "must be >= 1"]),
        (["inner.steps=null", "inner.steps_by_hops.2-4=0"], ["inner.steps_by_hops.2-4", ">= 1"]),
        (["inner.steps=null", "inner.steps_by_hops.x=3"], ["'x'", "range"]),
        (["inner.steps=null", "inner.steps_by_hops.1=2"], ["'0-4' and '1' overlap", "inner.steps_by_hops"]),
        (["train.batch_size=0"], ["train.batch_size=0", "must be >= 1"]),
        (["train.grad_accum=0"], ["train.grad_accum", "must be >= 1"]),
        (["train.method=magic"], ["train.method='magic'", "reckoning"]),
        (["data.source=wikipedia"], ["data.source='wikipedia'", "proofwriter", "clutrr"]),
        (["data.source=clutrr", "data.path=/no/such/file.csv"], ["data.path='/no/such/file.csv'", "does not exist"]),
        (["data.source=proofwriter"], ["data.path", "needs data.path"]),
        (["inner.optimizer=adam"], ["inner.optimizer='adam'", "adamw", "sgd"]),
        (["inner.autocast=fp16"], ["inner.autocast='fp16'", "bf16"]),
        (["inner.tasks_per_pass=-1"], ["inner.tasks_per_pass=-1", ">= 0"]),
        (["inner.checkpoint=maybe"], ["inner.checkpoint", "'maybe'"]),
        (["tracking.mode=loud"], ["tracking.mode='loud'", "offline"]),
        (["resources.node_type=v100"], ["resources.node_type='v100'", "a100", "rtx3090"]),
        (["model.n_head=3"], ["model.n_head=3", "must divide"]),
        (["model.dropout=1.0"], ["model.dropout=1.0", "must be in [0, 1)"]),
        (["model.dropout=-0.1"], ["model.dropout=-0.1", "must be in [0, 1)"]),
        (["model.dropout=high"], ["model.dropout", "'high'"]),
        (["epochs"], ["'epochs'", "key=value"]),
    ],
)
def test_bad_input_names_key_value_and_what_is_allowed(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for word in words:
        assert word in str(info.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"preset 'papr' does not exist.*embedded.*paper"):
        load_config("papr")


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoks: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.epoks"):
        load_config(str(bad))


def test_saved_config_reloads_to_the_same_tree(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "inner.lr_init=0.05"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(str(path))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_flatten_gives_dotted_keys():
    flat = flatten(load_config())
    assert flat["inner.lr_init"] == 0.1
    assert flat["train.method"] == "reckoning"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_data_selection_and_per_split_hops_default_and_validate():
    cfg = load_config()
    assert cfg.data.selection == "qdep"
    assert (cfg.data.train_hops, cfg.data.validation_hops, cfg.data.test_hops) == (None, None, None)
    cfg = load_config(None, ["data.selection=paper", "data.train_hops=[2,3]", "data.test_hops=[2,3,4,5]"])
    assert (cfg.data.selection, list(cfg.data.train_hops), list(cfg.data.test_hops)) == ("paper", [2, 3], [2, 3, 4, 5])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.selection=authors"])
    assert "data.selection='authors' is invalid: choose one of ('qdep', 'paper')" in str(info.value)
    with pytest.raises(ConfigError, match=r"data.test_hops=\[2, -1\] is invalid: hop counts must be >= 0"):
        load_config(None, ["data.test_hops=[2,-1]"])


def test_model_dropout_defaults_to_zero_and_accepts_values_below_one():
    assert Config().model.dropout == 0.0
    assert load_config(None, ["model.dropout=0.0"]).model.dropout == 0.0
    assert load_config(None, ["model.dropout=0.5"]).model.dropout == 0.5


def test_a_fresh_run_gets_a_fresh_directory_and_a_rerun_with_another_config_is_refused(tmp_path):
    """Runs never mix: without train.run_name every run has its own directory; continuing a run
    (its name, or --resume) with a changed config names the keys; epochs, patience, max_steps,
    resources and tracking may change."""
    from reckoning_ray.core.config import save_config
    from reckoning_ray.core.runs import run_dir_for

    base = [f"train.output_dir={tmp_path}"]
    first = run_dir_for(load_config("embedded", base))
    first.mkdir()
    save_config(load_config("embedded", base + [f"train.run_name={first.name}"]), first / "config.yaml")
    second = run_dir_for(load_config("embedded", base))
    assert first != second and first.name.startswith("embedded-") and second.parent == first.parent
    named = base + [f"train.run_name={first.name}"]
    assert run_dir_for(load_config("embedded", named + ["train.epochs=9", "resources.num_workers=2",
                                                         "tracking.mode=disabled"])) == first
    with pytest.raises(ConfigError) as info:
        run_dir_for(load_config("embedded", named + ["inner.lr_init=0.5", "data.num_train=64"]))
    message = str(info.value)
    assert "data.num_train: 1024 (run) -> 64 (now)" in message and "inner.lr_init: 0.1 (run) -> 0.5 (now)" in message
    assert f"--resume {first}" in message
    # --resume without a name: the latest run of the preset; with a name or a directory: that one
    assert run_dir_for(load_config("embedded", base), resume="") == first
    assert run_dir_for(load_config("embedded", base), resume=str(first)) == first
    with pytest.raises(ConfigError, match="no run there"):
        run_dir_for(load_config("embedded", base), resume="nope")


def _config_dataclasses(cls=Config, prefix=""):
    """(group prefix, dataclass) of the schema and every config group in it."""
    import dataclasses
    import typing

    yield prefix, cls
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _config_dataclasses(kind, f"{prefix}{f.name}.")


def test_every_config_field_is_documented_in_the_schema():
    """Each key's documentation lives in the schema (``doc(default, text)``: the field's
    metadata["doc"]), where --help-config reads it: a new key without one fails here."""
    import dataclasses

    undocumented = [f"{prefix}{f.name}" for prefix, cls in _config_dataclasses()
                    for f in dataclasses.fields(cls) if not str(f.metadata.get("doc", "")).strip()]
    assert not undocumented, f"document these keys with doc(default, text) in core/config.py: {undocumented}"


def test_each_metric_has_one_direction_and_tune_mode_must_agree_with_tune_metric():
    from reckoning_ray.core.config import metric_mode
    from reckoning_ray.core.schema import METRICS, METRIC_MODES

    assert set(METRICS) == set(METRIC_MODES)
    assert metric_mode("val/label_accuracy") == "max" and metric_mode("val/answer_loss") == "min"
    with pytest.raises(ConfigError, match="val/label_loss.*val/answer_loss"):
        metric_mode("val/label_loss")
    # the embedded preset sweeps on val/answer_loss (min); the schema default is label accuracy (max)
    assert load_config(None, ["tune.metric=val/label_accuracy", "tune.mode=max"]).tune.mode == "max"
    for overrides, fix in [(["tune.metric=val/label_accuracy"], "tune.mode=max"),
                           (["tune.metric=val/answer_loss", "tune.mode=max"], "tune.mode=min")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        message = str(info.value)
        assert "tune.mode" in message and "tune.metric" in message and fix in message, message


def test_the_training_loop_and_the_run_summary_take_the_metric_direction_from_the_config():
    from reckoning_ray.core import loop
    from reckoning_ray.core.config import metric_mode
    from reckoning_ray.tracking import writer

    assert loop.metric_mode is metric_mode and writer.metric_mode is metric_mode
    assert not hasattr(writer, "METRIC_MODES")


@pytest.mark.parametrize("override", [
    "train.run_name=/abs/path", "train.run_name=../../x", "train.run_name=a/b", "train.run_name=..",
    "tune.name=/tmp/elsewhere", "tune.name=../up", "tune.name=x/y", "tune.name=.", "tune.name=a b",
])
def test_names_that_become_paths_are_names(override, tmp_path, capsys):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: a name, not a path: use letters, digits"):
        load_config(None, [override])
    # the command line: exit status 2, one line naming the key, nothing written
    from reckoning_ray.train import main as train_main

    assert train_main([override, f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}=" in err[0], err
    assert not any(tmp_path.iterdir())


def test_names_with_letters_digits_dots_underscores_and_dashes_are_kept():
    cfg = load_config(None, ["train.run_name=run-1.2_b", "tune.name=sweep_3-a.b"])
    assert (cfg.train.run_name, cfg.tune.name) == ("run-1.2_b", "sweep_3-a.b")
    assert load_config(None, ["train.run_name=''"]).train.run_name == ""  # empty: the run is named for you
