"""The paper's tables: every cell defined once, the report beside the paper's numbers, and the whole
path in miniature (a fetched local archive, every cell with the embedded model, the report)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from reckoning_ray.core.config import flatten, save_config
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.paper import (
    CLUTRR_SG_LEVELS,
    NUMBERS,
    PROOFWRITER_DEPTHS,
    ROWS,
    cell_config,
    cells,
    paper_numbers,
    report_rows,
    trial_results,
)
from conftest import PAPER_MINI as MINI
from reckoning_ray.paper import main as paper_main
from reckoning_ray.paper import sweep_space

DATA = {"proofwriter": "/data/pw", "clutrr-sg": "/data/csg"}


@pytest.fixture
def data_dirs(tmp_path):
    """Directories the cells' data paths point at (a config check wants them to exist)."""
    for depth in PROOFWRITER_DEPTHS:
        (tmp_path / "pw" / f"depth-{depth}").mkdir(parents=True)
    (tmp_path / "csg").mkdir()
    return {"proofwriter": str(tmp_path / "pw"), "clutrr-sg": str(tmp_path / "csg")}


def test_table1_has_every_row_on_every_dataset_column():
    table = cells("table1", DATA)
    assert {(c.row, c.column) for c in table} == {
        (row, col) for row in ROWS for col in [*(f"pw-{d}" for d in PROOFWRITER_DEPTHS),
                                                *(f"csg-{k}" for k in CLUTRR_SG_LEVELS)]}
    assert len(table) == 7 * 6


def test_each_cell_is_its_method_preset_and_data(data_dirs):
    by_name = {c.name: cell_config(c, []) for c in cells("all", data_dirs)}
    rmt = by_name["table1/reckoning-mt/pw-5"]
    assert (rmt.train.method, rmt.outer.multi_task, rmt.inner.steps) == ("reckoning", True, 5)
    assert rmt.data.path == f"{data_dirs['proofwriter']}/depth-5" and rmt.data.distractors == 0 and rmt.train.batch_size == 2
    icr = by_name["table1/ft-icr/csg-4"]
    assert (icr.train.method, icr.outer.multi_task, icr.train.batch_size) == ("icr", False, 16)
    assert (icr.data.source, icr.data.path, list(icr.data.hops)) == ("clutrr", data_dirs["clutrr-sg"], [4])
    assert by_name["table1/no-question/pw-2"].train.method == "icr_no_question"
    assert by_name["table1/random-facts/pw-3"].train.method == "reckoning_random_facts"
    assert by_name["distractors/reckoning-mt/pw-2"].data.distractors == -1
    assert [by_name[f"figure5/ft-icr-mt/{d}"].data.distractors for d in ("d0", "d2", "d4", "d6", "dall")] == \
        [0, 2, 4, 6, -1]
    # each cell names its W&B group, which is how the report finds its runs
    assert all(cfg.tracking.group == name for name, cfg in by_name.items())


def test_a_table_without_its_data_names_the_flag():
    with pytest.raises(ConfigError, match="--clutrr-sg DIR"):
        cells("table1", {"proofwriter": "/data/pw"})
    with pytest.raises(ConfigError, match="table 'table9' is not one of"):
        cells("table9", DATA)


def test_rows_and_columns_choose_cells_and_only_their_data_is_needed(data_dirs):
    chosen = cells("table1", {"proofwriter": data_dirs["proofwriter"]}, rows=["reckoning-mt", "ft-icr-mt"],
                   columns=["pw-2"])
    assert [(c.row, c.column) for c in chosen] == [("ft-icr-mt", "pw-2"), ("reckoning-mt", "pw-2")]
    assert {(c.table, c.column) for c in cells("all", data_dirs, columns=["pw-3"])} == {
        ("table1", "pw-3"), ("distractors", "pw-3")}
    with pytest.raises(ConfigError, match="no row nope in this table; choose from no-facts"):
        cells("table1", data_dirs, rows=["nope"])
    with pytest.raises(ConfigError, match="no column csg-3"):
        cells("table1", data_dirs, columns=["csg-3"])


def test_the_sweep_grids_cells_as_their_differences_times_the_seeds(data_dirs):
    table = cells("distractors", data_dirs)
    base, space = sweep_space(table, [cell_config(c, []) for c in table], seeds=3)
    assert space["train.seed"] == ("grid", [0, 1, 2])
    kind, diffs = space["cell"]
    assert kind == "grid" and len(diffs) == len(table)
    flat = flatten(base)
    for cell, diff in zip(table, diffs):
        rebuilt = {**flat, **diff}
        expected = flatten(cell_config(cell, []))
        assert {k: v for k, v in rebuilt.items() if not k.startswith(("tune.", "preset"))} == \
            {k: v for k, v in expected.items() if not k.startswith(("tune.", "preset"))}


def test_every_paper_number_names_its_source():
    with open(NUMBERS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["source"] and float(r["value"]) > 0 for r in rows)
    numbers = paper_numbers()
    assert numbers[("distractors", "reckoning-mt", "mean")][0] == 82.5
    assert numbers[("distractors", "ft-icr-mt", "mean")][0] == 70.9


def _trial(root: Path, trial: str, cell: str, seed: int, test: dict | None) -> None:
    from reckoning_ray.core.config import load_config

    run_dir = root / "trials" / trial
    run_dir.mkdir(parents=True)
    save_config(load_config("embedded", [f"tracking.group={cell}", f"train.seed={seed}"]), run_dir / "config.yaml")
    if test is not None:
        (run_dir / "summary.json").write_text(json.dumps({"test": test}))


def test_report_averages_seeds_and_marks_cells_not_done(tmp_path):
    _trial(tmp_path, "a", "distractors/reckoning-mt/pw-2", 0,
           {"test/label_accuracy": 0.8, "test/label_accuracy/hops_1": 0.9, "test/recall": 0.7})
    _trial(tmp_path, "b", "distractors/reckoning-mt/pw-2", 1,
           {"test/label_accuracy": 0.9, "test/label_accuracy/hops_1": 1.0, "test/recall": 0.8})
    _trial(tmp_path, "c", "distractors/ft-icr-mt/pw-2", 0, None)  # still running
    (tmp_path / "sweep_summary.json").write_text(json.dumps({"trials": [{"trial": "c", "status": "error"}]}))
    rows = {(r["row"], r["column"]): r for r in report_rows("distractors", trial_results(tmp_path), paper_numbers())}
    cell = rows[("reckoning-mt", "pw-2")]
    assert cell["ours"] == pytest.approx(85.0) and cell["n"] == 2 and cell["std"] == pytest.approx(7.0711, 1e-3)
    assert cell["hops"] == {"1": pytest.approx(95.0)}
    assert rows[("ft-icr-mt", "pw-2")]["state"] == "failed" and rows[("ft-icr-mt", "pw-2")]["ours"] is None
    assert rows[("reckoning-mt", "pw-3")]["state"] == "not run"
    mean = rows[("reckoning-mt", "mean")]
    assert mean["paper"] == 82.5 and mean["ours"] is None and mean["state"] == "incomplete"


def test_report_command_writes_markdown_and_csv(tmp_path, capsys):
    _trial(tmp_path, "a", "table1/reckoning-mt/pw-2", 0, {"test/label_accuracy": 0.5, "test/recall": 0.25})
    assert paper_main(["report", str(tmp_path), "--no-wandb"]) == 0
    out = capsys.readouterr().out
    assert "### table1" in out and "| RECKONING (MT) | pw-2 | - | 50.0 ± 0.0 | 1 |" in out
    # the paper's layout: a line per method, a column per data set, "ours (paper)"
    assert "| method | pw-2 | pw-3 | pw-5 | csg-2 | csg-4 | csg-6 | pw-mean |" in out
    assert "| RECKONING (MT) | 50.0 (-) | not run (-) | not run (-) |" in out
    assert "| No-Facts | pw-2 | - | not run | 0 |" in out
    assert "### recall" in out
    assert (tmp_path / "paper_report.md").read_text() in out
    with open(tmp_path / "paper_report.csv", newline="") as f:
        assert any(r["row"] == "reckoning-mt" and r["column"] == "pw-2" and float(r["ours"]) == 50.0
                   for r in csv.DictReader(f))
    assert paper_main(["report", str(tmp_path / "nowhere"), "--no-wandb"]) == 2


# -- the whole path in miniature ---------------------------------------------------------------------

@pytest.mark.slow
def test_every_cell_runs_and_the_report_shows_every_row(paper_data, tmp_path, monkeypatch, capsys):
    """Every cell of every table, one seed, in this process (`paper run` through Ray Tune, on a
    cluster: tests/test_cluster_sweep.py), then
    `paper report` on them: every row of Table 1 and Section 4.2 with the paper's number beside ours."""
    from reckoning_ray.core.config import load_config
    from reckoning_ray.on_ray.trainer import run_in_process

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "paper-all"
    base = load_config("paper", [f"data.path={paper_data['proofwriter']}/depth-2", *MINI,
                                 f"tune.storage_path={tmp_path}", "tune.name=paper-all"])
    save_config(base, sweep / "sweep_config.yaml")
    # one cell of each preset writes its W&B run (checked below); the others skip W&B's ~1 s a run
    tracked = ("table1/reckoning-mt/pw-3", "distractors/ft-icr-mt/pw-5", "table1/no-question/pw-2")
    run_dirs = {}
    for i, cell in enumerate(cells("all", paper_data)):
        mode = "offline" if cell.name in tracked else "disabled"
        cfg = cell_config(cell, [*MINI, "resources.num_workers=0", f"train.output_dir={sweep / 'trials'}",
                                 f"train.run_name=cell-{i:02d}", f"tracking.mode={mode}"])
        run_dirs[cell.name] = sweep / "trials" / f"cell-{i:02d}"
        run_in_process(cfg, run_dirs[cell.name])
    # each preset's run ends with test metrics per hop, in summary.json and in its W&B run
    from wandb_files import read_offline_run_merged

    for name in tracked:
        test = json.loads((run_dirs[name] / "summary.json").read_text())["test"]
        hops = sorted(int(k.rsplit("_", 1)[1]) for k in test if k.startswith("test/label_accuracy/hops_"))
        assert hops and min(hops) >= 1  # the paper's selection keeps proofs of >= 2 sentences: no 0-hop
        assert "test/recall" in test  # multi-task: recall is computed
        wandb_summary = read_offline_run_merged(run_dirs[name], run_dirs[name].name)["summary"]
        assert wandb_summary["test/label_accuracy"] == test["test/label_accuracy"]
    capsys.readouterr()
    assert paper_main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    for table in ("table1", "distractors", "figure5", "recall"):
        assert f"### {table}" in out
    report = (sweep / "paper_report.md").read_text()
    for label, _, _ in ROWS.values():
        assert f"| {label} | pw-2 |" in report and f"| {label} | csg-6 |" in report
    assert "| RECKONING (MT) | mean | 82.5 |" in report and "| FT-ICR (MT) | mean | 70.9 |" in report
    assert "not run" not in report and "running" not in report  # every cell has its one seed
    with open(sweep / "paper_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["ours"] != "" for r in rows if r["column"] not in ("mean", "pw-mean"))
    assert "W&B:" in out and (sweep / "wandb").is_dir()  # the tables went to an offline W&B run


def load(path: Path):
    from reckoning_ray.core.config import load_config

    return load_config(str(path))
