"""``python -m reckoning_ray.data``: stats tables, generate --out read back by load_splits, and
clear exit-2 errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import CLUTRR_TEST, PROOFWRITER_DEV
from reckoning_ray.core.schema import DataConfig
from reckoning_ray.data import data_config_from_spec, main
from reckoning_ray.core.data.generate import generate_splits
from reckoning_ray.core.data.sources import load_splits

REPO = Path(__file__).resolve().parents[1]
PROOFWRITER = PROOFWRITER_DEV
CLUTRR = CLUTRR_TEST


def row(text: str, first: str) -> list[str]:
    """The cells of the table line that starts with ``first`` (after the given heading)."""
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no line starting with {first!r} in\n{text}")


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n\n", 1)[0]


def test_stats_of_the_real_proofwriter_file(capsys):
    assert main(["stats", str(PROOFWRITER)]) == 0
    out = capsys.readouterr().out
    assert row(section(out, "split  "), "total") == ["total", "4,004"]
    cross = section(out, "tasks by hop count and label (all splits)")
    assert cross.splitlines()[1].split() == ["hops", "no", "none", "yes", "total"]
    assert row(cross, "0") == ["0", "240", "1,005", "240", "1,485"]
    assert row(cross, "3") == ["3", "240", "44", "240", "524"]
    assert row(cross, "all") == ["all", "1,001", "2,002", "1,001", "4,004"]
    # by split: 240 theories split 192 / 24 / 24 by theory
    splits = section(out, "split  ")
    assert sum(int(row(splits, s)[1].replace(",", "")) for s in ("train", "validation", "test")) == 4004


def test_stats_of_the_real_clutrr_file_with_a_hop_filter(capsys):
    assert main(["stats", f"clutrr:{CLUTRR}", "hops=2,3,4"]) == 0
    out = capsys.readouterr().out
    hops = section(out, "tasks by hop count")
    assert row(hops, "2")[-1] == "38" and row(hops, "3")[-1] == "105" and row(hops, "4")[-1] == "190"
    assert row(section(out, "split  "), "total") == ["total", "333"]
    assert "nephew" in section(out, "tasks by label")


def test_stats_of_a_generator_spec(capsys):
    assert main(["stats", "generate:clutrr", "hops=2,3", "n=500", "val=20", "test=20", "distractors=2", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert "generate:clutrr (seed 1, hops [2, 3], distractors 2)" in out
    assert row(section(out, "split  "), "train") == ["train", "500"]
    hops = section(out, "tasks by hop count")
    assert row(hops, "2") == ["2", "250", "10", "10", "270"]
    assert row(hops, "3") == ["3", "250", "10", "10", "270"]
    sizes = section(out, "sentences per task")
    assert row(sizes, "distractors")[1:] == ["2", "2.00", "2"]


def test_spec_options_fill_the_data_config():
    cfg = data_config_from_spec("generate:proofwriter", ["hops=0,1", "n=64", "labels=yes,no,none", "entities=4",
                                                         "holdout=false", "distractors=1", "seed=3"])
    assert (cfg.source, cfg.family, cfg.hops, cfg.num_train, cfg.distractors, cfg.seed) == \
        ("generate", "proofwriter", [0, 1], 64, 1, 3)
    assert cfg.generator.labels == ["yes", "no", "none"] and cfg.generator.num_entities == 4
    assert cfg.generator.holdout_pairs is False
    files = data_config_from_spec(str(PROOFWRITER), [])
    assert (files.source, files.hops, files.distractors, files.num_train) == ("proofwriter", [], -1, 0)


def test_generate_writes_a_datasetdict_that_load_splits_reads_back(tmp_path, capsys):
    out = tmp_path / "clutrr"
    argv = ["generate", "generate:clutrr", "hops=2,3", "n=40", "val=8", "test=8", "distractors=1", "seed=4",
            "--out", str(out)]
    assert main(argv) == 0
    assert "wrote train 40, validation 8, test 8 tasks" in capsys.readouterr().out
    expected = generate_splits(DataConfig(family="clutrr", hops=[2, 3], num_train=40, num_validation=8, num_test=8,
                                          distractors=1, seed=4))
    back = load_splits(DataConfig(source="hf", path=str(out), hops=[], distractors=-1, num_train=0,
                                  num_validation=0, num_test=0))
    assert {s: back[s].to_list() for s in back} == expected
    # an existing dataset is not overwritten by accident
    assert main(argv) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_bad_inputs_exit_2_with_one_clear_line(tmp_path, capsys):
    lines = PROOFWRITER.read_text(encoding="utf-8").splitlines()[:2]
    bad = tmp_path / "broken.jsonl"
    bad.write_text(lines[0] + "\n" + lines[1][:50] + "\n", encoding="utf-8")
    assert main(["stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}, line 2: expected a JSON object (one ProofWriter theory per line)")
    assert len(err.strip().splitlines()) == 1
    assert main(["stats", "generate:proofwriter", "hops=zero"]) == 2
    assert "option 'hops=zero': cannot use 'zero' for hops" in capsys.readouterr().err
    assert main(["stats", "generate:proofwriter", "colour=red"]) == 2
    assert "option 'colour=red' is not KEY=VALUE" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err


def test_module_entry_point_help_and_exit_code(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(CLUTRR.read_text(encoding="utf-8").splitlines()[0] + "\n0,x,story,(,1,a,b,c,d,task_1.2,e,[],f,g,h\n",
                   encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "reckoning_ray.data", "stats", str(bad)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {re.escape(str(bad))}, line 2, column 4 \(query\): expected a Python tuple .*\n",
                        result.stderr)
    help_text = subprocess.run([sys.executable, "-m", "reckoning_ray.data", "stats", "--help"], capture_output=True,
                               text=True, cwd=REPO, timeout=120)
    assert help_text.returncode == 0
    for phrase in ("generate:clutrr", "hops=0,1,2", "proofwriter:PATH", "tasks by split, by hop count and by label"):
        assert phrase in " ".join(help_text.stdout.split())


def test_stats_with_selection_paper_prints_the_tables_before_and_after(capsys):
    from collections import Counter

    from reckoning_ray.core.data.proofwriter import read_proofwriter_file

    assert main(["stats", str(PROOFWRITER), "selection=paper"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"BEFORE selection: all questions of {PROOFWRITER} (selection=qdep, no filtering)")
    before, after = out.split("AFTER selection=paper: ", 1)
    assert after.startswith(f"tasks in {PROOFWRITER} (proofwriter, selection=paper)")
    assert row(section(before, "split  "), "total") == ["total", "4,004"]
    cross = section(before, "tasks by hop count and label (all splits)")
    assert row(cross, "0") == ["0", "240", "1,005", "240", "1,485"]
    assert row(cross, "all") == ["all", "1,001", "2,002", "1,001", "4,004"]

    assert row(section(after, "split  "), "total") == ["total", "891"]
    labels = section(after, "tasks by label")
    assert [row(labels, label)[-1] for label in ("yes", "no", "none")] == ["297", "297", "297"]
    cross = section(after, "tasks by hop count and label (all splits)")
    assert cross.splitlines()[1].split() == ["hops", "no", "none", "yes", "total"]
    counts = Counter((r["hops"], r["answer"]) for r in read_proofwriter_file(PROOFWRITER, "paper", 0))
    for hops in range(1, 6):
        cells = [counts[(hops, a)] for a in ("no", "none", "yes")]
        assert row(cross, str(hops)) == [str(hops), *map(str, cells), str(sum(cells))]
    assert [row(cross, str(h))[2] for h in (1, 2, 3, 4, 5)] == ["0", "247", "44", "5", "1"]
    assert "\n0 " not in cross  # no 0-hop task has a proof of two sentences
    assert row(section(after, "sentences per task"), "relevant")[2] == "2"  # min facts per task

    # the two splits tables use the same theories per split (the selection only drops tasks)
    for split in ("train", "validation", "test"):
        assert int(row(section(after, "split  "), split)[1]) <= int(row(section(before, "split  "), split)[1].replace(",", ""))


def test_spec_options_select_and_filter_hops_per_split(capsys):
    cfg = data_config_from_spec(str(PROOFWRITER), ["selection=paper", "train_hops=2,3", "test_hops=all"])
    assert (cfg.selection, cfg.train_hops, cfg.validation_hops, cfg.test_hops) == ("paper", [2, 3], None, [])
    assert main(["stats", str(PROOFWRITER), "selection=best"]) == 2
    assert "option 'selection=best': cannot use 'best' for selection (choose one of ('qdep', 'paper'))" in \
        capsys.readouterr().err
    assert main(["stats", str(CLUTRR), "train_hops=2,3", "validation_hops=2,3", "test_hops=2,3,4,5,6,7,8,9,10"]) == 0
    out = capsys.readouterr().out
    assert "BEFORE" not in out  # no selection step to compare
    hops = section(out, "tasks by hop count")
    assert row(hops, "4")[1:3] == ["0", "0"] and row(hops, "10")[1:3] == ["0", "0"]
    assert int(row(hops, "10")[3]) > 0 and int(row(hops, "2")[1]) > 0


def test_stats_of_a_proofwriter_file_prints_the_counts_under_each_balance_and_proofs_choice(capsys):
    from reckoning_ray.core.data.proofwriter import read_proofwriter_file

    assert main(["stats", str(PROOFWRITER), "selection=paper", "balance=false", "proofs=merged"]) == 0
    out = capsys.readouterr().out
    assert f"AFTER selection=paper: tasks in {PROOFWRITER} (proofwriter, selection=paper, balance=false, " \
           f"proofs=merged)" in out
    table = section(out, "ProofWriter options: ")
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in table.splitlines()[3:]}
    assert list(rows) == [("qdep", "-", "shortest"), ("qdep", "-", "merged"), ("paper", "true", "shortest"),
                          ("paper", "true", "merged"), ("paper", "false", "shortest"), ("paper", "false", "merged")]
    assert rows[("qdep", "-", "shortest")][:4] == ["4,004", "1,001", "1,001", "2,002"]
    assert rows[("paper", "true", "shortest")][:4] == ["891", "297", "297", "297"]
    for balance in ("true", "false"):
        for proofs in ("shortest", "merged"):
            records = read_proofwriter_file(PROOFWRITER, "paper", 0, balance == "true", proofs)
            facts = [len(r["facts"]) for r in records]
            assert rows[("paper", balance, proofs)][:6] == [
                f"{len(records):,}", *(f"{sum(r['answer'] == a for r in records):,}" for a in ("yes", "no", "none")),
                f"{sum(facts) / len(facts):.2f}", str(max(facts))]
    unbalanced, balanced = (int(rows[("paper", b, "shortest")][0].replace(",", "")) for b in ("false", "true"))
    assert unbalanced > balanced
    for selection, balance in (("qdep", "-"), ("paper", "true"), ("paper", "false")):
        assert float(rows[(selection, balance, "merged")][4]) >= float(rows[(selection, balance, "shortest")][4])
    assert [cells[-1] == "*" for cells in rows.values()] == [False] * 5 + [True]  # this run's choice
    assert main(["stats", str(PROOFWRITER), "proofs=all"]) == 2
    assert "option 'proofs=all': cannot use 'all' for proofs (choose one of ('shortest', 'merged'))" in \
        capsys.readouterr().err
