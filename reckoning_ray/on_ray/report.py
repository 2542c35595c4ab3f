"""Pictures of a finished sweep, from its files alone (offline; a local path or an object store URI).

    python -m reckoning_ray.tune report SWEEP_DIR

writes ``SWEEP_DIR/report/``:

- ``curves.png``: the validation curve (``tune.metric`` per round; a log axis for a loss) of every
  trial, each ending in a mark that says how it ended (stopped by the scheduler, by patience,
  completed), ASHA's rungs as dotted lines, the best trial drawn thick;
- ``keys.png``: each swept key against the trial's best value of the metric (log axes for keys
  that span more than a factor of 3 and for losses), the best trial starred;
- ``test_by_hops.png``: the best trial's test label accuracy, overall and per hop count;
- ``report.html``: one self-contained page (the pictures inlined) with the sweep's table.

It reads ``sweep_config.yaml`` (metric, mode, scheduler, rungs), ``sweep_summary.json`` (the
trials' status, swept values and test metrics), ``asha_state.json`` (the rungs ASHA used) and
``trials/*/metrics.jsonl`` (the curves). Every sweep runs it at its end
(:mod:`reckoning_ray.on_ray.sweep`); a sweep in an object store gets the report beside its files.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

from reckoning_ray.core.errors import InputError
from reckoning_ray.core.sweep_store import REPORT, open_sweep

PICTURES = ("curves.png", "keys.png", "test_by_hops.png")
ROW_FIELDS = {"trial", "best", "rounds", "status", "label_accuracy", "test"}
# how each way of ending is marked at the end of a curve
ENDS = {"completed": ("o", "completed"), "patience stop": ("s", "patience stop"), "error": ("X", "error")}
STOPPED = ("v", "stopped by the scheduler")


class ReportError(InputError, FileNotFoundError):
    """A directory that is not a finished sweep; the message says what is missing."""


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def sweep_data(root: Path) -> dict[str, Any]:
    """What the pictures need, read from the sweep directory ``root``."""
    summary_path = root / "sweep_summary.json"
    if not summary_path.is_file():
        raise ReportError(f"{root} holds no sweep_summary.json: pass a finished sweep's directory "
                          "(<tune.storage_path>/<tune.name>); a sweep writes it at its end (--resume finishes one)")
    summary = json.loads(summary_path.read_text())
    config = _read_yaml(root / "sweep_config.yaml")
    tune = config.get("tune", {})
    metric = str(tune.get("metric", "val/label_accuracy"))
    curves = {}
    for row in summary.get("trials", []):
        path = root / "trials" / row["trial"] / "metrics.jsonl"
        points = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if metric in record and record.get("round") is not None:
                    points.append((int(record["round"]), float(record[metric])))
        # a trial Tune stopped may have validated once more in its workers: draw what Tune judged
        rounds = int(row.get("rounds") or 0)
        curves[row["trial"]] = sorted(p for p in points if not rounds or p[0] <= rounds)
    return {"summary": summary, "tune": tune, "metric": metric, "mode": str(tune.get("mode", "max")),
            "rungs": rungs(root, tune), "curves": curves,
            "keys": [k for k in (summary.get("trials") or [{}])[0] if k not in ROW_FIELDS]}


def rungs(root: Path, tune: dict[str, Any]) -> list[int]:
    """The rounds at which ASHA compares trials: those in ``asha_state.json``, else the milestones
    its settings give (grace period x reduction factor^k up to tune.max_rounds, as Ray's
    ASHAScheduler makes them); none for the other schedulers."""
    if str(tune.get("scheduler", "asha")) != "asha":
        return []
    state_path = root / "asha_state.json"
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            return sorted({int(m) for bracket in state.get("rungs", []) for m, _ in bracket})
        except (ValueError, TypeError):
            pass
    grace, factor, top = int(tune.get("grace_period", 1)), float(tune.get("reduction_factor", 3)), int(tune.get("max_rounds", 0))
    found, milestone = [], grace
    while factor > 1 and milestone <= top:
        found.append(int(milestone))
        milestone = int(round(milestone * factor))
    return found


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw_curves(data: dict[str, Any], path: Path) -> None:
    plt = _plt()
    summary, metric = data["summary"], data["metric"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for milestone in data["rungs"]:
        ax.axvline(milestone, color="0.6", linestyle=":", linewidth=1, zorder=0)
    seen_ends = {}
    for i, row in enumerate(summary.get("trials", [])):
        points = data["curves"].get(row["trial"], [])
        if not points:
            continue
        best = row["trial"] == summary.get("best_trial")
        color = f"C{i % 10}"
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=color, linewidth=2.8 if best else 1.2, alpha=1.0 if best else 0.8,
                label=f"{row['trial']}{' (best)' if best else ''}")
        marker, words = ENDS.get(row.get("status", ""), STOPPED)
        ax.plot([xs[-1]], [ys[-1]], marker=marker, color=color, markersize=9 if best else 7,
                markeredgecolor="black", linestyle="none")
        seen_ends[words] = marker
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], marker=m, color="0.3", linestyle="none", markeredgecolor="black") for m in seen_ends.values()]
    labels += list(seen_ends)
    if data["rungs"]:
        handles.append(Line2D([], [], color="0.6", linestyle=":"))
        labels.append(f"ASHA rungs (rounds {', '.join(map(str, data['rungs']))})")
    ax.legend(handles, labels, fontsize=7, loc="best", ncol=2)
    values = [v for points in data["curves"].values() for _, v in points]
    if data["mode"] == "min" and values and min(values) > 0:
        ax.set_yscale("log")  # losses: the good trials' differences are where the values are small
    ax.set_xlabel("validation round")
    ax.set_ylabel(metric + (" (lower is better)" if data["mode"] == "min" else " (higher is better)"))
    scheduler = data["tune"].get("scheduler", "asha")
    ax.set_title(f"validation curves of {len(data['curves'])} trials, scheduler {scheduler}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def draw_keys(data: dict[str, Any], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    summary, keys = data["summary"], data["keys"]
    rows = [r for r in summary.get("trials", []) if r.get("best") is not None]
    panels = max(len(keys), 1)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys or ["(no swept key)"]):
        values = [r.get(key) for r in rows]
        ys = [float(r["best"]) for r in rows]
        if _numeric(values) and all(isinstance(v, int) for v in values):  # e.g. inner.steps: its values as ticks
            xs = [float(v) for v in values]
            ax.set_xticks(sorted(set(values)))
        elif _numeric(values):
            xs = [float(v) for v in values]
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and xs and max(xs) / min(xs) > 3:
                ax.set_xscale("log")  # learning rates and the like, sampled on a log scale
                ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        else:  # categories: one column each
            names = sorted({json.dumps(v) for v in values})
            xs = [names.index(json.dumps(v)) for v in values]
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        colors = ["C2" if r.get("status") == "completed" else "C1" for r in rows]
        ax.scatter(xs, ys, c=colors, edgecolors="black", s=40, zorder=2)
        for x, y, r in zip(xs, ys, rows):
            if r["trial"] == summary.get("best_trial"):
                ax.scatter([x], [y], marker="*", s=260, c="gold", edgecolors="black", zorder=3)
        if data["mode"] == "min" and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"best {data['metric']}")
    fig.suptitle("swept keys against the metric (green: completed, orange: stopped early; star: best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_test(data: dict[str, Any], path: Path) -> None:
    plt = _plt()
    summary = data["summary"]
    test = summary.get("best_test") or {}
    hops = sorted((int(k.rsplit("_", 1)[1]), float(v)) for k, v in test.items()
                  if k.startswith("test/label_accuracy/hops_"))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    if "test/label_accuracy" in test:
        names = ["all"] + [f"{h} hops" for h, _ in hops]
        values = [float(test["test/label_accuracy"])] + [v for _, v in hops]
        bars = ax.bar(names, values, color=["C0"] + ["C9"] * len(hops), edgecolor="black")
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("test label accuracy")
        ax.set_title(f"best trial {summary.get('best_trial')}: test label accuracy "
                     f"({int(test.get('test/tasks', 0))} tasks)", fontsize=9)
    else:
        ax.text(0.5, 0.5, "the best trial has no test metrics\n(an interrupted sweep: --resume finishes it)",
                ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_html(data: dict[str, Any], folder: Path, title: str) -> Path:
    summary = data["summary"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}pre{background:#f6f6f6;padding:1em;"
             "overflow-x:auto;font-size:12px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>metric <code>{html.escape(data['metric'])}</code> ({html.escape(data['mode'])}), scheduler "
             f"<code>{html.escape(str(data['tune'].get('scheduler', 'asha')))}</code>; best trial "
             f"<b>{html.escape(str(summary.get('best_trial')))}</b> with {_value(summary.get('best_value'))}.</p>"]
    captions = {"curves.png": "Validation curves; the mark at each curve's end says how the trial ended.",
                "keys.png": "Each swept key against the trial's best value of the metric.",
                "test_by_hops.png": "The best trial's test label accuracy, overall and per hop count."}
    for name in PICTURES:
        encoded = base64.b64encode((folder / name).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(captions[name])}</h2><img alt='{name}' src='data:image/png;base64,{encoded}'>")
    parts.append(f"<h2>Trials</h2><pre>{html.escape(str(summary.get('table', '')))}</pre></body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts))
    return path


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def write_report(root: str | Path, title: Optional[str] = None) -> list[Path]:
    """Draw the pictures of the sweep in the local directory ``root`` into ``root/report/``;
    returns the files written (the PNGs, then the HTML page)."""
    root = Path(root)
    data = sweep_data(root)
    folder = root / REPORT
    folder.mkdir(exist_ok=True)
    draw_curves(data, folder / "curves.png")
    draw_keys(data, folder / "keys.png")
    draw_test(data, folder / "test_by_hops.png")
    page = write_html(data, folder, title or f"sweep {root.name}")
    return [folder / name for name in PICTURES] + [page]


def report(sweep_dir: str, log: Any = print) -> list[Path]:
    """:func:`write_report` of a sweep at a path or an object store URI (fetched into this node's
    cache first); see :func:`publish_report`."""
    root, store = open_sweep(sweep_dir, log=log)
    return publish_report(root, store, title=f"sweep {Path(str(sweep_dir).rstrip('/')).name}", log=log)


def publish_report(root: Path, store: Any = None, title: Optional[str] = None, log: Any = print) -> list[Path]:
    """:func:`write_report` into ``root/report/``, copied to the sweep's object store (``store``,
    a :class:`reckoning_ray.core.sweep_store.SweepStore`) when it has one; logs where the files are."""
    files = write_report(root, title=title)
    if store is not None:
        if store.push_report():
            log(f"report copied to {store.remote}/{REPORT}/")
        else:
            log(f"report: {store.remote} does not answer; the report is copied there when it does")
    log(f"report: {files[-1]} (pictures: {', '.join(f.name for f in files[:-1])} beside it)")
    return files
