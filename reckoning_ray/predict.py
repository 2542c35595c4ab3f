"""Answer questions with a trained RECKONING (or in-context) checkpoint.

    python -m reckoning_ray.predict CHECKPOINT --knowledge FILE --question "Bob is red." [--recall]

``CHECKPOINT`` is a checkpoint directory (``<run dir>/checkpoints/step-*``) or a run directory
(its best checkpoint, chosen on validation). The checkpoint alone is enough: the model and
tokenizer (``save_pretrained``), the method's settings (``reckoning.json``) and the learned
inner learning rates (``meta_parameters.safetensors``). The knowledge is first encoded into the
weights by the inner loop, then the question is answered by greedy generation.

In Python::

    from reckoning_ray.predict import ReckoningModel

    model = ReckoningModel.from_pretrained("runs/embedded-sweep-best")
    answer = model.answer(["Bob is red.", "If someone is red then they are big."], "Bob is big.")
    answer.label, answer.facts
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_pretrained, read_settings, resolve

FAMILIES = ("proofwriter", "clutrr")


@dataclass
class Answer:
    label: str  # the answer word, normalised (e.g. "yes", "grandson")
    text: str  # the whole generated continuation
    facts: list[str] = field(default_factory=list)  # the facts it recalled (multi-task models)


class ReckoningModel:
    """A trained method ready to answer: :meth:`from_pretrained`, then :meth:`answer`."""

    def __init__(self, method: Any, family: str = "proofwriter") -> None:
        self.method = method.eval()
        self.family = family

    @classmethod
    def from_pretrained(cls, path: str | Path, device: Optional[str] = None,
                        family: Optional[str] = None) -> "ReckoningModel":
        """Load the checkpoint at ``path`` (a checkpoint or run directory). ``family``: the question
        wording, "proofwriter" ("can we conclude ...?") or "clutrr"; default: the training data's."""
        directory = resolve(path, "best")
        settings = read_settings(directory)
        family = family or settings.get("task", {}).get("family") or "proofwriter"
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is invalid: choose one of {FAMILIES}")
        method = load_pretrained(directory, device=torch.device(device) if device else None)
        return cls(method, family)

    @property
    def inner_steps(self) -> Optional[int]:
        """Most inner steps the model was trained with (None for the in-context baselines)."""
        inner = getattr(self.method, "inner", None)
        return inner.max_steps() if inner is not None else None

    def answer(self, knowledge: Sequence[str], question: str, hops: Optional[int] = None) -> Answer:
        """Encode ``knowledge`` (sentences) into the weights, then answer ``question``.

        ``hops``: the reasoning depth, which sets the inner steps as in training
        (``inner.steps_by_hops``); default: the most steps the model was trained with.
        """
        return self.answer_many([knowledge], [question], hops=hops)[0]

    def answer_many(self, knowledge: Sequence[Sequence[str]], questions: Sequence[str],
                    hops: Optional[int] = None) -> list[Answer]:
        """:meth:`answer` for several (knowledge, question) pairs in one batch."""
        if len(knowledge) != len(questions):
            raise ValueError(f"{len(knowledge)} knowledge lists for {len(questions)} questions")
        records = []
        for i, (sentences, question) in enumerate(zip(knowledge, questions)):
            sentences = [s.strip() for s in sentences if s.strip()]
            if not sentences:
                raise ValueError("knowledge is empty: give at least one sentence")
            if not question.strip():
                raise ValueError("question is empty")
            records.append({
                "id": f"q{i}", "family": self.family, "source": "predict", "knowledge": sentences,
                "facts": [], "distractors": [], "question": question.strip(),
                # no gold answer: the target only shapes the (unused) answer loss
                "answer": "none", "hops": int(hops) if hops is not None else -1,
            })
        device = next(self.method.model.parameters()).device
        batch = self.method.encoder.collate(records).to(device)
        inner_steps = None
        if hops is None and self.inner_steps is not None:
            inner_steps = self.inner_steps
        with torch.no_grad():
            out = self.method.evaluate(batch, inner_steps=inner_steps)
        answers = []
        for text in out["prediction"]:
            label, facts = self.method.encoder.parse_generation(text)
            answers.append(Answer(label=label, text=text, facts=facts))
        return answers


def read_knowledge(path: str) -> list[str]:
    """Sentences of a knowledge file: one per line (blank lines and ``#`` comments skipped);
    ``-`` reads standard input."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.predict",
        description="Answer a question with a trained checkpoint: the knowledge is encoded into the weights "
                    "by the learned inner loop, then the answer is generated.",
        epilog="example:\n  python -m reckoning_ray.predict runs/embedded-20261201-120000 --knowledge facts.txt "
               "--question \"Bob is big.\" --recall\n\nCHECKPOINT: a run directory (its best checkpoint) "
               "or a <run dir>/checkpoints/step-* directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run directory")
    parser.add_argument("--knowledge", required=True, metavar="FILE",
                        help="knowledge sentences, one per line ('-': standard input)")
    parser.add_argument("--question", required=True, help="the question sentence, e.g. \"Bob is big.\"")
    parser.add_argument("--hops", type=int, default=None,
                        help="reasoning depth: sets the inner steps as in training (default: the most steps "
                             "the model was trained with)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="question wording (default: the training data's)")
    parser.add_argument("--recall", action="store_true", help="also print the facts the model recalls")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the answer is the output: no "Loading weights" bar around it
    try:
        knowledge = read_knowledge(args.knowledge)
        model = ReckoningModel.from_pretrained(args.checkpoint, device=args.device, family=args.family)
        answer = model.answer(knowledge, args.question, hops=args.hops)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(answer.label)
    if args.recall:
        for fact in answer.facts:
            print(f"  recalled: {fact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
