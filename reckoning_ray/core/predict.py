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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from reckoning_ray.core.checkpoint import load_pretrained, read_settings, resolve
from reckoning_ray.core.schema import FAMILIES


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

        The paper's controls answer as they were trained: an ``icr_no_question`` model sees the
        knowledge alone (not ``question``), a ``reckoning_random_facts`` (or ``icr_random_facts``)
        model as many sentences drawn from its checkpoint's fact pool instead of ``knowledge``.
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
