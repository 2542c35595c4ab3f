"""Reader of the CLUTRR-SG text release (Gontier et al. 2020, "Measuring Systematic Generalization in
Neural Proof Generation with Transformers", repository NicolasAG/SGinPG).

The release (``data/setup.sh``) holds text files written by SGinPG's ``scripts/csv2txt.py`` from the
CLUTRR generator's CSV (the format ``clutrr.py`` reads)::

    {forward,backward}/{train,valid}/{no,short,long}_proof_1.{2,4,6}_{train,valid}_{facts,amt}_anon.txt.4000
    {forward,backward}/test/{k}/{no,short,long}_proof_1.{k}_test_facts_ANON.txt          (k = 2 ... 10)

one example a line, Moses-tokenized (``Kristie 's``, ``Sara .``)::

    <STORY> Kristie is the daughter of Sara . John is Kristie 's grandfather . <QUERY> How is Sara related
    to John ? <PROOF> Since ... , and ... , then John is the father of Sara . <ANSWER> John is the father of Sara .

- ``<STORY>``: the story's facts, one relation template a sentence ("e_2 is the R of e_1", "e_2 is
  e_1 's R", "e_1 has a R called e_2", ...; the ``amt`` files: crowd-written paraphrases). Names may be
  anonymised (``ent_3``; ``ent _ 3`` is read as ``ent_3``) or carry a gender (``Kristie[female]``, dropped).
- ``<QUERY>``: the CLUTRR question for the query pair (e_1, e_2), e.g. "How is e_1 related to e_2 ?".
- ``<PROOF>``: ``none`` (no_proof), the proof steps ``Since B is the r1 of A , and C is the r2 of B ,
  then C is the r3 of A .`` (short_proof: one step per decomposition of the CLUTRR proof state, k - 1
  for a chain of k relations) or a ``<hop1> since ...`` search trace (long_proof).
- ``<ANSWER>``: the target sentence "e_2 is the R of e_1 ." (csv2txt writes CLUTRR's ``text_target``);
  a bare relation word is read too. The CLUTRR generator's "neice" spelling is read as "niece".
  ``--reversed`` files put ``<ANSWER>`` before ``<PROOF>``; the tags are read in any order.

A line becomes one record of the schema, as ``clutrr.py`` makes one of a CSV row: knowledge = the
story's sentences (detokenised), question = "How is e_2 related to e_1?", answer = the relation
word, hops = the number of relation edges the proof chains (short proof: steps + 1; otherwise the
level k of the file name ``1.k``; otherwise the number of story sentences). With a short proof
whose every clause and story sentence parse, the facts are the story sentences about a pair of
people the proof uses and the other sentences are distractors; otherwise every sentence is a fact.

A directory is searched recursively. Its files are mapped train / valid / test -> train /
validation / test and picked by level: ``read_clutrr_sg`` reads the levels each split's hop counts
list (data.hops, or data.<split>_hops; empty = every level), as the authors train one model per
level (``clutrr_2_hop``, ``clutrr_4_hop``, ``clutrr_6_hop``). Every variant of one (split, level)
holds the same examples, so one file is read: short > long > no proof, facts before amt, forward
before backward. ``queries_*`` files (no answers) are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

from reckoning_ray.core.data.clutrr import clutrr_question
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.relations import CLUTRR_RELATIONS
from reckoning_ray.core.data.schema import Record, make_record
from reckoning_ray.core.data.splits import SPLITS, Splits, split_by_group

# short_proof_1.4_train_facts_anon.txt.4000, long_proof_1.7_test_facts_ANON.txt, no_proof_1.2_valid_amt_anon.txt
SG_FILE_NAME = re.compile(
    r"(?:(?P<proof>no|short|long)[_-]proof(?:[_-]rev)?_)?1\.(?P<level>\d{1,2})_(?P<split>train|valid|validation|dev|test)"
    r"(?:_(?P<story>facts|amt))?(?:_anon)?\.txt(?:\.\d+)?",
    re.IGNORECASE,
)
SG_SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation",
             "test": "test"}
_PROOF_RANK = {"short": 0, "long": 1, "no": 2, None: 3}
_STORY_RANK = {"facts": 0, None: 1, "amt": 2}
_TAGS = ("STORY", "QUERY", "PROOF", "ANSWER")
_TAG = re.compile(r"<(STORY|QUERY|PROOF|ANSWER)>")
_SPLIT_ENT = re.compile(r"\bent _ (\d+)\b")
_GENDER_TAG = re.compile(r"\[(?:male|female)\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LONG_PROOF = re.compile(r"<hop\d+>", re.IGNORECASE)
# relation words as the generator writes them (plus its "neice" typo and the relation-less answer)
_RELATION_WORDS = tuple(sorted(set(CLUTRR_RELATIONS) | {"neice"}, key=len, reverse=True))
_REL = "(?P<rel>" + "|".join(re.escape(w) for w in _RELATION_WORDS) + ")"
_NAME = r"(?P<{}>[^\s,.?!]+)"
# The CLUTRR relation templates (clutrr/store/relations_store.yaml, NicolasAG/clutrr's fork included),
# Moses-tokenized; e_2 is the e_1's R.
_RELATION_TEMPLATES = tuple(re.compile(t.format(e1=_NAME.format("e1"), e2=_NAME.format("e2"), rel=_REL), re.IGNORECASE)
                            for t in (
    r"{e2} is (?:a|an|the) {rel} (?:of|to) {e1}",
    r"{e2} is {e1} 's {rel}",
    r"{e1} has (?:a|an) {rel} (?:called|named|who is) {e2}",
    r"the {rel} of {e1} is {e2}",
))
# The CLUTRR question templates (clutrr/store/question_store.yaml and the fork's), Moses-tokenized.
_QUESTION_TEMPLATES = tuple(re.compile(t.format(e1=_NAME.format("e1"), e2=_NAME.format("e2")), re.IGNORECASE) for t in (
    r"how is {e1} related to {e2} \?",
    r"how are {e1} and {e2} related to each other \?",
    r"who is {e2} from the point of relation of {e1} \?",
    r"for {e1} , who is {e2} \?",
    r"what is the family connection between {e1} and {e2} \?",
    r"fill in the blanks : {e2} is {e1} 's _",
))
_PROOF_STEP = re.compile(r"since\s+(?P<c1>.+?)\s*,?\s+and\s+(?P<c2>.+?)\s*,?\s+then\s+(?P<c3>.+)", re.IGNORECASE)

# hop counts of one split: (the config key that set them, the hop counts; empty = every level)
HopsBySplit = Mapping[str, tuple[str, Sequence[int]]]


def sg_file_info(path: str | os.PathLike) -> Optional[dict[str, Optional[str]]]:
    """``{"proof", "level", "split", "story"}`` from a CLUTRR-SG file name, None for another name.
    ``split`` is train / validation / test; ``level`` the k of ``1.k``."""
    match = SG_FILE_NAME.fullmatch(Path(path).name)
    if not match:
        return None
    info = {k: (v.lower() if v else None) for k, v in match.groupdict().items()}
    info["split"] = SG_SPLITS[info["split"]]
    return info


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    return line.strip()
    except OSError:
        return ""
    return ""


def is_clutrr_sg(path: str | os.PathLike) -> bool:
    """True for a CLUTRR-SG text file (by name, or a first line starting with ``<STORY>``) and for a
    directory holding such files (searched recursively) but no CLUTRR CSV."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_file():
        return sg_file_info(path) is not None or _first_line(path).startswith("<STORY>")
    if path.is_dir():
        if any(p.suffix == ".csv" for p in path.iterdir()):
            return False
        return bool(_sg_files(path))
    return False


def _sg_files(directory: Path) -> list[tuple[Path, dict]]:
    """(file, name info) of every CLUTRR-SG file under ``directory`` except query-only files."""
    found = []
    for file in sorted(directory.rglob("*")):
        info = sg_file_info(file)
        if info is not None and file.is_file() and not file.name.lower().startswith("queries"):
            found.append((file, info))
    return found


def _detokenize(text: str) -> str:
    """Undo Moses tokenization on the generator's sentences: ``Kristie 's son .`` -> ``Kristie's son.``"""
    text = re.sub(r"\s+", " ", text).strip().replace(" @-@ ", "-")
    text = re.sub(r" (['’]s|n't)\b", r"\1", text)
    return re.sub(r" ([.,!?;:])", r"\1", text)


def _normalise(text: str) -> str:
    """One segment's text, tokenized as Moses does for these sentences (a text that is not yet is
    split the same way): ``ent _ 3`` joined, gender tags and name brackets dropped, ``'s`` and
    sentence punctuation split off, whitespace collapsed."""
    text = _GENDER_TAG.sub("", _SPLIT_ENT.sub(r"ent_\1", text)).replace("[", "").replace("]", "")
    text = re.sub(r"(?<=\w)('s)\b", r" \1", text)
    text = re.sub(r"(?<=[^\s.])([.,?!])(?=\s|$)", r" \1", text)
    return re.sub(r"\s+", " ", text).strip()


def _relation(text: str) -> Optional[tuple[str, str, str]]:
    """(e_1, relation, e_2) of a tokenized relation sentence "e_2 is the R of e_1 ." (e_2 is e_1's R),
    None when it is not one of the generator's templates."""
    body = re.sub(r"\s*[.]\s*$", "", text.strip())
    for template in _RELATION_TEMPLATES:
        match = template.fullmatch(body)
        if match and match.group("e1") != match.group("e2"):
            return match.group("e1"), _relation_word(match.group("rel")), match.group("e2")
    return None


def _relation_word(word: str) -> str:
    word = word.lower()
    return "niece" if word == "neice" else word


class _Line:
    """One line of a CLUTRR-SG file; its errors name the file and the line."""

    def __init__(self, path: Path, line_no: int, text: str):
        self.path, self.line_no = path, line_no
        parts = _TAG.split(text.strip())
        if parts[0].strip() or len(parts) < 2 or parts[1] != "STORY":
            raise self.fail(f"a line starting with <STORY>, got {text.strip()[:60]!r}")
        self.segments: dict[str, str] = {}
        for tag, body in zip(parts[1::2], parts[2::2]):
            if tag in self.segments:
                raise self.fail(f"one <{tag}> per line, found it twice")
            self.segments[tag] = _normalise(body)
        missing = [t for t in ("STORY", "QUERY", "ANSWER") if not self.segments.get(t)]
        if missing:
            raise self.fail(f"tags {['<' + t + '>' for t in _TAGS]} with text (<PROOF> optional); "
                            f"missing or empty: {['<' + t + '>' for t in missing]}")

    def fail(self, expected: str) -> DataFormatError:
        return DataFormatError(self.path, self.line_no, f"expected {expected}")

    def story(self) -> list[str]:
        """The story's sentences, still tokenized."""
        return [s.strip() for s in _SENTENCE_END.split(self.segments["STORY"]) if s.strip()]

    def answer(self) -> tuple[str, Optional[tuple[str, str]]]:
        """(relation word, (e_1, e_2) when the answer is a sentence naming them)."""
        text = self.segments["ANSWER"]
        if text in ("...", ". . ."):
            raise self.fail("an answer after <ANSWER>; this looks like a query-only file (queries_*), which has none")
        word = re.sub(r"\s*[.]\s*$", "", text)
        if word.lower() in _RELATION_WORDS:
            return _relation_word(word), None
        parsed = _relation(text)
        if parsed is None:
            raise self.fail(f"an answer that is a relation word or a sentence \"e_2 is the R of e_1 .\" with R one "
                            f"of the CLUTRR relations, got {text[:80]!r}")
        e1, relation, e2 = parsed
        return relation, (e1, e2)

    def query(self) -> Optional[tuple[str, str]]:
        """(e_1, e_2) of the question, None when it is not one of CLUTRR's question templates."""
        for template in _QUESTION_TEMPLATES:
            match = template.fullmatch(self.segments["QUERY"])
            if match:
                return match.group("e1"), match.group("e2")
        return None

    def proof_steps(self) -> Optional[list[list[tuple[str, str, str]]]]:
        """The short proof's steps, each [premise, premise, conclusion] as (e_1, R, e_2); None for
        no proof (``none``) or a long proof (a search trace)."""
        proof = self.segments.get("PROOF", "none")
        if proof.lower() in ("none", "", "...", ". . .") or _LONG_PROOF.search(proof):
            return None
        steps = []
        for statement in re.split(r"(?<=\s\.)\s+|\s*\.$", proof):
            statement = statement.strip().rstrip(".").strip()
            if not statement:
                continue
            match = _PROOF_STEP.fullmatch(statement)
            clauses = [_relation(match.group(c)) for c in ("c1", "c2", "c3")] if match else [None]
            if None in clauses:
                raise self.fail(f"proof steps \"Since B is the r1 of A , and C is the r2 of B , then C is the r3 of A .\", "
                                f"got {statement[:100]!r}")
            steps.append(clauses)
        return steps or None


def _facts(story: list[str], steps: Optional[list[list[tuple[str, str, str]]]]) -> list[str]:
    """The story sentences a short proof uses (by the pair of people they relate); every sentence
    when there is no short proof or some sentence is not a relation template (the amt stories)."""
    if steps is None:
        return story
    parsed = [_relation(s) for s in story]
    if None in parsed:
        return story
    pairs = {frozenset((a, b)) for step in steps for a, _, b in step[:2]}
    used = [s for s, (a, _, b) in zip(story, parsed) if frozenset((a, b)) in pairs]
    return used or story


def _line_record(line: _Line, rid: str, level: Optional[int]) -> Record:
    story = line.story()
    if not story:
        raise line.fail("a non-empty story after <STORY>")
    relation, answer_pair = line.answer()
    query_pair = line.query()
    pair = answer_pair or query_pair
    if pair is None:
        raise line.fail(f"a CLUTRR question such as \"How is A related to B ?\" after <QUERY> (or an answer sentence "
                        f"naming the two people), got {line.segments['QUERY'][:80]!r}")
    if answer_pair and query_pair and set(answer_pair) != set(query_pair):
        raise line.fail(f"the answer to name the two people of the question {sorted(query_pair)}, "
                        f"got {sorted(answer_pair)}")
    steps = line.proof_steps()
    if steps is not None:
        hops = len(steps) + 1
        if level is not None and hops != level:
            raise line.fail(f"a proof of {level - 1} steps (level 1.{level} of the file name: {level} relations "
                            f"chained), got {len(steps)}")
    else:
        hops = level if level is not None else len(story)
    facts = _facts(story, steps)
    text = {s: _detokenize(s) for s in story}
    return make_record(
        id=rid,
        family="clutrr",
        source="clutrr",
        knowledge=[text[s] for s in story],
        facts=[text[s] for s in facts],
        question=clutrr_question(pair),
        answer=relation,
        hops=hops,
    )


def _record_id_prefix(path: Path) -> str:
    return re.sub(r"\.txt(?:\.\d+)?$", "", path.name, flags=re.IGNORECASE)


def read_clutrr_sg_file(path: str | os.PathLike) -> list[Record]:
    """Every line of a CLUTRR-SG text file as a record (see the module docstring); ids are
    ``<file name without .txt[.N]>:<line>``, e.g. ``short_proof_1.4_train_facts_anon:12``.
    Raises DataFormatError naming the file, the line and what was expected."""
    path = Path(os.path.expanduser(str(path)))
    info = sg_file_info(path)
    level = int(info["level"]) if info and info["level"] else None
    prefix = _record_id_prefix(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if text.strip():
                records.append(_line_record(_Line(path, line_no, text), f"{prefix}:{line_no}", level))
    if not records:
        raise DataFormatError(path, None, "expected at least one '<STORY> ... <QUERY> ... <ANSWER> ...' line, "
                                          "the file has none")
    return records


def _pick(files: list[tuple[Path, dict]]) -> Path:
    """One file of several variants of the same split and level (they hold the same examples)."""
    def rank(item: tuple[Path, dict]) -> tuple:
        file, info = item
        return (_PROOF_RANK[info["proof"]], _STORY_RANK[info["story"]], "backward" in file.parts, str(file))
    return min(files, key=rank)[0]


def sg_level_files(directory: str | os.PathLike, hops_by_split: Optional[HopsBySplit] = None) -> dict[str, list[Path]]:
    """``{split: [file, ...]}``: the one file read for each level of each split (levels in order),
    only the levels that split's hop counts list (an empty list: every level). Raises
    DataFormatError when a split has no file of the levels asked for, naming the hop key to set."""
    directory = Path(os.path.expanduser(str(directory)))
    by_level: dict[str, dict[int, list[tuple[Path, dict]]]] = {s: {} for s in SPLITS}
    for file, info in _sg_files(directory):
        by_level[info["split"]].setdefault(int(info["level"]), []).append((file, info))
    out = {}
    for split in SPLITS:
        key, wanted = (hops_by_split or {}).get(split, ("data.hops", []))
        available = sorted(by_level[split])
        levels = [k for k in available if not wanted or k in set(wanted)]
        if not levels:
            names = {"train": "train", "validation": "valid", "test": "test"}[split]
            if not available:
                raise DataFormatError(directory, None, f"expected CLUTRR-SG {split} files (*_proof_1.k_{names}_*.txt"
                                                       f"[.N]) under the directory; found none")
            raise DataFormatError(directory, None, f"expected CLUTRR-SG {split} files of level(s) {sorted(wanted)} "
                                                   f"({key}={sorted(wanted)}: level 1.k = k hops); the directory has "
                                                   f"{split} levels {available}: set {key} to some of them (or [] for all)")
        out[split] = [_pick(by_level[split][k]) for k in levels]
    return out


def read_clutrr_sg(path: str | os.PathLike, hops_by_split: Optional[HopsBySplit] = None,
                   validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CLUTRR-SG splits: from a directory, the train / valid / test files of the levels that
    ``hops_by_split`` lists per split (``{split: (key, hop counts)}``, empty = every level; see
    ``sg_level_files``); from one file, its lines split by record id (``splits.split_by_group``)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        files = sg_level_files(path, hops_by_split)
        return {split: [r for file in files[split] for r in read_clutrr_sg_file(file)] for split in SPLITS}
    if path.is_file():
        return split_by_group(read_clutrr_sg_file(path), lambda r: str(r["id"]), validation_fraction,
                              test_fraction, seed)
    raise FileNotFoundError(f"CLUTRR-SG data path {str(path)!r} does not exist: pass a file or a directory")
