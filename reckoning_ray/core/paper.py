"""The paper's tables as cells: each cell is a preset plus overrides, run once per seed, and the
report that puts our mean beside the paper's number.

Tables (``python -m reckoning_ray.paper run TABLE``):

- ``table1``: Table 1, label accuracy without distractors. Rows: No-Facts, No-Question,
  Random-Facts, FT-ICR, FT-ICR (MT), RECKONING, RECKONING (MT); columns: ProofWriter 2, 3, 5 hops
  (the OWA ``depth-D`` files) and CLUTRR-SG 2, 4, 6 hops (one model per level, as the authors run it).
- ``distractors``: Section 4.2, both multi-task methods with all distractors (``data.distractors=-1``)
  on ProofWriter 2, 3, 5 hops.
- ``figure5``: Figure 5, both multi-task methods over the number of distractors on ProofWriter 3 hops.
- ``recall``: Section 4.5, a view of the runs above: test recall of the relevant facts of both
  multi-task methods without and with all distractors (nothing of its own to run).

A cell's runs are the trials whose W&B group (``tracking.group``, set by the cell) is
``<table>/<row>/<column>``; the report reads each trial's ``config.yaml`` and ``summary.json``
(the test metrics of its best checkpoint). The paper's numbers are in ``paper_numbers.csv`` beside
this file, each with its source; a cell the paper's text gives no number for shows "-".
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from reckoning_ray.core.config import load_config
from reckoning_ray.core.errors import ConfigError

NUMBERS = Path(__file__).resolve().parent / "paper_numbers.csv"
TABLES = ("table1", "distractors", "figure5")
REPORTS = ("table1", "distractors", "figure5", "recall")

# row -> (label in the paper, preset, overrides)
ROWS = {
    "no-facts": ("No-Facts", "paper-icr", ["train.method=icr_no_facts"]),
    "no-question": ("No-Question", "paper-icr", ["train.method=icr_no_question"]),
    "random-facts": ("Random-Facts", "paper", ["train.method=reckoning_random_facts"]),
    "ft-icr": ("FT-ICR", "paper-icr", ["outer.multi_task=false"]),
    "ft-icr-mt": ("FT-ICR (MT)", "paper-icr", ["outer.multi_task=true"]),
    "reckoning": ("RECKONING", "paper", ["outer.multi_task=false"]),
    "reckoning-mt": ("RECKONING (MT)", "paper", ["outer.multi_task=true"]),
}
PROOFWRITER_DEPTHS = {2: 4, 3: 4, 5: 5}  # depth -> inner steps (4 for 2-4 hops, 5 for 5-6)
CLUTRR_SG_LEVELS = (2, 4, 6)
FIGURE5_DISTRACTORS = (0, 2, 4, 6, -1)  # -1: all of the theory's other sentences
DATA_FLAGS = {"proofwriter": "--proofwriter DIR (python -m reckoning_ray.data fetch proofwriter --to DIR)",
              "clutrr-sg": "--clutrr-sg DIR (python -m reckoning_ray.data fetch clutrr-sg --archive FILE --to DIR)"}


@dataclass(frozen=True)
class Cell:
    """One cell of a table: a preset and the overrides that make it, run once per seed."""

    table: str
    row: str
    column: str
    preset: str
    overrides: tuple[str, ...]
    dataset: str  # "proofwriter" or "clutrr-sg": the data directory it needs

    @property
    def name(self) -> str:
        return f"{self.table}/{self.row}/{self.column}"


def proofwriter_overrides(root: str, depth: int) -> list[str]:
    return ["data.source=proofwriter", "data.family=proofwriter", "data.selection=paper",
            f"data.path={Path(root) / f'depth-{depth}'}", f"inner.steps={PROOFWRITER_DEPTHS[depth]}"]


def clutrr_sg_overrides(root: str, level: int) -> list[str]:
    return ["data.source=clutrr", "data.family=clutrr", f"data.path={root}", f"data.hops=[{level}]",
            "inner.steps=null"]


def _columns(table: str) -> list[tuple[str, str, list[str] | None]]:
    """(column, dataset, overrides with the data root as "{root}") of a table."""
    columns: list[tuple[str, str, Any]] = []
    if table in ("table1", "distractors"):
        distractors = 0 if table == "table1" else -1
        columns += [(f"pw-{d}", "proofwriter", (d, distractors)) for d in PROOFWRITER_DEPTHS]
    if table == "table1":
        columns += [(f"csg-{k}", "clutrr-sg", k) for k in CLUTRR_SG_LEVELS]
    if table == "figure5":
        columns += [(f"d{'all' if n < 0 else n}", "proofwriter", (3, n)) for n in FIGURE5_DISTRACTORS]
    return columns


def table_rows(table: str) -> list[str]:
    return list(ROWS) if table == "table1" else ["ft-icr-mt", "reckoning-mt"]


def cells(table: str, data: dict[str, str], rows: Optional[list[str]] = None,
          columns: Optional[list[str]] = None) -> list[Cell]:
    """The cells of ``table`` (one of :data:`TABLES` or ``all``) on the data directories ``data``
    ({"proofwriter": DIR, "clutrr-sg": DIR}), only ``rows`` and ``columns`` when given. A name the
    table does not have is an error listing the table's; so is a chosen cell whose data set has no
    directory, naming the flag that gives it."""
    if table == "all":
        return _select_all(data, rows, columns)
    if table not in TABLES:
        raise ConfigError(f"table {table!r} is not one of {', '.join(TABLES)} (or all); the recall table of "
                          f"Section 4.5 reads the runs of table1 and distractors")
    _check_names("row", rows, table_rows(table))
    _check_names("column", columns, [c for c, _, _ in _columns(table)])
    out = []
    for column, dataset, spec in _columns(table):
        if columns and column not in columns:
            continue
        root = data.get(dataset)
        if not root:
            raise ConfigError(f"table {table} needs the {dataset} data: pass {DATA_FLAGS[dataset]}")
        if dataset == "proofwriter":
            depth, distractors = spec
            data_overrides = proofwriter_overrides(root, depth) + [f"data.distractors={distractors}"]
        else:
            data_overrides = clutrr_sg_overrides(root, spec)
        for row in table_rows(table):
            if rows and row not in rows:
                continue
            _, preset, method = ROWS[row]
            group = f"tracking.group={table}/{row}/{column}"
            out.append(Cell(table, row, column, preset, tuple(method + data_overrides + [group]), dataset))
    return out


def _select_all(data: dict[str, str], rows: Optional[list[str]], columns: Optional[list[str]]) -> list[Cell]:
    """``all`` with a selection: each table's cells among the named rows and columns it has."""
    _check_names("row", rows, list(ROWS))
    _check_names("column", columns, [c for t in TABLES for c, _, _ in _columns(t)])
    out = []
    for t in TABLES:
        have_rows = [r for r in (rows or table_rows(t)) if r in table_rows(t)]
        have_columns = [c for c, _, _ in _columns(t) if not columns or c in columns]
        if have_rows and have_columns:
            out += cells(t, data, have_rows, have_columns)
    return out


def _check_names(kind: str, given: Optional[list[str]], have: list[str]) -> None:
    unknown = [g for g in given or [] if g not in have]
    if unknown:
        raise ConfigError(f"no {kind} {', '.join(unknown)} in this table; choose from {', '.join(have)}")


def cell_config(cell: Cell, overrides: list[str]) -> DictConfig:
    """The config of ``cell``: its preset, then the user's ``overrides`` (model, steps, storage, ...),
    then the cell's own keys, which define the experiment and so come last."""
    return load_config(cell.preset, [*overrides, *cell.overrides])


# -- the report ---------------------------------------------------------------------------------------

def paper_numbers(path: Path = NUMBERS) -> dict[tuple[str, str, str], tuple[float, str]]:
    with open(path, newline="") as f:
        return {(r["table"], r["row"], r["column"]): (float(r["value"]), r["source"]) for r in csv.DictReader(f)}


def trial_results(sweep_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{cell name: [one dict per trial: status, seed, test metrics or None]} from a paper run's
    directory (``<tune.storage_path>/<tune.name>``)."""
    trials = Path(sweep_dir) / "trials"
    if not trials.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a paper run directory (no trials/); pass "
                                f"<tune.storage_path>/<tune.name> of `python -m reckoning_ray.paper run`")
    # Tune's status of each trial, written when the sweep ended (absent while it runs)
    sweep_file = Path(sweep_dir) / "sweep_summary.json"
    tune_status = {t["trial"]: t.get("status") for t in json.loads(sweep_file.read_text()).get("trials", [])} \
        if sweep_file.is_file() else {}
    out: dict[str, list[dict[str, Any]]] = {}
    for run_dir in sorted(p for p in trials.iterdir() if (p / "config.yaml").is_file()):
        cfg = load_config(str(run_dir / "config.yaml"))
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        test = summary.get("test")
        status = "done" if test else ("failed" if tune_status.get(run_dir.name) in ("error", "no result")
                                      else "running")
        out.setdefault(str(cfg.tracking.group), []).append(
            {"trial": run_dir.name, "seed": int(cfg.train.seed), "status": status, "test": test})
    return out


def _stats(values: list[float]) -> tuple[Optional[float], Optional[float], int]:
    if not values:
        return None, None, 0
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _cell_summary(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "done" and metric in r["test"]]
    mean, std, n = _stats([100 * r["test"][metric] for r in done])
    hops: dict[str, list[float]] = {}
    for r in done:
        for key, value in r["test"].items():
            if key.startswith(metric + "/hops_"):
                hops.setdefault(key.rsplit("_", 1)[1], []).append(100 * value)
    pending = [r["status"] for r in runs if r["status"] != "done"]
    return {"mean": mean, "std": std, "n": n, "hops": {k: statistics.fmean(v) for k, v in sorted(hops.items())},
            "pending": pending}


def report_rows(table: str, results: dict[str, list[dict[str, Any]]],
                numbers: dict[tuple[str, str, str], tuple[float, str]]) -> list[dict[str, Any]]:
    """One row per cell of ``table``: the paper's number, our mean / std / n over seeds, the
    difference and the per-hop means; cells never run or still running are marked, never 0."""
    if table == "recall":
        return _recall_rows(results, numbers)
    metric = "test/label_accuracy"
    rows = []
    for column, _, _ in _columns(table):
        for row in table_rows(table):
            rows.append(_row(table, row, column, results.get(f"{table}/{row}/{column}", []), metric, numbers))
    for row in table_rows(table):  # the means the paper's text gives
        for mean_column in ("mean", "pw-mean"):  # over the ProofWriter depths
            if (table, row, mean_column) in numbers:
                cells_ = [r for r in rows if r["row"] == row and r["column"].startswith("pw-")]
                rows.append(_mean_row(table, row, mean_column, cells_, numbers))
    return rows


def _row(table: str, row: str, column: str, runs: list[dict[str, Any]], metric: str,
         numbers: dict[tuple[str, str, str], tuple[float, str]]) -> dict[str, Any]:
    s = _cell_summary(runs, metric)
    paper = numbers.get((table, row, column), (None, ""))[0]
    state = "not run" if not runs else ("running" if "running" in s["pending"] and not s["n"] else
                                        "failed" if not s["n"] else "")
    return {"table": table, "row": row, "label": ROWS[row][0], "column": column, "paper": paper,
            "ours": s["mean"], "std": s["std"], "n": s["n"], "state": state, "hops": s["hops"],
            "diff": None if paper is None or s["mean"] is None else s["mean"] - paper,
            "runs": len(runs)}


def _mean_row(table: str, row: str, column: str, cells_: list[dict[str, Any]],
              numbers: dict[tuple[str, str, str], tuple[float, str]]) -> dict[str, Any]:
    paper = numbers[(table, row, column)][0]
    means = [c["ours"] for c in cells_]
    ours = statistics.fmean(means) if means and all(m is not None for m in means) else None
    return {"table": table, "row": row, "label": ROWS[row][0], "column": column, "paper": paper,
            "ours": ours, "std": None, "n": min((c["n"] for c in cells_), default=0),
            "state": "" if ours is not None else "incomplete", "hops": {},
            "diff": None if ours is None else ours - paper, "runs": sum(c["runs"] for c in cells_)}


def _recall_rows(results: dict[str, list[dict[str, Any]]],
                 numbers: dict[tuple[str, str, str], tuple[float, str]]) -> list[dict[str, Any]]:
    rows = []
    for row in ("reckoning-mt", "ft-icr-mt"):
        for column, table in (("no-distractors", "table1"), ("all-distractors", "distractors")):
            runs = [r for d in PROOFWRITER_DEPTHS for r in results.get(f"{table}/{row}/pw-{d}", [])]
            out = _row("recall", row, column, runs, "test/recall", numbers)
            rows.append(out)
    return rows


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def layout(rows: list[dict[str, Any]]) -> list[str]:
    """The table as the paper lays it out: a line per method, a column per data set, each cell
    "ours (paper)"; the cell's state instead of ours while it has no result."""
    columns = list(dict.fromkeys(r["column"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["column"]): r for r in rows}
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label in labels:
        shown = []
        for column in columns:
            r = cell.get((label, column))
            if r is None:
                shown.append("")
                continue
            ours = r["state"] or _fmt(r["ours"])
            shown.append(f"{ours} ({_fmt(r['paper'])})")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return lines


def markdown(table: str, rows: list[dict[str, Any]]) -> str:
    hop_keys = sorted({h for r in rows for h in r["hops"]}, key=int)
    head = ["row", "column", "paper", "ours (mean ± std)", "n", "ours - paper", *[f"hop {h}" for h in hop_keys]]
    lines = [f"### {table}", "", "Ours (the paper's) in the paper's layout:", "", *layout(rows), "",
             "Per cell, with the spread over seeds and per-hop means:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ours = r["state"] or (f"{_fmt(r['ours'])} ± {_fmt(r['std'])}" if r["std"] is not None else _fmt(r["ours"]))
        cells_ = [r["label"], r["column"], _fmt(r["paper"]), ours, str(r["n"]), _fmt(r["diff"]),
                  *[_fmt(r["hops"].get(h)) for h in hop_keys]]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["table", "row", "label", "column", "paper", "ours", "std", "n", "diff", "state", "runs", "hops"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r[k] for k in fields if k != "hops"}, "hops": json.dumps(r["hops"])})
