"""Tokenisation and collation of tasks into tensors for RECKONING and in-context reasoning.

Text formats (as in the paper's code)
-------------------------------------
knowledge line (RECKONING inner loop), one per sentence of ``record["knowledge"]``::

    fact_{i}: {fact}<eos>              loss on "{fact}<eos>" only

    reckoning_random_facts: the same lines, the task's knowledge replaced by as many sentences drawn
    from other tasks (the fact pool; see :meth:`Encoder.random_facts`)

question prompt (RECKONING and reckoning_random_facts, n = len(knowledge))::

    proofwriter: Based on fact_0 fact_1 ... fact_{n-1}, can we conclude {question}?
    clutrr:      Based on fact_0 fact_1 ... fact_{n-1}, {question}

in-context prompt (FT-ICR baselines)::

    icr:              {knowledge joined by "\\n"}\\n{question phrase}
    icr_no_facts:     {question phrase}
    icr_random_facts: like icr, the knowledge replaced by as many sentences of other tasks
    icr_no_question:  {knowledge joined by "\n"}  (no question phrase)

    question phrase: "can we conclude {question}?" (proofwriter) / "{question}" (clutrr)

target (after the prompt, separated by one space)::

    multi-task:  {answer} because {relevant facts joined by " "}<eos>   (just {answer}<eos> when a
                 task has no relevant facts, e.g. ProofWriter "none" answers)
    single-task: {answer}<eos>

    The same for every method: the random-facts and no-question controls keep the task's own answer
    and relevant facts as the target.

Every text piece is tokenised on its own and the ids are concatenated (a knowledge line is
``ids("fact_i:") + ids(" " + fact) + [eos]``, a sequence ``ids(prompt) + ids(" " + target) +
[eos]``), so the loss mask falls exactly on piece boundaries for both word-level and byte-level
BPE tokenizers. ProofWriter questions lose their final "." before being wrapped in
"can we conclude ...?".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from reckoning_ray.core.errors import InputError

IGNORE_INDEX = -100
RECKONING = "reckoning"
RECKONING_RANDOM_FACTS = "reckoning_random_facts"
# Methods with an inner loop: the encoder builds a knowledge batch and the "Based on fact_0 ..." prompt.
BILEVEL_METHODS = (RECKONING, RECKONING_RANDOM_FACTS)
IN_CONTEXT_METHODS = ("icr", "icr_no_facts", "icr_random_facts", "icr_no_question")
# Methods whose knowledge is drawn from other tasks (seed and fact pool matter).
RANDOM_FACTS_METHODS = ("icr_random_facts", RECKONING_RANDOM_FACTS)
METHODS = (RECKONING, "icr", "icr_no_facts", "icr_random_facts", "icr_no_question", RECKONING_RANDOM_FACTS)

# A word or a single punctuation mark: the canonical split used to compare generated text
# with gold text whatever the tokenizer's spacing ("Bob is red." == "bob is red .").
_WORD = re.compile(r"\w+|[^\w\s]")
_BECAUSE = re.compile(r"\bbecause\b", re.IGNORECASE)
_TRAILING_PUNCT = ".,;:!?"
# Texts whose token ids an Encoder keeps (about 100 MB at most for sentence-sized texts).
_IDS_CACHE_SIZE = 1 << 20


class EncodeError(InputError, ValueError):
    """A task cannot be encoded; the message names the task id, the field and the fix."""


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class KnowledgeBatch:
    """Inner-loop input for T tasks, F = most knowledge sentences of a task in the batch.

    input_ids:      [T, F, Lk] long, right padded with the pad id; pad facts are all pad
    attention_mask: [T, F, Lk] long, 1 on real tokens
    labels:         [T, F, Lk] long, IGNORE_INDEX except the fact tokens and their eos
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> "KnowledgeBatch":
        return KnowledgeBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, index: Sequence[int]) -> "KnowledgeBatch":
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        return KnowledgeBatch(*(getattr(self, f.name).index_select(0, idx) for f in fields(self)))


@dataclass
class SequenceBatch:
    """Prompt + target, right padded: outer loss (RECKONING) or training loss (FT-ICR).

    input_ids:      [T, L] long
    attention_mask: [T, L] long, 1 on real tokens
    labels:         [T, L] long, IGNORE_INDEX except the target tokens and their eos
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, index: Sequence[int]) -> "SequenceBatch":
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        return SequenceBatch(*(getattr(self, f.name).index_select(0, idx) for f in fields(self)))


@dataclass
class PromptBatch:
    """Prompt only, LEFT padded so that greedy generation continues every row at the end.

    input_ids:      [T, Lp] long
    attention_mask: [T, Lp] long, 1 on real tokens (position ids are cumsum(mask) - 1, clamped
                    at 0; the caller computes them)
    """

    input_ids: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, index: Sequence[int]) -> "PromptBatch":
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        return PromptBatch(*(getattr(self, f.name).index_select(0, idx) for f in fields(self)))


@dataclass
class TaskBatch:
    """T tasks ready for a method: knowledge (RECKONING only), sequence and prompt.

    ids:       task ids
    hops:      [T] long, reasoning depth of each task
    answers:   gold label words
    facts:     gold relevant facts per task (for knowledge-recall accuracy)
    knowledge: inner-loop input, None for in-context methods
    sequence:  prompt + target with the loss mask
    prompt:    left-padded prompt for generation
    """

    ids: list[str]
    hops: Tensor
    answers: list[str]
    facts: list[list[str]]
    knowledge: Optional[KnowledgeBatch]
    sequence: SequenceBatch
    prompt: PromptBatch

    def to(self, device: torch.device | str) -> "TaskBatch":
        """Move every tensor to ``device`` (lists stay as they are)."""
        return TaskBatch(
            ids=self.ids,
            hops=self.hops.to(device),
            answers=self.answers,
            facts=self.facts,
            knowledge=None if self.knowledge is None else self.knowledge.to(device),
            sequence=self.sequence.to(device),
            prompt=self.prompt.to(device),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: list[int]) -> "TaskBatch":
        """Sub-batch of the tasks at ``index`` (in that order); padded widths are kept."""
        index = [int(i) for i in index]
        for i in index:
            if not -len(self) <= i < len(self):
                raise IndexError(f"task index {i} out of range for a batch of {len(self)} tasks")
        index = [i % len(self) for i in index]
        idx = torch.as_tensor(index, dtype=torch.long, device=self.hops.device)
        return TaskBatch(
            ids=[self.ids[i] for i in index],
            hops=self.hops.index_select(0, idx),
            answers=[self.answers[i] for i in index],
            facts=[list(self.facts[i]) for i in index],
            knowledge=None if self.knowledge is None else self.knowledge.select(index),
            sequence=self.sequence.select(index),
            prompt=self.prompt.select(index),
        )


# --------------------------------------------------------------------------------------------
# Text formats
# --------------------------------------------------------------------------------------------


def fact_prefix(i: int) -> str:
    """Name of the i-th knowledge sentence: ``fact_{i}:`` (excluded from the inner loss)."""
    return f"fact_{i}:"


def knowledge_line(i: int, fact: str) -> str:
    """The i-th knowledge line as text, without eos: ``fact_{i}: {fact}``."""
    return f"{fact_prefix(i)} {fact}"


def _question_phrase(record: dict[str, Any]) -> str:
    question = record["question"].strip()
    if record["family"] == "proofwriter":
        # "Bob is red." -> "can we conclude Bob is red?"
        return f"can we conclude {question.rstrip(' .?')}?"
    return question


def reckoning_prompt(record: dict[str, Any]) -> str:
    """``Based on fact_0 ... fact_{n-1}, {question phrase}`` with n = len(record["knowledge"])."""
    names = " ".join(f"fact_{i}" for i in range(len(record["knowledge"])))
    return f"Based on {names}, {_question_phrase(record)}"


def in_context_prompt(record: dict[str, Any], knowledge: Optional[Sequence[str]], question: bool = True) -> str:
    """Knowledge sentences joined by "\\n", a "\\n", then the question phrase.

    ``knowledge=None`` (or empty) gives the question phrase alone (icr_no_facts);
    ``question=False`` the knowledge sentences alone, joined by "\\n" (icr_no_question).
    """
    if not question:
        return "\n".join(knowledge or ())
    phrase = _question_phrase(record)
    if not knowledge:
        return phrase
    return "\n".join(knowledge) + "\n" + phrase


def target_text(record: dict[str, Any], multi_task: bool) -> str:
    """``{answer} because {facts joined by " "}`` (multi-task) or ``{answer}``; no eos."""
    if multi_task and record["facts"]:
        return f"{record['answer']} because {' '.join(record['facts'])}"
    return record["answer"]


def normalize_label(text: str) -> str:
    """Canonical label: lowercased, punctuation-separated words, trailing punctuation dropped.

    Word-level decoding puts spaces around every punctuation mark ("son - in - law"), byte-level
    BPE does not ("son-in-law"); both normalise to "son-in-law".
    """
    words = _WORD.findall(text.lower())
    while words and words[-1] in _TRAILING_PUNCT:
        words.pop()
    return re.sub(r" ?([-']) ?", r"\1", " ".join(words))


def normalize_fact(text: str) -> str:
    """Canonical sentence for recall: lowercased words and punctuation marks joined by one space.

    ``normalize_fact("Bob is red.") == normalize_fact("bob  is red .") == "bob is red ."``
    """
    return " ".join(_WORD.findall(text.lower()))


def split_facts(text: str) -> list[str]:
    """Split text into canonical sentences ending at each "." (see :func:`normalize_fact`).

    ``"bob is red . bob is big ."`` -> ``["bob is red .", "bob is big ."]``; a final fragment
    without "." (generation cut off) is kept as its own item.
    """
    out: list[str] = []
    current: list[str] = []
    for word in _WORD.findall(text.lower()):
        current.append(word)
        if word == ".":
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


def _long(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.long)


class Encoder:
    """Turns records (see ``reckoning_ray.core.data.schema``) into :class:`TaskBatch` tensors.

    Args:
        tokenizer: a Hugging Face tokenizer with ``pad_token_id`` and ``eos_token_id`` set, or
            None for a text-only encoder (``corpus``, ``prompt_text``, ``parse_generation``),
            e.g. to collect the corpus the embedded tokenizer is built from.
        method: "reckoning" (knowledge batch + question prompt), "reckoning_random_facts" (the same
            with the knowledge batch built from sentences of other tasks) or one of the in-context
            methods "icr", "icr_no_facts", "icr_random_facts", "icr_no_question" (knowledge in the
            prompt).
        multi_task: target "<answer> because <relevant facts>" (True) or "<answer>" (False).
        max_length: most tokens of one knowledge line and of one prompt + target sequence.
            Prompts that are too long lose tokens from the LEFT (the question end is kept); the
            target is never truncated.
        seed: seed of the random facts of icr_random_facts and reckoning_random_facts (drawn per
            task from ``f"{seed}:{task id}"``, so a task gets the same facts in every epoch).
        fact_pool: sentences the random-facts methods draw from (e.g. all training knowledge);
            None draws from the knowledge of the other tasks in the same collated batch.
    """

    def __init__(
        self,
        tokenizer: Any,
        method: str,
        multi_task: bool,
        max_length: int,
        seed: int = 0,
        fact_pool: Optional[list[str]] = None,
    ) -> None:
        if method not in METHODS:
            raise EncodeError(f"train.method={method!r} is not one of {METHODS}")
        if max_length < 2:
            raise EncodeError(f"model.max_length={max_length} is too small; it must be >= 2")
        if tokenizer is not None and (tokenizer.pad_token_id is None or tokenizer.eos_token_id is None):
            raise EncodeError(
                "the tokenizer needs a pad and an eos token (pad_token_id="
                f"{tokenizer.pad_token_id}, eos_token_id={tokenizer.eos_token_id}); load it with "
                "reckoning_ray.core.modeling.load_model_and_tokenizer, which sets pad = eos for GPT-2"
            )
        self.tokenizer = tokenizer
        self.method = method
        self.multi_task = bool(multi_task)
        self.max_length = int(max_length)
        self.seed = int(seed)
        # Unique sentences in first-seen order, so draws do not depend on duplicates.
        self.fact_pool = list(dict.fromkeys(fact_pool)) if fact_pool is not None else None
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer is not None else -1
        self.eos_id = int(tokenizer.eos_token_id) if tokenizer is not None else -1
        self._prefix_cache: dict[int, list[int]] = {}
        self._ids_cache: dict[str, list[int]] = {}

    @property
    def bilevel(self) -> bool:
        """True for the methods with an inner loop (a knowledge batch): reckoning, reckoning_random_facts."""
        return self.method in BILEVEL_METHODS

    # ---------------------------------------------------------------- texts

    def random_facts(self, record: dict[str, Any], pool: Sequence[str]) -> list[str]:
        """len(record["knowledge"]) sentences drawn from ``pool`` minus the task's own knowledge.

        Deterministic in (seed, task id, pool). Draws without replacement when the pool is
        large enough, with replacement otherwise.
        """
        own = set(record["knowledge"])
        n = len(record["knowledge"])
        if n == 0:
            return []
        unique = pool if pool is self.fact_pool else list(dict.fromkeys(pool))
        rng = random.Random(f"{self.seed}:{record['id']}")
        if len(unique) >= n + len(own):
            # A uniform random order of n + |own| pool entries holds at least n sentences of
            # other tasks; its first n are a uniform draw without replacement, in O(n) rather
            # than a pass over the whole pool per task.
            drawn = [unique[i] for i in rng.sample(range(len(unique)), n + len(own))]
            return [s for s in drawn if s not in own][:n]
        candidates = [s for s in unique if s not in own]
        if not candidates:
            raise EncodeError(
                f"task {record['id']!r}: {self.method} has no knowledge of other tasks to draw "
                "from; pass fact_pool=<sentences of the training knowledge> or collate more than "
                "one task per batch"
            )
        if len(candidates) >= n:
            return rng.sample(candidates, n)
        return rng.choices(candidates, k=n)

    def prompt_text(self, record: dict[str, Any], pool: Optional[Sequence[str]] = None) -> str:
        """The prompt of ``record`` for this encoder's method (see the module docstring)."""
        if self.bilevel:
            # reckoning_random_facts: as many random sentences as the task's own, so the same names
            return reckoning_prompt(record)
        if self.method == "icr":
            return in_context_prompt(record, record["knowledge"])
        if self.method == "icr_no_facts":
            return in_context_prompt(record, None)
        if self.method == "icr_no_question":
            if not record["knowledge"]:
                raise EncodeError(
                    f"task {record['id']!r}: field 'knowledge' is empty; icr_no_question's prompt is "
                    "the knowledge alone and needs at least one sentence"
                )
            return in_context_prompt(record, record["knowledge"], question=False)
        return in_context_prompt(record, self.random_facts(record, self._pool(record, pool)))

    def knowledge_of(self, record: dict[str, Any], pool: Optional[Sequence[str]] = None) -> list[str]:
        """The sentences the inner loop encodes for ``record`` (bilevel methods): the task's own
        knowledge (reckoning) or as many sentences drawn from ``pool`` / the encoder's fact pool
        (reckoning_random_facts, :meth:`random_facts`)."""
        if not self.bilevel:
            raise EncodeError(
                f"train.method={self.method!r} has no inner loop: only {BILEVEL_METHODS} encode knowledge"
            )
        if self.method == RECKONING:
            return list(record["knowledge"])
        return self.random_facts(record, self._pool(record, pool))

    def _pool(self, record: dict[str, Any], pool: Optional[Sequence[str]]) -> Sequence[str]:
        if pool is None:
            pool = self.fact_pool
        if pool is None:
            raise EncodeError(
                f"task {record['id']!r}: {self.method} needs a fact pool: pass "
                "fact_pool=<sentences> to Encoder or use collate(), which falls back to the "
                "other tasks of the batch"
            )
        return pool

    def corpus(self, records: Iterable[dict[str, Any]]) -> Iterator[str]:
        """Every text this encoder produces for ``records`` (to build the embedded tokenizer).

        Yields knowledge lines, prompts and targets (with and without "because", so one
        tokenizer serves both target formats) and the fact pool's sentences.
        """
        records = list(records)
        if self.method in RANDOM_FACTS_METHODS and self.fact_pool is None:
            pool: Optional[list[str]] = [k for r in records for k in r["knowledge"]]
        else:
            pool = None
        for record in records:
            # reckoning_random_facts: its knowledge lines are "fact_i:" prefixes of the task's own
            # lines with sentences of the pool, both yielded here
            for i, fact in enumerate(record["knowledge"]):
                yield knowledge_line(i, fact)
            yield reckoning_prompt(record)
            if not self.bilevel:
                yield self.prompt_text(record, pool)
            yield target_text(record, multi_task=True)
            yield target_text(record, multi_task=False)
        if self.fact_pool is not None:
            yield from self.fact_pool

    # ---------------------------------------------------------------- parsing

    def parse_generation(self, text: str) -> tuple[str, list[str]]:
        """Split a generated continuation into (label, facts).

        The text is cut at the first eos / pad token text and at the first line break; the
        label is the text before the word "because" (normalised by :func:`normalize_label`),
        the facts are the rest split at each "." (normalised by :func:`normalize_fact`).
        ``"Yes because bob is red . bob is big ."`` -> ``("yes", ["bob is red .", "bob is big ."])``.
        """
        specials = () if self.tokenizer is None else (self.tokenizer.eos_token, self.tokenizer.pad_token)
        for special in specials:
            if special:
                text = text.split(special, 1)[0]
        text = text.strip().split("\n", 1)[0]
        parts = _BECAUSE.split(text, maxsplit=1)
        label = normalize_label(parts[0])
        facts = split_facts(parts[1]) if len(parts) > 1 else []
        return label, facts

    # ---------------------------------------------------------------- tensors

    def _prefix_ids(self, i: int) -> list[int]:
        ids = self._prefix_cache.get(i)
        if ids is None:
            ids = self._prefix_cache[i] = self._encode_pieces([fact_prefix(i)])[0]
        return ids

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without special tokens; repeated texts come from a cache.

        Tasks come back every epoch with the same texts, so after the first epoch a batch needs
        no tokenizer call at all.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids_cache]
        if missing:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                # Fast tokenizers: the Rust batch call directly, without building BatchEncodings.
                encoded = [e.ids for e in backend.encode_batch(missing, add_special_tokens=False)]
            else:
                encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            if len(self._ids_cache) + len(missing) > _IDS_CACHE_SIZE:
                self._ids_cache.clear()
            self._ids_cache.update(zip(missing, encoded))
        return [list(self._ids_cache[t]) for t in texts]

    def collate(self, records: list[dict[str, Any]]) -> TaskBatch:
        """Encode a list of records into one :class:`TaskBatch` (a DataLoader collate_fn).

        Raises EncodeError naming the task when its target alone does not fit in max_length,
        when a knowledge line does not fit, or when RECKONING (or icr_no_question) gets a task
        without knowledge.
        """
        if self.tokenizer is None:
            raise EncodeError(
                "this Encoder has no tokenizer (tokenizer=None only collects texts); build it with "
                "the tokenizer from reckoning_ray.core.modeling.load_model_and_tokenizer to collate"
            )
        if not records:
            raise EncodeError("collate() got no records; a batch needs at least one task")
        records = list(records)
        pool: Optional[list[str]] = None
        if self.method in RANDOM_FACTS_METHODS and self.fact_pool is None:
            pool = [k for r in records for k in r["knowledge"]]

        prompts = [self.prompt_text(r, pool) for r in records]
        targets = [" " + target_text(r, self.multi_task) for r in records]
        knowledge = [self._checked_knowledge(r, pool) for r in records] if self.bilevel else []
        knowledge_bodies = [" " + fact for sentences in knowledge for fact in sentences]

        # One tokenizer call for all pieces of the batch (the Rust tokenizer batches them);
        # the "fact_i:" prefixes are the same for every task and come from a cache.
        pieces = self._encode_pieces(prompts + targets + knowledge_bodies)
        T = len(records)
        target_ids = [ids + [self.eos_id] for ids in pieces[T : 2 * T]]
        sequence, prompt = self._sequence_and_prompt(self._sequence_rows(records, pieces[:T], target_ids))
        knowledge_batch = None
        if self.bilevel:
            knowledge_batch = self._knowledge_batch(self._knowledge_lines(records, knowledge, pieces[2 * T :]))
        return TaskBatch(
            ids=[str(r["id"]) for r in records],
            hops=torch.tensor([int(r["hops"]) for r in records], dtype=torch.long),
            answers=[r["answer"] for r in records],
            facts=[list(r["facts"]) for r in records],
            knowledge=knowledge_batch,
            sequence=sequence,
            prompt=prompt,
        )

    def _checked_knowledge(self, record: dict[str, Any], pool: Optional[Sequence[str]]) -> list[str]:
        """:meth:`knowledge_of` ``record``, refusing a task without knowledge (bilevel methods)."""
        if not record["knowledge"]:
            raise EncodeError(
                f"task {record['id']!r}: field 'knowledge' is empty; RECKONING encodes the "
                "knowledge into the weights and needs at least one sentence"
            )
        return self.knowledge_of(record, pool)

    def _sequence_rows(
        self, records: list[dict[str, Any]], prompt_ids: list[list[int]], target_ids: list[list[int]]
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt, target) ids per task, the prompt truncated from the left so that prompt +
        target <= max_length."""
        seq_rows: list[tuple[list[int], list[int]]] = []
        for r, p, t in zip(records, prompt_ids, target_ids):
            if len(t) >= self.max_length:
                raise EncodeError(
                    f"task {r['id']!r}: the target ({len(t)} tokens with eos: "
                    f"{target_text(r, self.multi_task)!r}) leaves no room for the prompt within "
                    f"model.max_length={self.max_length}; raise model.max_length above {len(t)}"
                    + (" or set outer.multi_task=false" if self.multi_task else "")
                )
            room = self.max_length - len(t)
            seq_rows.append((p[-room:] if len(p) > room else p, t))
        return seq_rows

    def _sequence_and_prompt(self, seq_rows: list[tuple[list[int], list[int]]]) -> tuple[SequenceBatch, PromptBatch]:
        """The right-padded prompt + target sequences and the left-padded prompts."""
        # Rows are padded as Python lists and turned into tensors once: per-row tensor writes
        # cost more than the tokenisation itself.
        pad, ign = self.pad_id, IGNORE_INDEX
        L = max(len(p) + len(t) for p, t in seq_rows)
        Lp = max(len(p) for p, _ in seq_rows)
        seq_ids, seq_mask, seq_labels, prm_ids, prm_mask = [], [], [], [], []
        for p, t in seq_rows:
            n, fill = len(p) + len(t), L - len(p) - len(t)
            seq_ids.append(p + t + [pad] * fill)
            seq_mask.append([1] * n + [0] * fill)
            seq_labels.append([ign] * len(p) + t + [ign] * fill)
            prm_ids.append([pad] * (Lp - len(p)) + p)
            prm_mask.append([0] * (Lp - len(p)) + [1] * len(p))
        return (SequenceBatch(_long(seq_ids), _long(seq_mask), _long(seq_labels)),
                PromptBatch(_long(prm_ids), _long(prm_mask)))

    def _knowledge_lines(
        self, records: list[dict[str, Any]], knowledge: list[list[str]], body_ids: list[list[int]]
    ) -> list[list[tuple[list[int], list[int]]]]:
        """Per task, (``fact_i:`` prefix ids, body ids + eos) of each knowledge line, checked to
        fit in max_length; ``knowledge`` the sentences of each task (:meth:`knowledge_of`),
        ``body_ids`` the tokenised bodies of all tasks in order."""
        lines: list[list[tuple[list[int], list[int]]]] = []
        k = 0
        for r, sentences in zip(records, knowledge):
            task_lines = []
            for i, fact in enumerate(sentences):
                pre, body = self._prefix_ids(i), body_ids[k] + [self.eos_id]
                k += 1
                if len(pre) + len(body) > self.max_length:
                    raise EncodeError(
                        f"task {r['id']!r}: knowledge[{i}] ({fact!r}) is "
                        f"{len(pre) + len(body)} tokens as a knowledge line, more than "
                        f"model.max_length={self.max_length}; raise model.max_length"
                    )
                task_lines.append((pre, body))
            lines.append(task_lines)
        return lines

    def _knowledge_batch(self, lines: list[list[tuple[list[int], list[int]]]]) -> KnowledgeBatch:
        """[T, F, Lk] knowledge lines, right padded; tasks with fewer facts get pad facts."""
        pad, ign = self.pad_id, IGNORE_INDEX
        T = len(lines)
        F = max(len(task_lines) for task_lines in lines)
        Lk = max(len(pre) + len(body) for task_lines in lines for pre, body in task_lines)
        empty = [pad] * Lk, [0] * Lk, [ign] * Lk
        k_ids, k_mask, k_labels = [], [], []
        for task_lines in lines:
            for pre, body in task_lines:
                n, fill = len(pre) + len(body), Lk - len(pre) - len(body)
                k_ids.append(pre + body + [pad] * fill)
                k_mask.append([1] * n + [0] * fill)
                k_labels.append([ign] * len(pre) + body + [ign] * fill)
            for _ in range(F - len(task_lines)):  # pad facts: all pad, no attention, no loss
                k_ids.append(empty[0])
                k_mask.append(empty[1])
                k_labels.append(empty[2])
        return KnowledgeBatch(
            _long(k_ids).view(T, F, Lk),
            _long(k_mask).view(T, F, Lk),
            _long(k_labels).view(T, F, Lk),
        )

    def __call__(self, records: list[dict[str, Any]]) -> TaskBatch:
        return self.collate(records)
