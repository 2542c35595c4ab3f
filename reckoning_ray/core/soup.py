"""Model soups of a sweep (Wortsman et al., ICML 2022): average the trials' best checkpoints.

    python -m reckoning_ray.tune soup SWEEP_DIR [--top K]

A sweep ends with one best trial; the others' training is usually thrown away. Checkpoints
trained from the same starting weights can be averaged, and the average often beats the best
single one. Here an ingredient is a trial's best checkpoint (chosen on validation); the average
covers everything a RECKONING checkpoint learns: the initial weights and the learned inner
learning rates (``meta_parameters.safetensors``).

- **ingredients**: the trials whose run shares the best trial's starting point (the same
  ``train.method``, ``model.*``, ``data.*`` and, for the embedded model whose weights are drawn
  from it, ``train.seed``) and whose tensors have the same names and shapes. Every other trial
  is listed with the reason it does not qualify.
- **uniform soup**: the average of all ingredients.
- **greedy soup**: ingredients in decreasing order of their validation ``tune.metric``; each is
  added to the soup only if the soup's validation metric does not get worse.

The soups use the best trial's settings (inner loop, evaluation) and data. Each is written as a
normal checkpoint under ``SWEEP_DIR/soups/{uniform,greedy}/`` (loadable by ``predict``,
``evaluate`` and :func:`reckoning_ray.core.checkpoint.load_pretrained`), evaluated on validation and
test, and recorded in ``SWEEP_DIR/soups/soups.json`` and in ``sweep_summary.json`` (key
``"soups"``) beside the best trial. A sweep in an object store is read from it and the soups are
written back to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from reckoning_ray.core.checkpoint import (
    checkpoint_path,
    load_meta_parameters,
    read_settings,
    save_pretrained,
)
from reckoning_ray.core.config import flatten, load_config
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.evaluate import Evaluator
from reckoning_ray.core.storage import pull_checkpoint
from reckoning_ray.core.sweep_store import open_sweep

SOUPS_DIR = "soups"


# The config groups (and keys) that fix a trial's starting weights and what its weights mean.
SAME_START = ("train.method", "model", "data")


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def start_differences(reference: Any, other: Any) -> list[str]:
    """The keys in which ``other``'s starting point differs from ``reference``'s."""

    keys = list(SAME_START)
    if reference.model.name_or_path == "embedded":
        keys.append("train.seed")  # the embedded model's weights are drawn from it
    out = []
    for key in keys:
        a, b = _select(reference, key), _select(other, key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fa, fb = flatten({key: a}), flatten({key: b})
            out += sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        else:
            out.append(key)
    return out


# -- tensors ---------------------------------------------------------------------------------------

def load_tensors(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's model weights and meta-parameters (the learned inner rates), on the CPU."""
    from transformers import AutoModelForCausalLM


    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            dict(load_meta_parameters(checkpoint)))


def shape_differences(a: tuple[dict, dict], b: tuple[dict, dict]) -> list[str]:
    """Tensor names or shapes in which two ingredients differ."""
    out = []
    for kind, x, y in (("weight", a[0], b[0]), ("meta-parameter", a[1], b[1])):
        for name in sorted(set(x) | set(y)):
            if name not in x or name not in y:
                out.append(f"{kind} {name} in one only")
            elif x[name].shape != y[name].shape:
                out.append(f"{kind} {name}: {tuple(x[name].shape)} vs {tuple(y[name].shape)}")
    return out


def average(ingredients: Iterable[tuple[dict, dict]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The element-wise mean of the ingredients' floating-point tensors (weights and
    meta-parameters), accumulated in float64; integer tensors (buffers) come from the first."""
    sums: list[dict[str, torch.Tensor]] = [{}, {}]
    dtypes: list[dict[str, torch.dtype]] = [{}, {}]
    n = 0
    for ingredient in ingredients:
        n += 1
        for part, tensors in enumerate(ingredient):
            for name, t in tensors.items():
                if name not in sums[part]:
                    dtypes[part][name] = t.dtype
                    sums[part][name] = t.to(torch.float64).clone() if t.is_floating_point() else t.clone()
                elif t.is_floating_point():
                    sums[part][name] += t.to(torch.float64)
    if n == 0:
        raise ValueError("a soup needs at least one ingredient")
    return tuple({name: (t / n).to(dtypes[part][name]) if t.is_floating_point() else t  # type: ignore[return-value]
                  for name, t in sums[part].items()} for part in range(2))


# -- the soups of a sweep --------------------------------------------------------------------------

class SoupKitchen:
    """The best trial's method, data and encoder (an :class:`~reckoning_ray.core.evaluate.Evaluator`),
    into which soups are loaded to be evaluated and saved."""

    def __init__(self, cfg: Any, best_checkpoint: Path) -> None:

        self.evaluator = Evaluator(cfg, best_checkpoint)
        self.task = read_settings(best_checkpoint).get("task") or {}

    def evaluate(self, soup: tuple[dict, dict], split: str) -> dict[str, float]:
        self.evaluator.load(*soup)
        return self.evaluator.evaluate(split)

    def save(self, soup: tuple[dict, dict], directory: Path) -> Path:

        self.evaluator.load(*soup)
        return save_pretrained(self.evaluator.method, directory, task=self.task)


def _better_or_equal(value: float, reference: float, mode: str) -> bool:
    return value >= reference if mode == "max" else value <= reference


def greedy(ranked: list[tuple[str, tuple[dict, dict]]], score: Any, mode: str,
           log: Any = print) -> tuple[list[str], tuple[dict, dict], float]:
    """Greedy soup over ``ranked`` ingredients (best first): start from the first, add each next
    one when ``score(soup)`` (a validation metric, ``mode`` max or min) does not get worse.
    Returns the kept names, the soup and its score."""
    kept = [ranked[0]]
    soup = ranked[0][1]
    best = score(soup)
    log(f"greedy: {ranked[0][0]} alone: {best:.4f}")
    for name, ingredient in ranked[1:]:
        candidate = average(x for _, x in kept + [(name, ingredient)])
        value = score(candidate)
        keep = _better_or_equal(value, best, mode)
        log(f"greedy: + {name}: {value:.4f} -> {'kept' if keep else 'left out'}")
        if keep:
            kept.append((name, ingredient))
            soup, best = candidate, value
    return [name for name, _ in kept], soup, best


def make_soups(sweep_dir: str | Path, top: Optional[int] = None, log: Any = print) -> dict[str, Any]:
    """The uniform and greedy soups of the sweep in ``sweep_dir`` (a path or an object store URI);
    returns what is recorded in ``soups.json``."""

    sweep_dir, store = open_sweep(sweep_dir, log)
    summary_file = sweep_dir / "sweep_summary.json"
    summary, rows, metric, mode = _ranked_trials(sweep_dir, summary_file, top)

    def best_of(trial: str) -> Optional[Path]:
        run_dir = sweep_dir / "trials" / trial
        if store is not None:
            return pull_checkpoint(run_dir, store.trial(trial).remote)
        return checkpoint_path(run_dir, "best")

    first = rows[0]["trial"]
    reference_cfg = load_config(str(sweep_dir / "trials" / first / "config.yaml"))
    ranked, excluded = _ingredients(sweep_dir, rows, first, reference_cfg, best_of)
    for trial, why in excluded.items():
        log(f"not an ingredient: trial {trial}: {why}")
    log(f"{len(ranked)} ingredient(s), best first by validation {metric}: {', '.join(t for t, _ in ranked)}")

    kitchen = SoupKitchen(reference_cfg, best_of(first))
    out_dir = sweep_dir / SOUPS_DIR
    record: dict[str, Any] = {"metric": metric, "mode": mode, "excluded": excluded,
                              "soups": _cook(kitchen, ranked, first, metric, mode, out_dir, log)}
    _write_record(record, out_dir, summary, summary_file)
    if store is not None:
        store.sweep.push(include=(SOUPS_DIR, "sweep_summary.json"))
    log(table(record))
    return record


def _ranked_trials(sweep_dir: Path, summary_file: Path, top: Optional[int]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], str, str]:
    """The finished sweep's summary, its trials that reported the metric (best first, the ``top``
    ones), the metric and its mode."""
    if not summary_file.is_file():
        raise ConfigError(f"{sweep_dir} holds no finished sweep (no sweep_summary.json): pass "
                          "<tune.storage_path>/<tune.name> of a sweep that has ended (or finish it with --resume)")
    summary = json.loads(summary_file.read_text())
    sweep_cfg = load_config(str(sweep_dir / "sweep_config.yaml"))
    metric, mode = sweep_cfg.tune.metric, sweep_cfg.tune.mode
    rows = [r for r in summary["trials"] if r.get("best") is not None]
    rows.sort(key=lambda r: r["best"], reverse=(mode == "max"))
    if top:
        rows = rows[:top]
    if not rows:
        raise ConfigError(f"{sweep_dir}: no trial reported {metric}")
    return summary, rows, metric, mode


def _ingredients(sweep_dir: Path, rows: list[dict[str, Any]], first: str, reference_cfg: Any,
                 best_of: Callable[[str], Optional[Path]]
                 ) -> tuple[list[tuple[str, tuple[dict, dict]]], dict[str, str]]:
    """The ranked trials' best checkpoints that qualify as ingredients (the best trial ``first``'s
    starting point, its tensors' names and shapes), as ``(trial, tensors)`` best first; and the
    others with the reason they do not qualify."""
    ranked: list[tuple[str, tuple[dict, dict]]] = []
    excluded: dict[str, str] = {}
    for row in rows:
        trial = row["trial"]
        run_dir = sweep_dir / "trials" / trial
        path = best_of(trial) if (run_dir / "config.yaml").is_file() else None
        if path is None or not path.is_dir():
            excluded[trial] = "no best checkpoint"
            continue
        differs = start_differences(reference_cfg, load_config(str(run_dir / "config.yaml")))
        if differs:
            excluded[trial] = f"another starting point than {first}: {', '.join(differs)}"
            continue
        tensors = load_tensors(path)
        if ranked and (shapes := shape_differences(ranked[0][1], tensors)):
            excluded[trial] = "other tensors: " + "; ".join(shapes[:3])
            continue
        ranked.append((trial, tensors))
    return ranked, excluded


def _cook(kitchen: SoupKitchen, ranked: list[tuple[str, tuple[dict, dict]]], first: str, metric: str,
          mode: str, out_dir: Path, log: Any) -> dict[str, Any]:
    """The best trial alone, the uniform soup and the greedy soup (chosen on validation), each
    evaluated on validation and test; the two soups are saved as checkpoints under ``out_dir``."""

    def score(soup: tuple[dict, dict]) -> float:
        return float(kitchen.evaluate(soup, "validation")[metric])

    uniform = average(x for _, x in ranked)
    kept, greedy_soup, _ = greedy(ranked, score, mode, log)
    soups: dict[str, Any] = {}
    entries = [("best trial", [first], ranked[0][1]), ("uniform", [t for t, _ in ranked], uniform),
               ("greedy", kept, greedy_soup)]
    for name, ingredients, soup in entries:
        val = kitchen.evaluate(soup, "validation")
        test = kitchen.evaluate(soup, "test")
        entry = {"ingredients": ingredients, "validation": val, "test": test}
        if name != "best trial":
            entry["checkpoint"] = str(kitchen.save(soup, out_dir / name))
        soups[name] = entry
    return soups


def _write_record(record: dict[str, Any], out_dir: Path, summary: dict[str, Any], summary_file: Path) -> None:
    """``soups.json`` in ``out_dir``, and the soups' line in the sweep's summary."""
    metric = record["metric"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soups.json").write_text(json.dumps(record, indent=2))
    summary["soups"] = {k: {"ingredients": v["ingredients"], "val": v["validation"].get(metric),
                            "test/label_accuracy": v["test"].get("test/label_accuracy"),
                            "checkpoint": v.get("checkpoint")} for k, v in record["soups"].items()}
    summary_file.write_text(json.dumps(summary, indent=2, default=str))


def table(record: dict[str, Any]) -> str:
    metric = record["metric"]
    lines = [["", f"val {metric}", "val acc", "test acc", "test answer_loss", "ingredients"]]
    for name, entry in record["soups"].items():
        val, test = entry["validation"], entry["test"]
        lines.append([name, f"{val[metric]:.4f}", f"{val['val/label_accuracy']:.3f}",
                      f"{test['test/label_accuracy']:.3f}", f"{test['test/answer_loss']:.4f}",
                      str(len(entry["ingredients"]))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
