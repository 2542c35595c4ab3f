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

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import Tensor

from reckoning_ray.core.card import CARD, PAPER_URL
from reckoning_ray.core.checkpoint import (
    SETTINGS,
    CheckpointError,
    is_checkpoint,
    load_pretrained,
    read_settings,
    resolve,
    save_pretrained,
)
from reckoning_ray.core.hub import hub_offline, looks_like_hub_id
from reckoning_ray.core.schema import FAMILIES


@dataclass
class Answer:
    # the answer word, normalised (e.g. "yes", "grandson"); "" when the generated text holds none of
    # the labels the model was trained on (the checkpoint's reckoning.json "task": "labels")
    label: str
    text: str  # the whole generated continuation
    facts: list[str] = field(default_factory=list)  # the facts it recalled (multi-task models)


@dataclass
class EncodedKnowledge:
    """Knowledge encoded into the weights once (:meth:`ReckoningModel.encode`)."""

    sentences: list[str]  # the knowledge, as encoded (the prompts name one fact_i per sentence)
    weights: dict[str, Tensor]  # the fast weights after the inner loop, keyed like named_parameters()
    inner_steps: int  # inner steps taken


Knowledge = Union[Sequence[str], EncodedKnowledge]


class ReckoningModel(ModelHubMixin, library_name="reckoning-ray", paper_url=PAPER_URL, pipeline_tag="text-generation",
                     tags=["reckoning", "bilevel", "meta-learning", "knowledge-encoding"]):
    """A trained method ready to answer: :meth:`from_pretrained`, then :meth:`answer`.

    It follows the hub's conventions (``huggingface_hub.ModelHubMixin``): :meth:`from_pretrained`
    takes a checkpoint directory, a run directory (its best checkpoint) or a hub id (downloaded
    into, or read offline from, the Hugging Face cache); ``save_pretrained(directory)`` writes a
    checkpoint directory with its model card (``README.md``); ``push_to_hub(repo_id)`` uploads one.
    """

    def __init__(self, method: Any, family: str = "proofwriter", card: Optional[str] = None,
                 labels: Optional[list[str]] = None) -> None:
        self.method = method.eval()
        self.family = family
        self.card = card  # the model card of the checkpoint it was loaded from, kept by save_pretrained
        # the labels it was trained to answer with (None: any text before "because" is taken as one)
        self.labels = sorted(labels) if labels else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device: Optional[str] = None,
                        family: Optional[str] = None, revision: Optional[str] = None,
                        cache_dir: Optional[str | Path] = None, force_download: bool = False,
                        local_files_only: bool = False, token: Optional[str | bool] = None) -> "ReckoningModel":
        """Load a checkpoint: a checkpoint directory, a run directory (its best checkpoint) or a
        hub id such as ``user/reckoning-proofwriter`` (``revision``, ``cache_dir``, ``token`` and
        ``local_files_only`` as in ``huggingface_hub``; ``HF_HUB_OFFLINE=1`` reads the cache only).
        ``family``: the question wording, "proofwriter" ("can we conclude ...?") or "clutrr";
        default: the training data's. ``device``: a torch device (default: cpu)."""
        name = str(pretrained_model_name_or_path)
        if Path(name).expanduser().exists() or not looks_like_hub_id(name):
            return cls._load(resolve(name, "best"), device, family)
        try:
            return super().from_pretrained(name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                           local_files_only=local_files_only, token=token, device=device, family=family)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
                OfflineModeIsEnabled) as exc:
            offline = " (offline: HF_HUB_OFFLINE is set, so only the local cache is read)" if hub_offline() else ""
            raise CheckpointError(
                f"{name!r} is neither a directory here nor a checkpoint the hub cache holds{offline}: "
                f"{' '.join(str(exc).split())[:200]}; pass a checkpoint or run directory, or a hub id that "
                "can be downloaded") from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Optional[str | Path],
                         force_download: bool, local_files_only: bool, token: Optional[str | bool],
                         device: Optional[str] = None, family: Optional[str] = None,
                         **ignored: Any) -> "ReckoningModel":
        # ModelHubMixin.from_pretrained calls this for a hub id: the whole repository (model,
        # tokenizer, settings, learned rates, card) is one checkpoint directory
        directory = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only or hub_offline(),
                                      token=token)
        if not is_checkpoint(directory):
            raise CheckpointError(f"hub repository {model_id!r} is not a RECKONING checkpoint: {SETTINGS} or "
                                  "config.json is missing (upload one with ReckoningModel.push_to_hub)")
        return cls._load(Path(directory), device, family)

    @classmethod
    def _load(cls, directory: Path, device: Optional[str], family: Optional[str]) -> "ReckoningModel":
        settings = read_settings(directory)
        family = family or settings.get("task", {}).get("family") or "proofwriter"
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is invalid: choose one of {FAMILIES}")
        method = load_pretrained(directory, device=torch.device(device) if device else None)
        card = (directory / CARD).read_text() if (directory / CARD).is_file() else None
        return cls(method, family, card=card, labels=settings.get("task", {}).get("labels"))

    def _save_pretrained(self, save_directory: Path) -> None:
        """The checkpoint directory (``reckoning_ray.core.checkpoint.save_pretrained``), with the
        card of the checkpoint it was loaded from (else one from its own settings)."""
        save_pretrained(self.method, save_directory,
                        task={"family": self.family, **({"labels": self.labels} if self.labels else {})})
        if self.card is not None:
            (Path(save_directory) / CARD).write_text(self.card)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card ``save_pretrained`` writes (used by ``ModelHubMixin`` when none was written)."""
        if self.card is not None:
            return ModelCard(self.card)
        with tempfile.TemporaryDirectory() as tmp:
            self._save_pretrained(Path(tmp))
            return ModelCard((Path(tmp) / CARD).read_text())

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
            if self.labels is not None and label not in self.labels:
                label = ""  # e.g. "someone someone is red": text where the label belongs, but no label
            answers.append(Answer(label=label, text=text, facts=facts))
        return answers


def _sentences(knowledge: Sequence[str]) -> list[str]:
    if isinstance(knowledge, str):
        raise ValueError("knowledge is one string: give a list of sentences (one fact or rule each)")
    sentences = [s.strip() for s in knowledge if s.strip()]
    if not sentences:
        raise ValueError("knowledge is empty: give at least one sentence")
    return sentences
