"""Reader of the RECKONING authors' processed ProofWriter sets (the W&B artifacts
``epfl_nlp_phd/data-collection/owa_proof_{2,3,5}_hop`` and ``..._dall``; fetch one with
``python -m reckoning_ray.data fetch authors NAME --to DIR``).

The format is what the authors' ``meta_kg/dataset.py`` reads (``ProofWriterDataReader._read``, the
version with ``load_order`` and ``distractors``, found in the reckoning-metakg fork
MariusAAROS/reckoning-metakg): JSON Lines, one object a line,

    guid         str        the example's id
    questions    list[str]  question sentences (their prompt: "..., can we conclude {q}?")
    answers      list[str]  "true" / "false" / "unknown", one per question
    facts        list[str]  the relevant facts (their "criticals")
    distractors  list[str]  only in the ``_dall`` sets: the other sentences of the theory

and one file per split, ``{train,dev,test}.jsonl``, in the artifact's root (their
``{data_dir}/{dataset}/{split}.jsonl``). Answers map to yes / no / none as their ``answer_map``
does. The knowledge is the facts, then the distractors (their ``load_order=pre``; ``in`` shuffles
them at every read). Where their reader keeps only one question of a line, every question becomes
a task here, ids ``<guid>-Q<n>``.

The format has no per-question depth: ``hops`` is the D of the set's name (``owa_proof_D_hop``,
taken from the directory or file path: the release file ``depth-D`` the set was built from), or
the ``hops`` argument.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from reckoning_ray.core.data.errors import DataFormatError, jsonl_objects
from reckoning_ray.core.data.schema import Record, make_record
from reckoning_ray.core.data.splits import Splits, read_splits

AUTHORS_SPLIT_FILES = {
    "train": ("train.jsonl",),
    "validation": ("dev.jsonl", "valid.jsonl", "validation.jsonl"),
    "test": ("test.jsonl",),
}
_ANSWERS = {"true": "yes", "false": "no", "unknown": "none"}
_SET_NAME = re.compile(r"owa_proof_(\d+)_hop")


def hops_of(path: str | os.PathLike) -> Optional[int]:
    """D of the last ``owa_proof_D_hop...`` component of ``path``, or None."""
    for part in reversed(Path(path).absolute().parts):
        match = _SET_NAME.match(part)
        if match:
            return int(match.group(1))
    return None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_authors_file(path: str | os.PathLike, hops: Optional[int] = None) -> list[Record]:
    """The tasks of one file of the authors' format (see the module), in file order.

    Raises DataFormatError naming the file, the line and what was expected.
    """
    path = Path(path)
    if hops is None:
        hops = hops_of(path)
        if hops is None:
            raise DataFormatError(path, None, "expected a path with the set's name (owa_proof_D_hop...) to give the "
                                              "hop count; pass hops= to read it from elsewhere")
    records: list[Record] = []
    for line_no, item in jsonl_objects(path, "one processed theory per line"):
        for key in ("guid", "questions", "answers", "facts"):
            if key not in item:
                raise DataFormatError(path, line_no, f"expected key {key!r} (keys found: {sorted(item)})")
        for key in ("questions", "answers", "facts", "distractors"):
            if key in item and not _strings(item[key]):
                raise DataFormatError(path, line_no, f"expected {key!r} to be a list of strings")
        questions, answers = item["questions"], item["answers"]
        if len(questions) != len(answers):
            raise DataFormatError(path, line_no, f"expected one answer per question, got {len(questions)} "
                                                 f"questions and {len(answers)} answers")
        bad = [a for a in answers if a.lower() not in _ANSWERS]
        if bad:
            raise DataFormatError(path, line_no, f"expected answers true, false or unknown, got {bad[0]!r}")
        facts = [f.strip() for f in item["facts"]]
        knowledge = list(dict.fromkeys(facts + [d.strip() for d in item.get("distractors", [])]))
        for n, (question, answer) in enumerate(zip(questions, answers), start=1):
            records.append(make_record(
                id=f"{item['guid']}-Q{n}", family="proofwriter", source="authors", knowledge=knowledge,
                facts=list(dict.fromkeys(facts)), question=question.strip().rstrip(".?").rstrip(),
                answer=_ANSWERS[answer.lower()], hops=hops,
            ))
    if not records:
        raise DataFormatError(path, None, "expected at least one question, the file has none")
    return records


def read_authors(path: str | os.PathLike, hops: Optional[int] = None, validation_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Splits of an authors' set: a directory with train / dev / test .jsonl (as the artifact
    has them), or one file split by guid."""
    if hops is None:
        hops = hops_of(path)
    return read_splits(path, lambda p: read_authors_file(p, hops), AUTHORS_SPLIT_FILES,
                       lambda r: str(r["id"]).rsplit("-Q", 1)[0], validation_fraction, test_fraction, seed,
                       "authors' ProofWriter")
