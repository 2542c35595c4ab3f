"""Readers that turn the original benchmark files into schema records, and the one entry point
training uses (``load_splits``).

Sources
-------
- ProofWriter (Tafjord et al. 2021), open-world release: ``meta-{train,dev,test}.jsonl`` (one
  theory per line, several questions per theory). Answers true / false / "Unknown" become the
  labels yes / no / none; ``hops`` is the question's ``QDep``. ``selection="qdep"`` keeps every
  question; ``selection="paper"`` rebuilds the RECKONING authors' task set (see
  ``read_proofwriter_file``).
- CLUTRR (Sinha et al. 2019) CSV files as written by pandas (one story per row).
- HF ``datasets``: a DatasetDict saved with ``save_to_disk`` (or a hub id, online only) whose
  rows already follow the schema.
- ``generate``: the offline generators of ``reckoning_ray.data.generate``.

Every reader returns ``{"train": [...], "validation": [...], "test": [...]}`` of plain dicts built
with ``schema.make_record``. A directory holding one file per split keeps the release's split; a
single file is split deterministically by group (theory id for ProofWriter, story id for CLUTRR)
so that no theory is shared between splits.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from reckoning_ray.config import SELECTIONS, ConfigError, InputError
from reckoning_ray.hub import hub_offline, hub_reachable, looks_like_hub_id
from reckoning_ray.data.schema import FIELDS, make_record, validate_record, without_distractors

SPLITS = ("train", "validation", "test")

# File names that a directory source may use for each split, in order of preference.
PROOFWRITER_SPLIT_FILES = {
    "train": ("meta-train.jsonl", "train.jsonl"),
    "validation": ("meta-dev.jsonl", "dev.jsonl", "meta-validation.jsonl", "validation.jsonl"),
    "test": ("meta-test.jsonl", "test.jsonl"),
}
CLUTRR_SPLIT_FILES = {
    "train": ("train.csv",),
    "validation": ("valid.csv", "validation.csv", "dev.csv"),
    "test": ("test.csv",),
}
# Split names other tools use for our "validation".
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                  "val": "validation", "test": "test"}

Record = dict[str, Any]
Splits = dict[str, list[Record]]


class DataFormatError(InputError, ValueError):
    """A data file that cannot be parsed.

    The message names the file, the (1-based) line, optionally the column, and what was expected,
    e.g. ``data/dev.jsonl, line 12: expected a JSON object (one theory per line) ...``.
    """

    def __init__(self, path: str | os.PathLike, line: Optional[int], expected: str, column: Optional[str] = None):
        self.path = str(path)
        self.line = line
        self.column = column
        self.expected = expected
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {expected}")


# ---------------------------------------------------------------------------------------------
# ProofWriter
# ---------------------------------------------------------------------------------------------

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


def _proofwriter_theory(theory: Mapping[str, Any], path: Path, line: int, selection: str = "qdep",
                        seed: int = 0) -> list[Record]:
    """Records for the questions of one ProofWriter theory (one JSONL line).

    ``selection="qdep"``: every question. ``selection="paper"``: the questions whose proof names
    >= 2 sentences, balanced per theory (see ``read_proofwriter_file``).
    """

    def fail(expected: str) -> DataFormatError:
        return DataFormatError(path, line, f"theory {theory.get('id', '?')!r}: {expected}")

    for key in ("id", "triples", "rules", "questions"):
        if key not in theory:
            raise fail(f"expected key {key!r} (keys found: {sorted(theory)})")
    triples, rules = theory["triples"], theory["rules"]
    if not isinstance(triples, dict) or not isinstance(rules, dict) or not isinstance(theory["questions"], dict):
        raise fail("expected 'triples', 'rules' and 'questions' to be JSON objects")

    # Knowledge = the theory's sentences in order. The NatLang release paraphrases several triples
    # into one sentence (``mappings`` triple/rule -> sentN, ``sentences`` sentN -> text); the
    # synthetic releases have no mapping and each triple / rule text is its own sentence, facts
    # before rules as in the theory text.
    if "sentences" in theory and "mappings" in theory:
        sentences: dict[str, str] = dict(theory["sentences"])
        mapping: dict[str, str] = dict(theory["mappings"])
        bad = sorted(k for k, s in mapping.items() if s not in sentences)
        if bad:
            raise fail(f"expected every 'mappings' target to be a key of 'sentences'; {bad[:3]} are not")
    else:
        sentences, mapping = {}, {}
        for item_id, item in list(triples.items()) + list(rules.items()):
            if not isinstance(item, dict) or "text" not in item:
                raise fail(f"expected {item_id!r} to be an object with a 'text' field")
            sentences[item_id] = item["text"]
            mapping[item_id] = item_id
    order = list(sentences)
    knowledge = [sentences[s].strip() for s in order]
    if len(set(knowledge)) != len(knowledge):
        # Identical sentences would be indistinguishable as facts vs distractors.
        dup = [k for k, n in Counter(knowledge).items() if n > 1]
        raise fail(f"expected distinct theory sentences; repeated: {dup[:2]}")
    position = {s: i for i, s in enumerate(order)}

    def sentence_texts(ids: Iterable[str], what: str) -> list[str]:
        keys = set()
        for item_id in ids:
            if item_id not in mapping:
                raise fail(f"{what} names {item_id!r}, which is not a triple or rule of the theory")
            keys.add(mapping[item_id])
        return [sentences[k].strip() for k in sorted(keys, key=position.__getitem__)]

    records = []
    for qid, q in theory["questions"].items():
        for key in ("question", "answer", "QDep", "proofs"):
            if key not in q:
                raise fail(f"question {qid!r}: expected key {key!r}")
        answer = q["answer"]
        if not isinstance(answer, (bool, str)) or answer not in _PW_ANSWERS:
            raise fail(f"question {qid!r}: expected answer true, false or \"Unknown\", got {answer!r}")
        label = _PW_ANSWERS[answer]
        try:
            hops = int(q["QDep"])
        except (TypeError, ValueError):
            raise fail(f"question {qid!r}: expected an integer QDep, got {q['QDep']!r}") from None
        if label != "none":
            try:
                alternatives = _parse_proof(q["proofs"])
            except ValueError as exc:
                raise fail(f"question {qid!r}: expected {exc}") from None
            # ProofWriter lists every proof; QDep is the depth of the shallowest. Take the first
            # proof of that depth that uses the fewest sentences.
            at_depth = [ids for depth, ids in alternatives if depth == hops] or [alternatives[0][1]]
            facts = min((sentence_texts(ids, f"question {qid!r} proof") for ids in at_depth), key=len)
            if selection == "paper" and len(facts) < 2:
                continue
        elif selection == "paper":
            # The authors' Unknown tasks: a deepest failed proof attempt that names >= 2 rules;
            # its relevant facts are exactly those rules' sentences.
            failed = _failed_rules(q["proofs"])
            if len(failed) < 2:
                continue
            facts = sentence_texts(failed, f"question {qid!r} deepest failure")
        else:
            # An Unknown question has no proof. Its relevant knowledge is taken to be what a
            # reasoner must inspect to see that nothing follows: the sentences stating facts
            # about the question's entity, plus the rules of the deepest failed proof attempt
            # that ProofWriter records ("... deepest failure = (rule3 <- rule5 <- FAIL)"). This
            # keeps `facts` non-empty for most Unknown questions, so dropping distractors does
            # not leave an empty knowledge set whose emptiness alone would reveal the label. When
            # the entity has no facts and no rule was tried, the facts stating the question's
            # attribute of other entities (the near misses) are used instead.
            entity = _entity_of(q.get("representation", ""))
            attribute = _attribute_of(q.get("representation", ""))
            about_entity = [t for t, item in triples.items() if _entity_of(item.get("representation", "")) == entity]
            failed_rules = re.findall(r"rule\d+", q["proofs"].split("failure", 1)[-1]) if "failure" in q["proofs"] else []
            ids = about_entity + [r for r in failed_rules if r in rules]
            if not ids:
                ids = [t for t, item in triples.items() if _attribute_of(item.get("representation", "")) == attribute]
            facts = sentence_texts(ids, f"question {qid!r}")
        question = str(q["question"]).strip()
        if question.endswith("."):
            # The prompt template adds "?": "Based on ..., can we conclude Bob is big?"
            question = question[:-1].rstrip()
        records.append(
            make_record(
                id=f"{theory['id']}-{qid}",
                family="proofwriter",
                source="proofwriter",
                knowledge=knowledge,
                facts=facts,
                question=question,
                answer=label,
                hops=hops,
            )
        )
    if selection == "paper":
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


def _check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"data.selection={selection!r} is invalid: choose one of {SELECTIONS}")


def read_proofwriter_file(path: str | os.PathLike, selection: str = "qdep", seed: int = 0) -> list[Record]:
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
      ``seed`` and the theory id (``_balance_labels``; repeats get ids ``...-Q3-r1``, ...).
    ``hops`` stays the question's QDep in both: the paper's "depth-D" data set is the release file
    (``OWA/depth-D/meta-*.jsonl``) the path points at, not a filter on questions.

    Raises DataFormatError naming the file, the line and what was expected, ValueError for an
    unknown ``selection``.
    """
    return _read_proofwriter_theories(path, selection, seed)[0]


def _read_proofwriter_theories(path: str | os.PathLike, selection: str = "qdep",
                               seed: int = 0) -> tuple[list[Record], list[str]]:
    """``read_proofwriter_file``'s records and the ids of all the file's theories (also those
    that ``selection`` leaves without a question)."""
    _check_selection(selection)
    path = Path(path)
    records: list[Record] = []
    theory_ids: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                theory = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    path, line_no, f"expected a JSON object (one ProofWriter theory per line): {exc.msg} at character {exc.pos}"
                ) from None
            if not isinstance(theory, dict):
                raise DataFormatError(path, line_no, f"expected a JSON object (one theory per line), got {type(theory).__name__}")
            records.extend(_proofwriter_theory(theory, path, line_no, selection, seed))
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


# ---------------------------------------------------------------------------------------------
# CLUTRR
# ---------------------------------------------------------------------------------------------

CLUTRR_COLUMNS = ("id", "story", "query", "target_text", "task_name", "edge_types")
_NAME_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TASK_NAME = re.compile(r"task_(\d+)\.(\d+)")


def clutrr_sentences(story: str) -> list[str]:
    """Split a CLUTRR story into sentences and drop the ``[Name]`` brackets.

    ``"[Scott] and [Lewis] are brothers. [Jason] is father of their father"`` ->
    ``["Scott and Lewis are brothers.", "Jason is father of their father"]``.
    """
    text = _NAME_BRACKETS.sub(r"\1", story).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def clutrr_question(query: tuple[str, str]) -> str:
    """Question for a CLUTRR ``query`` (A, B).

    CLUTRR's ``target_text`` is the relation of query[1] to query[0]: for query ('Jason', 'Lewis')
    with target grandson, Lewis is Jason's grandson (the story says Jason is the father of Lewis'
    father). So the question asks how B is related to A, and "B is A's <answer>" is its reading.
    """
    first, second = query
    return f"How is {second} related to {first}?"


def read_clutrr_file(path: str | os.PathLike) -> list[Record]:
    """All rows of a CLUTRR CSV (pandas-written: the first, unnamed column is the row index).

    knowledge = facts = the story's sentences (the ``task_1.k`` tasks have no noise sentences),
    question from ``query``, answer = ``target_text``, hops = k of ``task_1.k`` (checked against
    the number of ``edge_types``). Raises DataFormatError naming file, line and column.
    """
    path = Path(path)
    records: list[Record] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(path, 1, f"expected a CSV header with columns {list(CLUTRR_COLUMNS)}, the file is empty") from None
        missing = [c for c in CLUTRR_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(path, 1, f"expected CLUTRR columns {list(CLUTRR_COLUMNS)} in the header; missing {missing}")
        index = {name: header.index(name) for name in CLUTRR_COLUMNS}
        seen_ids: set[str] = set()
        while True:
            line_no = reader.line_num + 1  # the line this row starts on
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataFormatError(path, line_no, f"expected a well-formed CSV row: {exc}") from None
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataFormatError(path, line_no, f"expected {len(header)} fields as in the header, got {len(row)}")

            def cell(name: str) -> str:
                return row[index[name]]

            def fail(name: str, expected: str) -> DataFormatError:
                return DataFormatError(path, line_no, f"expected {expected}, got {cell(name)[:80]!r}",
                                       column=f"{index[name] + 1} ({name})")

            try:
                query = ast.literal_eval(cell("query"))
            except (ValueError, SyntaxError):
                raise fail("query", "a Python tuple of two names like \"('Jason', 'Lewis')\"") from None
            if not (isinstance(query, (tuple, list)) and len(query) == 2 and all(isinstance(q, str) for q in query)):
                raise fail("query", "a Python tuple of two names like \"('Jason', 'Lewis')\"")
            try:
                edge_types = ast.literal_eval(cell("edge_types"))
            except (ValueError, SyntaxError):
                raise fail("edge_types", "a Python list of relation names like \"['son', 'brother']\"") from None
            if not isinstance(edge_types, (list, tuple)):
                raise fail("edge_types", "a Python list of relation names like \"['son', 'brother']\"")
            match = _TASK_NAME.fullmatch(cell("task_name").strip())
            if not match:
                raise fail("task_name", "a CLUTRR task name like 'task_1.3'")
            hops = int(match.group(2))
            if hops != len(edge_types):
                raise fail("task_name", f"k of task_1.k to equal the number of edge_types ({len(edge_types)})")
            answer = cell("target_text").strip()
            if not answer:
                raise fail("target_text", "a relation word such as 'grandson'")
            sentences = clutrr_sentences(cell("story"))
            if not sentences:
                raise fail("story", "a non-empty story")
            rid = cell("id").strip()
            if not rid:
                raise fail("id", "a non-empty story id")
            if rid in seen_ids:
                raise fail("id", "a story id not used by an earlier row")
            seen_ids.add(rid)
            records.append(
                make_record(
                    id=rid,
                    family="clutrr",
                    source="clutrr",
                    knowledge=sentences,
                    facts=sentences,
                    question=clutrr_question((query[0].strip(), query[1].strip())),
                    answer=answer,
                    hops=hops,
                )
            )
    if not records:
        raise DataFormatError(path, None, "expected at least one CLUTRR row after the header, the file has none")
    return records


# ---------------------------------------------------------------------------------------------
# Files, directories and deterministic splits
# ---------------------------------------------------------------------------------------------


def split_by_group(
    records: Sequence[Record],
    group_of: Callable[[Record], str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Optional[Iterable[str]] = None,
) -> Splits:
    """Split one file's records into train / validation / test with no group in two splits.

    Groups (e.g. theories) are shuffled with ``seed`` (sorted first, so the result does not depend
    on file order); the first ``round(validation_fraction * groups)`` go to validation, the next
    ``round(test_fraction * groups)`` to test, the rest to train. A positive fraction always gets at
    least one group. Records keep their file order within a split. ``groups``: all the file's
    groups, also those with no record left (ProofWriter selection=paper), so that a selection
    sends each theory to the same split as selection=qdep does; default: the records' groups.
    """
    groups = sorted({group_of(r) for r in records} | set(groups or ()))
    random.Random(f"split:{seed}").shuffle(groups)

    def count(fraction: float) -> int:
        return max(1, round(fraction * len(groups))) if fraction > 0 else 0

    n_val, n_test = count(validation_fraction), count(test_fraction)
    if n_val + n_test >= len(groups):
        raise ValueError(
            f"cannot split {len(groups)} groups (theories / stories) into train, validation "
            f"({validation_fraction}) and test ({test_fraction}): lower data.validation_fraction / data.test_fraction"
        )
    where = {g: "validation" for g in groups[:n_val]}
    where.update({g: "test" for g in groups[n_val:n_val + n_test]})
    out: Splits = {s: [] for s in SPLITS}
    for record in records:
        out[where.get(group_of(record), "train")].append(record)
    return out


def _split_files(directory: Path, names: Mapping[str, Sequence[str]]) -> dict[str, Path]:
    found = {}
    for split, candidates in names.items():
        for name in candidates:
            if (directory / name).is_file():
                found[split] = directory / name
                break
    return found


def _read_source(
    path: str | os.PathLike,
    reader: Callable[[Path], list[Record]],
    split_names: Mapping[str, Sequence[str]],
    group_of: Callable[[Record], str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    kind: str,
) -> Splits:
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        files = _split_files(path, split_names)
        missing = [s for s in SPLITS if s not in files]
        if missing:
            expected = {s: list(split_names[s]) for s in missing}
            raise DataFormatError(path, None, f"expected a {kind} directory with one file per split; missing {expected}")
        return {split: reader(files[split]) for split in SPLITS}
    if path.is_file():
        return split_by_group(reader(path), group_of, validation_fraction, test_fraction, seed)
    raise FileNotFoundError(f"{kind} data path {str(path)!r} does not exist: pass a file or a directory")


def read_proofwriter(path: str | os.PathLike, validation_fraction: float = 0.1, test_fraction: float = 0.1,
                     seed: int = 0, selection: str = "qdep") -> Splits:
    """ProofWriter splits from a directory (meta-train/meta-dev/meta-test.jsonl or train/dev/test.jsonl)
    or from one file split by theory; ``selection`` as in ``read_proofwriter_file`` (``seed`` also
    seeds its resampling). A single file is split over all its theories, so each theory lands in
    the same split under every selection."""
    _check_selection(selection)
    file = Path(os.path.expanduser(str(path)))
    if file.is_file():
        records, theories = _read_proofwriter_theories(file, selection, seed)
        return split_by_group(records, proofwriter_theory_id, validation_fraction, test_fraction, seed, theories)
    return _read_source(path, lambda p: read_proofwriter_file(p, selection, seed), PROOFWRITER_SPLIT_FILES,
                        proofwriter_theory_id, validation_fraction, test_fraction, seed, "ProofWriter")


def read_clutrr(path: str | os.PathLike, validation_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 0) -> Splits:
    """CLUTRR splits from a directory (train.csv, valid|validation|dev.csv, test.csv) or from one
    file split by story id."""
    return _read_source(path, read_clutrr_file, CLUTRR_SPLIT_FILES, lambda r: str(r["id"]),
                        validation_fraction, test_fraction, seed, "CLUTRR")


# ---------------------------------------------------------------------------------------------
# HF datasets
# ---------------------------------------------------------------------------------------------


def load_hf(path_or_id: str | os.PathLike) -> "datasets.DatasetDict":  # noqa: F821
    """Load schema records from a DatasetDict directory (``save_to_disk``) or a hub dataset id.

    Splits named valid / dev / val are renamed validation. Every row is checked against the
    schema (ValueError naming the split, row id and field). A hub id needs the network: with
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or when the hub cannot be reached within seconds,
    this raises at once and asks for a local directory instead.
    """
    import datasets

    text = os.path.expanduser(str(path_or_id))
    if os.path.isdir(text):
        try:
            loaded = datasets.load_from_disk(text)
        except FileNotFoundError as exc:
            raise DataFormatError(text, None, f"expected a directory written by DatasetDict.save_to_disk: {exc}") from None
        if isinstance(loaded, datasets.Dataset):
            raise DataFormatError(text, None, "expected a DatasetDict (train / validation / test) saved with "
                                              "save_to_disk, found a single Dataset")
    else:
        if not looks_like_hub_id(str(path_or_id)):
            raise FileNotFoundError(f"data.path {text!r} is not an existing directory; pass the directory "
                                    f"written by save_to_disk")
        offline = hub_offline(datasets=True)
        if offline or not hub_reachable():
            reason = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
            raise ConnectionError(
                f"cannot load hub dataset {text!r}: {reason}. Pass a local directory written by "
                f"DatasetDict.save_to_disk instead (data.path=/path/to/dir), e.g. one made by "
                f"`python -m reckoning_ray.data generate <spec> --out DIR`"
            )
        loaded = datasets.load_dataset(text)
    splits = {}
    for name in loaded:
        canonical = _SPLIT_ALIASES.get(name)
        if canonical is None:
            continue
        if canonical in splits:
            raise DataFormatError(text, None, f"expected one split per role; {name!r} repeats {canonical!r}")
        splits[canonical] = loaded[name]
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataFormatError(text, None, f"expected splits {list(SPLITS)} (validation may be named valid/dev); "
                                          f"found {list(loaded)}")
    for split, ds in splits.items():
        absent = [f for f in FIELDS if f not in ds.column_names]
        if absent:
            raise DataFormatError(text, None, f"split {split!r}: expected schema columns {list(FIELDS)}; missing {absent} "
                                              f"(convert the dataset with reckoning_ray.data.schema.make_record)")
        for row in ds.to_list():
            try:
                validate_record(row)
            except ValueError as exc:
                raise DataFormatError(text, None, f"split {split!r}: {exc}") from None
    return datasets.DatasetDict({s: splits[s] for s in SPLITS})


# ---------------------------------------------------------------------------------------------
# The entry point used by training
# ---------------------------------------------------------------------------------------------


def to_dataset(records: Sequence[Record]) -> "datasets.Dataset":  # noqa: F821
    """Records -> ``datasets.Dataset`` with fixed features (so empty lists keep their string type)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "family": datasets.Value("string"),
            "source": datasets.Value("string"),
            "knowledge": datasets.List(datasets.Value("string")),
            "facts": datasets.List(datasets.Value("string")),
            "distractors": datasets.List(datasets.Value("string")),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "hops": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in records], features=features)


# The per-split hop keys (length generalisation); null falls back to data.hops.
SPLIT_HOPS_KEYS = {"train": "train_hops", "validation": "validation_hops", "test": "test_hops"}


def split_hops(data_cfg: Any, split: str) -> tuple[str, list[int]]:
    """``(key, hop counts)`` that select ``split``'s tasks: ``("data.test_hops", [2, ..., 10])`` when
    data.test_hops is set, else ``("data.hops", data.hops)``. An empty list keeps every hop count."""
    name = SPLIT_HOPS_KEYS[split]
    value = getattr(data_cfg, name, None)
    if value is None:
        return "data.hops", [int(h) for h in data_cfg.hops]
    return f"data.{name}", [int(h) for h in value]


class _Override:
    """A read-only view of a data config with some keys replaced (for ``generate_splits``)."""

    def __init__(self, base: Any, **values: Any):
        self._base, self._values = base, values

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["_values"]
        return values[name] if name in values else getattr(self.__dict__["_base"], name)


def read_records(data_cfg: Any) -> Splits:
    """The unfiltered records of ``data.source`` as ``{split: [record, ...]}``.

    Generated data is generated with each split's hop counts (``split_hops``): splits that share
    hop counts come from one ``generate_splits`` call, a split with its own from a call that asks
    for that split only (each split's tasks depend on its seed, size and hop counts alone).
    """
    source = data_cfg.source
    if source == "generate":
        from reckoning_ray.data.generate import generate_splits

        by_hops: dict[tuple[int, ...], list[str]] = {}
        for split in SPLITS:
            by_hops.setdefault(tuple(split_hops(data_cfg, split)[1]), []).append(split)
        if len(by_hops) == 1 and list(by_hops) == [tuple(int(h) for h in data_cfg.hops)]:
            return generate_splits(data_cfg)
        out: Splits = {}
        for hops, names in by_hops.items():
            others = {f"num_{s}": 0 for s in SPLITS if s not in names}
            generated = generate_splits(_Override(data_cfg, hops=list(hops), **others))
            out.update({s: generated[s] for s in names})
        return {s: out[s] for s in SPLITS}
    if source in ("proofwriter", "clutrr", "hf") and not data_cfg.path:
        raise ValueError(f"data.source={source} needs data.path=<file or directory>")
    if source == "proofwriter":
        return read_proofwriter(data_cfg.path, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed,
                                getattr(data_cfg, "selection", "qdep"))
    if source == "clutrr":
        return read_clutrr(data_cfg.path, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed)
    if source == "hf":
        loaded = load_hf(data_cfg.path)
        return {split: loaded[split].to_list() for split in SPLITS}
    raise ValueError(f"data.source={source!r} is invalid: choose one of generate, proofwriter, clutrr, hf")


def _cap(records: list[Record], limit: int, seed: int, split: str) -> list[Record]:
    """A seeded random subset of ``limit`` records in their original order (limit 0 = all)."""
    if limit <= 0 or len(records) <= limit:
        return records
    keep = sorted(random.Random(f"cap:{seed}:{split}").sample(range(len(records)), limit))
    return [records[i] for i in keep]


def filter_splits(splits: Splits, data_cfg: Any) -> Splits:
    """Apply each split's hop counts (data.<split>_hops, else data.hops; empty = all),
    data.distractors (-1 = all) and the num_* caps.

    Generated data already has the requested hop counts, distractors and sizes, so only file and
    hf sources are filtered for distractors and capped. Under data.selection=paper the distractors
    are data.distractors draws with replacement, de-duplicated (the authors' setting); under qdep
    that many distinct ones. A task without relevant facts keeps at least one distractor, so no task
    is left with empty knowledge. Raises ValueError when a split ends up empty, naming the hop key
    that emptied it (data.hops or data.<split>_hops) and the hop counts the source has.
    """
    caps = {"train": data_cfg.num_train, "validation": data_cfg.num_validation, "test": data_cfg.num_test}
    generated = data_cfg.source == "generate"
    replace = getattr(data_cfg, "selection", "qdep") == "paper"
    out: Splits = {}
    for split in SPLITS:
        key, hop_list = split_hops(data_cfg, split)
        hops = set(hop_list)
        records = splits.get(split, [])
        kept = [r for r in records if not hops or r["hops"] in hops]
        if not generated:
            if data_cfg.distractors >= 0:
                # A task with no relevant facts (a few ProofWriter "Unknown" questions) keeps at
                # least one distractor: RECKONING needs some knowledge to encode.
                kept = [without_distractors(r, keep=max(data_cfg.distractors, 0 if r["facts"] else 1),
                                            seed=data_cfg.seed, replace=replace)
                        for r in kept]
            kept = _cap(kept, int(caps[split]), data_cfg.seed, split)
        if not kept:
            available = sorted({r["hops"] for r in records})
            where = f"data.source={data_cfg.source}" + (f" data.path={data_cfg.path}" if data_cfg.path else "")
            if records:
                raise ConfigError(
                    f"split {split!r} is empty after filtering by {key}={sorted(hops)}: {where} has hop "
                    f"counts {available} in that split; set {key} to some of them (or [] for all)"
                )
            if generated:
                raise ConfigError(f"split {split!r} of generated data has no tasks: set data.num_{split} >= 1")
            raise ConfigError(f"split {split!r} of {where} has no tasks; check the source (or the split fractions)")
        out[split] = kept
    return out


def load_splits(data_cfg: Any) -> "datasets.DatasetDict":  # noqa: F821
    """train / validation / test ``datasets.DatasetDict`` for ``data`` (a DictConfig or DataConfig).

    Dispatches on data.source (generate | proofwriter | clutrr | hf; ProofWriter files read with
    data.selection), then filters hop counts (data.train_hops / validation_hops / test_hops, or
    data.hops for a split without its own; empty keeps all), distractors (data.distractors; -1
    keeps all) and caps file sources at data.num_* (> 0). Rows follow ``reckoning_ray.data.schema``.
    """
    import datasets

    splits = filter_splits(read_records(data_cfg), data_cfg)
    return datasets.DatasetDict({split: to_dataset(records) for split, records in splits.items()})
