"""Reader of the original ProofWriter release files (Tafjord et al. 2021), open-world release.

``meta-{train,dev,test}.jsonl`` hold one theory per line, several questions per theory. Answers
true / false / "Unknown" become the labels yes / no / none; ``hops`` is the question's ``QDep``.
``selection="qdep"`` keeps every question; ``selection="paper"`` rebuilds the RECKONING authors'
task set (see ``read_proofwriter_file``), with or without its per-theory label balance
(``balance``). ``proofs`` chooses a yes / no question's facts: the sentences of one shortest proof
or of all its alternative proofs merged. ``read_proofwriter`` reads a directory with one file per
split, or one file split by theory (``splits.split_by_group``).
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from reckoning_ray.core.schema import PROOFS, SELECTIONS
from reckoning_ray.core.data.errors import DataFormatError, jsonl_objects
from reckoning_ray.core.data.schema import Record, make_record
from reckoning_ray.core.data.splits import Splits, read_splits, split_by_group

# File names that a directory source may use for each split, in order of preference.
PROOFWRITER_SPLIT_FILES = {
    "train": ("meta-train.jsonl", "train.jsonl"),
    "validation": ("meta-dev.jsonl", "dev.jsonl", "meta-validation.jsonl", "validation.jsonl"),
    "test": ("meta-test.jsonl", "test.jsonl"),
}

_PW_ANSWERS = {True: "yes", False: "no", "Unknown": "none"}
# Suffix of the repeats that selection="paper" resamples: ``<theory>-Q3``, ``<theory>-Q3-r1``, ...
_REPEAT_SUFFIX = re.compile(r"-r\d+$")
_PROOF_TOKEN = re.compile(r"\(|\)|->|\bOR\b|\bNAF\b|(?:triple|rule)\d+|\S+")
_QUOTED = re.compile(r'"([^"]*)"')


def _parse_proof(text: str) -> list[tuple[int, list[str]]]:
    """Parse a ProofWriter ``proofs`` string into its alternative proofs.

    ``"[(((triple8 triple9) -> rule3))]"`` -> ``[(1, ["triple8", "triple9", "rule3"])]``: for each
    alternative (separated by ``OR``) its depth (the number of rule applications on the longest
    branch, ProofWriter's ``QDep``) and the triple / rule ids it uses, in order of appearance.
    ``NAF`` (negation as failure, closed-world files only) uses no sentence and is skipped.
    Raises ValueError on anything else.
    """
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(f"a proof list in brackets, e.g. '[(((triple1 triple2) -> rule1))]', got {text!r}")
    tokens = _PROOF_TOKEN.findall(body[1:-1])
    pos = 0

    def expect(tok: str) -> None:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != tok:
            got = tokens[pos] if pos < len(tokens) else "end of proof"
            raise ValueError(f"{tok!r} in proof {text!r}, got {got!r}")
        pos += 1

    def node(ids: list[str]) -> int:
        # node := triple | NAF | "(" node* ["->" rule] ")"
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"a proof step in {text!r}, got the end of the proof")
        tok = tokens[pos]
        if tok.startswith("triple"):
            pos += 1
            ids.append(tok)
            return 0
        if tok == "NAF":
            pos += 1
            return 0
        expect("(")
        depth = 0
        while pos < len(tokens) and tokens[pos] not in (")", "->"):
            depth = max(depth, node(ids))
        if pos < len(tokens) and tokens[pos] == "->":
            pos += 1
            if pos >= len(tokens) or not tokens[pos].startswith("rule"):
                raise ValueError(f"a rule id after '->' in proof {text!r}")
            ids.append(tokens[pos])
            pos += 1
            depth += 1
        expect(")")
        return depth

    # proofs := "[" "(" node ("OR" node)* ")" "]"
    alternatives = []
    expect("(")
    while True:
        ids: list[str] = []
        depth = node(ids)
        alternatives.append((depth, ids))
        if pos < len(tokens) and tokens[pos] == "OR":
            pos += 1
            continue
        break
    expect(")")
    if pos != len(tokens):
        raise ValueError(f"the end of proof {text!r} after the last alternative, got {tokens[pos]!r}")
    return alternatives


def _entity_of(representation: str) -> str:
    """First quoted item of a ProofWriter triple representation: ``("Bob" "is" "big" "+")`` -> Bob."""
    items = _QUOTED.findall(representation)
    return items[0] if items else ""


def _attribute_of(representation: str) -> str:
    items = _QUOTED.findall(representation)
    return items[2] if len(items) >= 3 else ""


def _failed_rules(proofs: str) -> list[str]:
    """Distinct rule ids of an Unknown question's deepest failed proof attempt, in order:
    ``"[@2: Bob is round.[CWA. Example of deepest failure = (rule3 <- rule5 <- FAIL)]]"`` ->
    ``["rule3", "rule5"]``; ``[]`` when no failure (or no rule) is recorded."""
    if "failure" not in proofs:
        return []
    return list(dict.fromkeys(re.findall(r"rule\d+", proofs.split("failure", 1)[1])))


class _Theory:
    """One ProofWriter theory (one JSONL line): its sentences and how its triple / rule ids map
    onto them.

    ``knowledge`` = the theory's sentences in order. The NatLang release paraphrases several
    triples into one sentence (``mappings`` triple/rule -> sentN, ``sentences`` sentN -> text);
    the synthetic releases have no mapping and each triple / rule text is its own sentence, facts
    before rules as in the theory text.
    """

    def __init__(self, theory: Mapping[str, Any], path: Path, line: int):
        self.data, self.path, self.line = theory, path, line
        for key in ("id", "triples", "rules", "questions"):
            if key not in theory:
                raise self.fail(f"expected key {key!r} (keys found: {sorted(theory)})")
        self.triples, self.rules = theory["triples"], theory["rules"]
        if not isinstance(self.triples, dict) or not isinstance(self.rules, dict) or not isinstance(theory["questions"], dict):
            raise self.fail("expected 'triples', 'rules' and 'questions' to be JSON objects")
        self.sentences, self.mapping = self._sentences_and_mapping()
        order = list(self.sentences)
        self.knowledge = [self.sentences[s].strip() for s in order]
        if len(set(self.knowledge)) != len(self.knowledge):
            # Identical sentences would be indistinguishable as facts vs distractors.
            dup = [k for k, n in Counter(self.knowledge).items() if n > 1]
            raise self.fail(f"expected distinct theory sentences; repeated: {dup[:2]}")
        self.position = {s: i for i, s in enumerate(order)}

    def fail(self, expected: str) -> DataFormatError:
        return DataFormatError(self.path, self.line, f"theory {self.data.get('id', '?')!r}: {expected}")

    def _sentences_and_mapping(self) -> tuple[dict[str, str], dict[str, str]]:
        """(sentence key -> text, triple / rule id -> sentence key)."""
        if "sentences" in self.data and "mappings" in self.data:
            sentences: dict[str, str] = dict(self.data["sentences"])
            mapping: dict[str, str] = dict(self.data["mappings"])
            bad = sorted(k for k, s in mapping.items() if s not in sentences)
            if bad:
                raise self.fail(f"expected every 'mappings' target to be a key of 'sentences'; {bad[:3]} are not")
            return sentences, mapping
        sentences, mapping = {}, {}
        for item_id, item in list(self.triples.items()) + list(self.rules.items()):
            if not isinstance(item, dict) or "text" not in item:
                raise self.fail(f"expected {item_id!r} to be an object with a 'text' field")
            sentences[item_id] = item["text"]
            mapping[item_id] = item_id
        return sentences, mapping

    def sentence_texts(self, ids: Iterable[str], what: str) -> list[str]:
        """The distinct sentences that triple / rule ``ids`` belong to, in theory order."""
        keys = set()
        for item_id in ids:
            if item_id not in self.mapping:
                raise self.fail(f"{what} names {item_id!r}, which is not a triple or rule of the theory")
            keys.add(self.mapping[item_id])
        return [self.sentences[k].strip() for k in sorted(keys, key=self.position.__getitem__)]


def _label_and_hops(theory: _Theory, qid: str, q: Mapping[str, Any]) -> tuple[str, int]:
    """A question's label (yes / no / none) and its QDep, checked."""
    for key in ("question", "answer", "QDep", "proofs"):
        if key not in q:
            raise theory.fail(f"question {qid!r}: expected key {key!r}")
    answer = q["answer"]
    if not isinstance(answer, (bool, str)) or answer not in _PW_ANSWERS:
        raise theory.fail(f"question {qid!r}: expected answer true, false or \"Unknown\", got {answer!r}")
    try:
        hops = int(q["QDep"])
    except (TypeError, ValueError):
        raise theory.fail(f"question {qid!r}: expected an integer QDep, got {q['QDep']!r}") from None
    return _PW_ANSWERS[answer], hops


def _proof_facts(theory: _Theory, qid: str, q: Mapping[str, Any], hops: int,
                 proofs: str = "shortest") -> list[str]:
    """Facts of a yes / no question.

    ``proofs="shortest"``: the sentences of its proof of depth QDep. ProofWriter lists every
    proof; QDep is the depth of the shallowest. Take the first proof of that depth that uses the
    fewest sentences. ``proofs="merged"``: the sentences of all its alternative proofs (every
    depth) merged, in theory order, as the authors' notebook takes every triple / rule id of the
    ``proofs`` string.
    """
    try:
        alternatives = _parse_proof(q["proofs"])
    except ValueError as exc:
        raise theory.fail(f"question {qid!r}: expected {exc}") from None
    if proofs == "merged":
        return theory.sentence_texts([i for _, ids in alternatives for i in ids], f"question {qid!r} proof")
    at_depth = [ids for depth, ids in alternatives if depth == hops] or [alternatives[0][1]]
    return min((theory.sentence_texts(ids, f"question {qid!r} proof") for ids in at_depth), key=len)


def _unknown_facts(theory: _Theory, qid: str, q: Mapping[str, Any]) -> list[str]:
    """Facts of an Unknown question under selection=qdep.

    An Unknown question has no proof. Its relevant knowledge is taken to be what a reasoner must
    inspect to see that nothing follows: the sentences stating facts about the question's entity,
    plus the rules of the deepest failed proof attempt that ProofWriter records ("... deepest
    failure = (rule3 <- rule5 <- FAIL)"). This keeps `facts` non-empty for most Unknown
    questions, so dropping distractors does not leave an empty knowledge set whose emptiness alone
    would reveal the label. When the entity has no facts and no rule was tried, the facts stating
    the question's attribute of other entities (the near misses) are used instead.
    """
    triples = theory.triples
    entity = _entity_of(q.get("representation", ""))
    attribute = _attribute_of(q.get("representation", ""))
    about_entity = [t for t, item in triples.items() if _entity_of(item.get("representation", "")) == entity]
    ids = about_entity + [r for r in _failed_rules(q["proofs"]) if r in theory.rules]
    if not ids:
        ids = [t for t, item in triples.items() if _attribute_of(item.get("representation", "")) == attribute]
    return theory.sentence_texts(ids, f"question {qid!r}")


def _question_facts(theory: _Theory, qid: str, q: Mapping[str, Any], label: str, hops: int,
                    selection: str, proofs: str = "shortest") -> Optional[list[str]]:
    """The relevant facts of one question, or None when ``selection`` drops the question.

    selection=paper keeps yes / no questions whose proof (under ``proofs``: the shortest one, or
    all alternatives merged) names >= 2 sentences, and the authors' Unknown tasks: a deepest
    failed proof attempt that names >= 2 rules, whose sentences are then exactly the facts.
    """
    if label != "none":
        facts = _proof_facts(theory, qid, q, hops, proofs)
        return None if selection == "paper" and len(facts) < 2 else facts
    if selection == "paper":
        failed = _failed_rules(q["proofs"])
        if len(failed) < 2:
            return None
        return theory.sentence_texts(failed, f"question {qid!r} deepest failure")
    return _unknown_facts(theory, qid, q)


def _proofwriter_theory(theory: Mapping[str, Any], path: Path, line: int, selection: str = "qdep",
                        seed: int = 0, balance: bool = True, proofs: str = "shortest") -> list[Record]:
    """Records for the questions of one ProofWriter theory (one JSONL line).

    ``selection="qdep"``: every question. ``selection="paper"``: the questions whose proof names
    >= 2 sentences, balanced per theory when ``balance`` (see ``read_proofwriter_file``).
    """
    parsed = _Theory(theory, path, line)
    records = []
    for qid, q in theory["questions"].items():
        label, hops = _label_and_hops(parsed, qid, q)
        facts = _question_facts(parsed, qid, q, label, hops, selection, proofs)
        if facts is None:
            continue
        question = str(q["question"]).strip()
        if question.endswith("."):
            # The prompt template adds "?": "Based on ..., can we conclude Bob is big?"
            question = question[:-1].rstrip()
        records.append(
            make_record(
                id=f"{theory['id']}-{qid}",
                family="proofwriter",
                source="proofwriter",
                knowledge=parsed.knowledge,
                facts=facts,
                question=question,
                answer=label,
                hops=hops,
            )
        )
    if selection == "paper" and balance:
        records = _balance_labels(records, str(theory["id"]), seed)
    return records


def _balance_labels(records: list[Record], theory_id: str, seed: int) -> list[Record]:
    """The authors' per-theory label balance: the kept yes and no questions of one theory are each
    resampled WITH replacement to the number of its kept none (Unknown) questions.

    Deterministic: one ``random.Random(f"paper:{seed}:{theory_id}")`` draws the yes questions, then
    the no questions (``rng.choices`` over the theory's question order). The result is in question
    order with repeats next to each other; the first copy keeps its id, repeats get ``-r1``,
    ``-r2``, ... (``AttNonegNatLang-OWA-146-Q3-r1``), so ids stay unique within a split. A theory
    with no kept Unknown question contributes nothing; a label with no kept question in a theory
    stays absent from that theory (its Unknown questions are kept all the same).
    """
    unknown = [i for i, r in enumerate(records) if r["answer"] == "none"]
    if not unknown:
        return []
    rng = random.Random(f"paper:{seed}:{theory_id}")
    chosen = list(unknown)
    for label in ("yes", "no"):
        pool = [i for i, r in enumerate(records) if r["answer"] == label]
        if pool:
            chosen += rng.choices(pool, k=len(unknown))
    out: list[Record] = []
    copies: Counter[int] = Counter()
    for i in sorted(chosen):
        record = {k: list(v) if isinstance(v, list) else v for k, v in records[i].items()}
        if copies[i]:
            record["id"] = f"{record['id']}-r{copies[i]}"
        copies[i] += 1
        out.append(record)
    return out


def _check_selection(selection: str, proofs: str = "shortest") -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"data.selection={selection!r} is invalid: choose one of {SELECTIONS}")
    if proofs not in PROOFS:
        raise ValueError(f"data.proofs={proofs!r} is invalid: choose one of {PROOFS}")


def read_proofwriter_file(path: str | os.PathLike, selection: str = "qdep", seed: int = 0,
                          balance: bool = True, proofs: str = "shortest") -> list[Record]:
    """The questions of a ProofWriter ``meta-*.jsonl`` file as records (file order).

    Record ids are ``<theory id>-<question id>`` (e.g. ``AttNonegNatLang-OWA-146-Q3``).

    ``selection="qdep"`` (default): every question; yes / no facts are the sentences of the proof
    of depth QDep that uses the fewest sentences; none (Unknown) facts are the entity's facts plus
    the rules of the deepest failed proof attempt.

    ``selection="paper"``: the RECKONING authors' ProofWriter data (their notebook):
    - yes / no questions whose proof (the one above) names >= 2 distinct theory sentences, with
      those sentences as facts;
    - none questions whose deepest-failure record (``... deepest failure = (rule3 <- rule5 <-
      FAIL)``) names >= 2 rules; their facts are exactly those rules' sentences;
    - per theory, yes and no resampled with replacement to the theory's none count, seeded by
      ``seed`` and the theory id (``_balance_labels``; repeats get ids ``...-Q3-r1``, ...), when
      ``balance`` (default); ``balance=False`` keeps every selected question once.
    ``balance`` has no effect under ``selection="qdep"``.

    ``proofs="shortest"`` (default): a yes / no question's facts are the sentences of one shortest
    proof, as above. ``proofs="merged"``: the sentences of all its alternative proofs merged (the
    authors' notebook reads every triple / rule id of the ``proofs`` string); under
    ``selection="paper"`` the ">= 2 sentences" test then counts the merged sentences. Unknown
    questions are not affected.

    ``hops`` stays the question's QDep in both: the paper's "depth-D" data set is the release file
    (``OWA/depth-D/meta-*.jsonl``) the path points at, not a filter on questions.

    Raises DataFormatError naming the file, the line and what was expected, ValueError for an
    unknown ``selection`` or ``proofs``.
    """
    return _read_proofwriter_theories(path, selection, seed, balance, proofs)[0]


def _read_proofwriter_theories(path: str | os.PathLike, selection: str = "qdep", seed: int = 0,
                               balance: bool = True, proofs: str = "shortest") -> tuple[list[Record], list[str]]:
    """``read_proofwriter_file``'s records and the ids of all the file's theories (also those
    that ``selection`` leaves without a question)."""
    _check_selection(selection, proofs)
    path = Path(path)
    records: list[Record] = []
    theory_ids: list[str] = []
    for line_no, theory in jsonl_objects(path, "one ProofWriter theory per line"):
        records.extend(_proofwriter_theory(theory, path, line_no, selection, seed, balance, proofs))
        theory_ids.append(str(theory["id"]))
    if not theory_ids:
        raise DataFormatError(path, None, "expected at least one theory line, the file has none")
    if not records:
        kept = " that data.selection=paper keeps" if selection == "paper" else ""
        raise DataFormatError(path, None, f"expected at least one question{kept}; "
                                          f"the file's {len(theory_ids)} theories have none")
    return records, theory_ids


def proofwriter_theory_id(record: Mapping[str, Any]) -> str:
    """The theory a ProofWriter record belongs to (its id without the ``-Q<n>`` and any ``-r<k>``
    repeat suffix)."""
    return _REPEAT_SUFFIX.sub("", str(record["id"])).rsplit("-", 1)[0]

def read_proofwriter(path: str | os.PathLike, validation_fraction: float = 0.1, test_fraction: float = 0.1,
                     seed: int = 0, selection: str = "qdep", balance: bool = True,
                     proofs: str = "shortest") -> Splits:
    """ProofWriter splits from a directory (meta-train/meta-dev/meta-test.jsonl or train/dev/test.jsonl)
    or from one file split by theory; ``selection``, ``balance`` and ``proofs`` as in
    ``read_proofwriter_file`` (``seed`` also seeds its resampling). A single file is split over all
    its theories, so each theory lands in the same split under every selection."""
    _check_selection(selection, proofs)
    file = Path(os.path.expanduser(str(path)))
    if file.is_file():
        records, theories = _read_proofwriter_theories(file, selection, seed, balance, proofs)
        return split_by_group(records, proofwriter_theory_id, validation_fraction, test_fraction, seed, theories)
    return read_splits(path, lambda p: read_proofwriter_file(p, selection, seed, balance, proofs), PROOFWRITER_SPLIT_FILES,
                       proofwriter_theory_id, validation_fraction, test_fraction, seed, "ProofWriter")
