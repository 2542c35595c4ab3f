"""One record schema for every data source (readers, generators, HF datasets on disk).

A *task* is one question with the knowledge it is asked about. Records are plain dicts so that
they round-trip through ``datasets.Dataset.from_list`` / ``save_to_disk`` unchanged.

Fields
------
id          str        unique within a split (source id + question id)
family      str        "proofwriter" | "clutrr" (decides prompt wording and label set)
source      str        where it came from: "proofwriter", "clutrr", "generated", "hf"
knowledge   list[str]  the sentences the model is given, in presentation order
                       (relevant facts and distractors interleaved as the source has them)
facts       list[str]  the relevant facts (those a proof of the answer uses), a subset of knowledge
distractors list[str]  the other sentences of knowledge (kept apart so they can be dropped)
question    str        the question sentence without the prompt template
answer      str        the label word: yes / no / none (ProofWriter) or a relation word (CLUTRR)
hops        int        reasoning depth: ProofWriter QDep, CLUTRR number of relation edges
"""

from __future__ import annotations

from typing import Any

from reckoning_ray.core.schema import FAMILIES, PROOFWRITER_LABELS

# A task as a plain dict with the fields below.
Record = dict[str, Any]

FIELDS: dict[str, type] = {
    "id": str,
    "family": str,
    "source": str,
    "knowledge": list,
    "facts": list,
    "distractors": list,
    "question": str,
    "answer": str,
    "hops": int,
}


def make_record(
    *,
    id: str,
    family: str,
    source: str,
    knowledge: list[str],
    facts: list[str],
    question: str,
    answer: str,
    hops: int,
) -> dict[str, Any]:
    """Build a validated record; ``distractors`` are the knowledge sentences not in ``facts``."""
    fact_set = set(facts)
    record = {
        "id": id,
        "family": family,
        "source": source,
        "knowledge": list(knowledge),
        "facts": list(facts),
        "distractors": [k for k in knowledge if k not in fact_set],
        "question": question,
        "answer": answer,
        "hops": int(hops),
    }
    validate_record(record)
    return record


def validate_record(record: dict[str, Any]) -> None:
    """Raise ValueError naming the record id and field when a record breaks the schema."""
    rid = record.get("id", "<no id>")
    for name, kind in FIELDS.items():
        if name not in record:
            raise ValueError(f"record {rid!r}: missing field {name!r}")
        if not isinstance(record[name], kind):
            raise ValueError(
                f"record {rid!r}: field {name!r} must be {kind.__name__}, got {type(record[name]).__name__}"
            )
    if record["family"] not in FAMILIES:
        raise ValueError(f"record {rid!r}: family {record['family']!r} is not one of {FAMILIES}")
    if record["family"] == "proofwriter" and record["answer"] not in PROOFWRITER_LABELS:
        raise ValueError(f"record {rid!r}: answer {record['answer']!r} is not one of {PROOFWRITER_LABELS}")
    missing = [f for f in record["facts"] if f not in record["knowledge"]]
    if missing:
        raise ValueError(f"record {rid!r}: facts not in knowledge: {missing[:3]}")
    if record["hops"] < 0:
        raise ValueError(f"record {rid!r}: hops must be >= 0, got {record['hops']}")


def without_distractors(record: dict[str, Any], keep: int = 0, seed: int = 0, replace: bool = False) -> dict[str, Any]:
    """Return a copy whose knowledge keeps the relevant facts and at most ``keep`` distractors.

    ``replace=False`` (data.selection=qdep): ``keep`` distinct distractors sampled without
    replacement (all of them when the record has no more than ``keep``). ``replace=True``
    (data.selection=paper, the RECKONING authors' distractor setting): ``keep`` draws *with*
    replacement, then de-duplicated, so between 1 and ``keep`` distinct distractors remain when
    the record has any. ``keep < 0`` keeps every distractor, ``keep == 0`` none. The draw is
    deterministic from ``seed`` and the record id; the knowledge keeps its original order.
    """
    import random

    distractors = record["distractors"]
    if keep < 0 or (not replace and keep >= len(distractors)):
        return dict(record)
    rng = random.Random(f"{seed}:{record['id']}")
    if not keep or not distractors:
        kept: set[str] = set()
    elif replace:
        kept = set(rng.choices(distractors, k=keep))
    else:
        kept = set(rng.sample(distractors, keep))
    fact_set = set(record["facts"])
    knowledge = [k for k in record["knowledge"] if k in fact_set or k in kept]
    out = dict(record)
    out["knowledge"] = knowledge
    out["distractors"] = [k for k in knowledge if k not in fact_set]
    return out
