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

Knowledge encoded once answers many questions (the paper's section 4.4): one inner loop, then one
generation per question with the same fast weights::

    encoded = model.encode(["Bob is red.", "If someone is red then they are big."])
    model.answer(question="Bob is big.", knowledge=encoded)
    model.answer_many(encoded, ["Bob is big.", "Bob is red."])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from reckoning_ray.core.checkpoint import load_pretrained, read_settings, resolve
from reckoning_ray.core.schema import FAMILIES


@dataclass
class Answer:
    label: str  # the answer word, normalised (e.g. "yes", "grandson")
    text: str  # the whole generated continuation
    facts: list[str] = field(default_factory=list)  # the facts it recalled (multi-task models)


@dataclass
class EncodedKnowledge:
    """Knowledge encoded into the weights once (:meth:`ReckoningModel.encode`)."""

    sentences: list[str]  # the knowledge, as encoded (the prompts name one fact_i per sentence)
    weights: dict[str, Tensor]  # the fast weights after the inner loop, keyed like named_parameters()
    inner_steps: int  # inner steps taken


Knowledge = Union[Sequence[str], EncodedKnowledge]


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

    @property
    def encodes(self) -> bool:
        """Whether the model encodes knowledge into its weights (RECKONING), so that
        :meth:`encode` applies; the in-context baselines read it from the prompt instead."""
        return self.inner_steps is not None

    def encode(self, knowledge: Sequence[str], hops: Optional[int] = None) -> EncodedKnowledge:
        """Run the inner loop once on ``knowledge`` (sentences) and keep the fast weights: pass the
        result as ``knowledge=`` to :meth:`answer` or :meth:`answer_many` to answer any number of
        questions about it without another inner loop.

        ``hops`` sets the inner steps as in :meth:`answer` (default: the most steps the model was
        trained with). In-context models have no inner loop: a ValueError says to pass the sentences.
        """
        if not self.encodes:
            raise ValueError(f"this checkpoint is an in-context model ({self.method.name}): it reads the knowledge "
                             "from its prompt and has no inner loop to encode it with; pass the sentences to "
                             "answer() instead")
        sentences = _sentences(knowledge)
        steps = self.method.inner.steps_for(int(hops)) if hops is not None else int(self.inner_steps)
        # the question does not enter the inner loop: any placeholder collates the knowledge batch
        record = self._record("knowledge", sentences, "none.", hops)
        device = next(self.method.model.parameters()).device
        batch = self.method.encoder.collate([record]).to(device)
        with torch.no_grad():
            weights = self.method.fast_weights(batch, inner_steps=steps)[0]
        return EncodedKnowledge(sentences=sentences, weights={k: v.detach() for k, v in weights.items()},
                                inner_steps=steps)

    def answer(self, knowledge: Knowledge, question: str, hops: Optional[int] = None) -> Answer:
        """Encode ``knowledge`` (sentences) into the weights, then answer ``question``; with
        ``knowledge`` from :meth:`encode`, answer with its fast weights (no inner loop).

        ``hops``: the reasoning depth, which sets the inner steps as in training
        (``inner.steps_by_hops``); default: the most steps the model was trained with.

        The paper's controls answer as they were trained: an ``icr_no_question`` model sees the
        knowledge alone (not ``question``), a ``reckoning_random_facts`` (or ``icr_random_facts``)
        model as many sentences drawn from its checkpoint's fact pool instead of ``knowledge``.
        """
        return self.answer_many([knowledge], [question], hops=hops)[0]

    def answer_many(self, knowledge: Union[Knowledge, Sequence[Knowledge]], questions: Sequence[str],
                    hops: Optional[int] = None) -> list[Answer]:
        """:meth:`answer` for several questions in one batch: ``knowledge`` is one entry per
        question (sentences, or :meth:`encode`'s result), or a single :meth:`encode` result for all
        of them. Questions whose knowledge is encoded share its fast weights: one inner loop for
        all of them."""
        if isinstance(knowledge, EncodedKnowledge):
            knowledge = [knowledge] * len(questions)
        if len(knowledge) != len(questions):
            raise ValueError(f"{len(knowledge)} knowledge lists for {len(questions)} questions")
        answers: list[Optional[Answer]] = [None] * len(questions)
        plain = [i for i, k in enumerate(knowledge) if not isinstance(k, EncodedKnowledge)]
        if plain:
            records = [self._record(f"q{i}", _sentences(knowledge[i]), questions[i], hops) for i in plain]
            inner_steps = self.inner_steps if hops is None and self.encodes else None
            for i, answer in zip(plain, self._generate(records, lambda batch: self.method.evaluate(
                    batch, inner_steps=inner_steps))):
                answers[i] = answer
        shared: dict[int, list[int]] = {}
        for i, k in enumerate(knowledge):
            if isinstance(k, EncodedKnowledge):
                shared.setdefault(id(k), []).append(i)
        for index in shared.values():
            encoded = knowledge[index[0]]
            records = [self._record(f"q{i}", encoded.sentences, questions[i], hops) for i in index]
            for i, answer in zip(index, self._generate(records, lambda batch: self.method.answer_with(
                    batch, encoded.weights))):
                answers[i] = answer
        return [a for a in answers if a is not None]

    def _record(self, name: str, sentences: list[str], question: str, hops: Optional[int]) -> dict[str, Any]:
        if not question.strip():
            raise ValueError("question is empty")
        return {
            "id": name, "family": self.family, "source": "predict", "knowledge": sentences,
            "facts": [], "distractors": [], "question": question.strip(),
            # no gold answer: the target only shapes the (unused) answer loss
            "answer": "none", "hops": int(hops) if hops is not None else -1,
        }

    def _generate(self, records: list[dict[str, Any]], run: Any) -> list[Answer]:
        device = next(self.method.model.parameters()).device
        batch = self.method.encoder.collate(records).to(device)
        with torch.no_grad():
            out = run(batch)
        answers = []
        for text in out["prediction"]:
            label, facts = self.method.encoder.parse_generation(text)
            answers.append(Answer(label=label, text=text, facts=facts))
        return answers


def _sentences(knowledge: Sequence[str]) -> list[str]:
    if isinstance(knowledge, str):
        raise ValueError("knowledge is one string: give a list of sentences (one fact or rule each)")
    sentences = [s.strip() for s in knowledge if s.strip()]
    if not sentences:
        raise ValueError("knowledge is empty: give at least one sentence")
    return sentences
