"""Model cards: the ``README.md`` of every checkpoint directory, as the Hugging Face hub shows it.

A card says what the checkpoint is and how well it did, from the files beside it alone:

- its metadata block (``huggingface_hub.ModelCardData``): library, tags, the base model when it is
  a hub id, and the test label accuracy as a ``model-index`` result the hub renders;
- the method and the inner loop (``reckoning.json``), the base model and the data (the run's
  ``config.yaml``), the validation metrics at the checkpoint's step (``metrics.jsonl``) and the
  run's test metrics per hop (``summary.json``, key ``"test"``);
- how to load it and answer with it.

:func:`write_card` writes it when the checkpoint is saved (the test numbers do not exist yet);
:func:`refresh_cards` rewrites the cards of a run's checkpoints once the test split was evaluated
(``reckoning_ray.core.evaluate.save_test``). A checkpoint written without a run (a model soup,
``ReckoningModel.save_pretrained``) gets a card from its own settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from reckoning_ray.core.hub import looks_like_hub_id

CARD = "README.md"
PAPER_URL = "https://arxiv.org/abs/2305.06349"
FAMILY_NAMES = {"proofwriter": "ProofWriter", "clutrr": "CLUTRR"}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def run_of(directory: str | os.PathLike) -> Optional[Path]:
    """The run directory of checkpoint ``directory`` (``<run dir>/checkpoints/step-*``), or None."""
    run_dir = Path(directory).resolve().parent.parent
    return run_dir if (run_dir / "config.yaml").is_file() else None


def _step(directory: Path) -> Optional[int]:
    name = directory.name.removesuffix(".tmp")
    return int(name.rsplit("-", 1)[1]) if name.startswith("step-") and name.rsplit("-", 1)[1].isdigit() else None


def _run_config(run_dir: Optional[Path]) -> dict[str, Any]:
    if run_dir is None:
        return {}
    import yaml

    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _validation_at(run_dir: Optional[Path], step: Optional[int]) -> dict[str, Any]:
    if run_dir is None or step is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") == step:
            return row
    return {}


def _base_model(config: dict[str, Any], hf_config: dict[str, Any]) -> tuple[str, Optional[str]]:
    """(words, hub id or None) of the base model."""
    model = config.get("model", {})
    name = str(model.get("name_or_path", ""))
    layers = hf_config.get("n_layer", hf_config.get("num_hidden_layers", "?"))
    width = hf_config.get("n_embd", hf_config.get("hidden_size", "?"))
    shape = f"{hf_config.get('model_type', 'causal LM')}: {layers} x {width}, layers x width"
    if name == "embedded":
        return f"a randomly initialised GPT-2 ({shape}) with a word-level tokenizer built from the data", None
    if name:
        hub_id = name if looks_like_hub_id(name) and not Path(name).expanduser().exists() else None
        return f"`{name}` ({shape})", hub_id
    return f"a causal LM ({shape})", None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metric_rows(metrics: dict[str, Any], prefix: str) -> list[str]:
    rows = [f"| label accuracy | {_fmt(metrics[prefix + '/label_accuracy'])} |"] if prefix + "/label_accuracy" in metrics else []
    hops = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items()
                  if k.startswith(prefix + "/label_accuracy/hops_"))
    rows += [f"| label accuracy, {h} hops | {_fmt(v)} |" for h, v in hops]
    for key, words in (("recall", "knowledge recall"), ("answer_loss", "answer loss"), ("tasks", "tasks")):
        if f"{prefix}/{key}" in metrics:
            value = metrics[f"{prefix}/{key}"]
            rows.append(f"| {words} | {int(value) if key == 'tasks' else _fmt(value)} |")
    return rows


def model_card(directory: str | os.PathLike, run_dir: Optional[str | os.PathLike] = None) -> "Any":
    """The :class:`huggingface_hub.ModelCard` of checkpoint ``directory`` (its run: ``run_dir``,
    default the directory two levels up when it holds a ``config.yaml``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    directory = Path(directory)
    run = Path(run_dir) if run_dir is not None else run_of(directory)
    settings = _json(directory / "reckoning.json")
    hf_config = _json(directory / "config.json")
    config = _run_config(run)
    summary = _json(run / "summary.json") if run is not None else {}
    record = _json(run / "checkpoints.json") if run is not None else {}
    step = _step(directory)
    name = f"step-{step:06d}" if step is not None else None
    method = settings.get("method", "reckoning")
    inner = settings.get("inner", {})
    outer = settings.get("outer", {})
    family = (settings.get("task") or {}).get("family") or config.get("data", {}).get("family", "proofwriter")
    base_words, base_id = _base_model(config, hf_config)
    run_name = run.name if run is not None else directory.name
    tested = summary.get("test") or {}
    tested_name = record.get("best") if tested.get("checkpoint") == "best" else None
    is_tested = bool(tested) and tested_name is not None and tested_name == name

    eval_results = []
    if is_tested and "test/label_accuracy" in tested:
        dataset = FAMILY_NAMES.get(str(family), str(family))
        hops = config.get("data", {}).get("test_hops") or config.get("data", {}).get("hops")
        eval_results.append(EvalResult(
            task_type="text-generation", task_name="deductive reasoning", dataset_type=str(family),
            dataset_name=f"{dataset} ({config.get('data', {}).get('source', 'data')}, hops {hops})",
            dataset_split="test", metric_type="accuracy", metric_name="label accuracy",
            metric_value=float(tested["test/label_accuracy"])))
    data = ModelCardData(
        library_name="reckoning-ray", pipeline_tag="text-generation", base_model=base_id,
        tags=["reckoning", "bilevel", "meta-learning", "knowledge-encoding", str(method)],
        model_name=run_name, eval_results=eval_results or None,
    )

    lines = [f"# {run_name}" + (f" ({name})" if name else ""), ""]
    is_bilevel = bool(inner)
    if is_bilevel:
        lines += [f"A [RECKONING]({PAPER_URL}) model (Chen et al., NeurIPS 2023): it encodes the knowledge of a "
                  "question into its weights with a few gradient steps (the inner loop, with learned per-tensor "
                  "learning rates), then answers the question with the updated weights.", ""]
    else:
        lines += [f"An in-context reasoning baseline (`{method}`) of [RECKONING]({PAPER_URL}): the knowledge and the "
                  "question are read from one prompt.", ""]
    lines += ["| | |", "|---|---|", f"| method | `{method}` |", f"| base model | {base_words} |"]
    if is_bilevel:
        steps = inner.get("steps") if inner.get("steps") is not None else inner.get("steps_by_hops")
        lines += [
            f"| inner loop | {inner.get('optimizer', '?')}, steps {json.dumps(steps)}, learned rates initialised at "
            f"{inner.get('lr_init', '?')}, {'first' if inner.get('first_order') else 'second'} order |",
        ]
    lines.append(f"| outer loop | AdamW lr {outer.get('lr', '?')}, eps {outer.get('eps', '?')}, multi-task "
                 f"{bool(outer.get('multi_task', settings.get('encoder', {}).get('multi_task')))} |")
    data_cfg = config.get("data", {})
    if data_cfg:
        lines.append(f"| data | {FAMILY_NAMES.get(str(family), family)} from `{data_cfg.get('source', '?')}`, "
                     f"hops {data_cfg.get('hops')}, distractors {data_cfg.get('distractors', 0)} |")
    train = config.get("train", {})
    if train:
        lines.append(f"| training | {train.get('epochs')} epochs, batch {train.get('batch_size')} x accumulation "
                     f"{train.get('grad_accum')}, best checkpoint by `{train.get('metric')}` |")
    if step is not None:
        lines.append(f"| this checkpoint | optimizer step {step}" + (" (the run's best on validation)"
                                                                   if record.get("best") == name else "") + " |")
    validation = _validation_at(run, step)
    if validation:
        lines += ["", f"## Validation at step {step}", "", "| metric | value |", "|---|---|"]
        lines += _metric_rows(validation, "val")
    lines += ["", "## Test"]
    if is_tested:
        lines += ["", "The run's test split, answered by this checkpoint:", "", "| metric | value |", "|---|---|"]
        lines += _metric_rows(tested, "test")
    elif tested and tested_name:
        lines += ["", f"The run's test split was answered by its best checkpoint, `{tested_name}`; see its card."]
    else:
        lines += ["", "Not evaluated on a test split yet (`python -m reckoning_ray.evaluate RUN_DIR` does it and "
                      "updates this card)."]
    lines += ["", "## Use", "", "```python", "from reckoning_ray.predict import ReckoningModel", "",
              f'model = ReckoningModel.from_pretrained("{base_id and "<hub id>" or "<this directory or hub id>"}")',
              'knowledge = model.encode(["Bob is red.", "If someone is red then they are big."])',
              'model.answer(question="Bob is big.", knowledge=knowledge).label', "```", "",
              "or `python -m reckoning_ray.predict <this directory or hub id> --knowledge facts.txt "
              "--question \"Bob is big.\"`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(directory: str | os.PathLike, run_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write :func:`model_card` as ``directory/README.md``; returns its path."""
    path = Path(directory) / CARD
    path.write_text(str(model_card(directory, run_dir)))
    return path


def refresh_cards(run_dir: str | os.PathLike) -> list[Path]:
    """Rewrite the card of every checkpoint of ``run_dir`` (after its test split was evaluated)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return [write_card(d, run_dir) for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.endswith(".tmp") and (d / "reckoning.json").is_file()]
