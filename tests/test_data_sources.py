"""Readers of the real ProofWriter / CLUTRR files, HF datasets on disk, and load_splits."""

from __future__ import annotations

import json
import random
import re
import socket
from collections import Counter
from pathlib import Path

import pytest

from reckoning_ray.core.config import load_config
from reckoning_ray.core.schema import DataConfig
from reckoning_ray.core.data.clutrr import read_clutrr, read_clutrr_file
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.proofwriter import (
    _parse_proof,
    proofwriter_theory_id,
    read_proofwriter,
    read_proofwriter_file,
)
from reckoning_ray.core.data.sources import (
    filter_splits,
    load_hf,
    load_splits,
    read_records,
    to_dataset,
)

from conftest import SHARED_DATA as SHARED
PROOFWRITER = SHARED / "proofwriter-owa-natlang-dev.jsonl"
CLUTRR = SHARED / "clutrr-gen_train23_test2to10-test.csv"

# Answers by QDep as measured in shared/data/README.md (True -> yes, False -> no, Unknown -> none).
PW_BY_QDEP = {
    0: {"yes": 240, "no": 240, "none": 1005},
    1: {"yes": 240, "no": 240, "none": 700},
    2: {"yes": 240, "no": 240, "none": 247},
    3: {"yes": 240, "no": 240, "none": 44},
    4: {"yes": 38, "no": 38, "none": 5},
    5: {"yes": 3, "no": 3, "none": 1},
}
CLUTRR_BY_TASK = {2: 38, 3: 105, 4: 190, 5: 174, 6: 107, 7: 144, 8: 150, 9: 119, 10: 119}
CLUTRR_BY_TARGET = {
    "nephew": 157, "niece": 154, "aunt": 122, "uncle": 113, "sister": 88, "grandson": 78, "brother": 74,
    "father": 68, "granddaughter": 68, "mother": 54, "daughter": 48, "grandmother": 40, "grandfather": 29,
    "son": 24, "son-in-law": 11, "mother-in-law": 9, "father-in-law": 5, "daughter-in-law": 4,
}


@pytest.fixture(scope="module")
def pw_records():
    return read_proofwriter_file(PROOFWRITER)


@pytest.fixture(scope="module")
def clutrr_records():
    return read_clutrr_file(CLUTRR)


def by_id(records):
    return {r["id"]: r for r in records}


# --------------------------------------------------------------------------------------------- ProofWriter


def test_proofwriter_dev_parses_fully_with_the_readme_counts(pw_records):
    assert len(pw_records) == 4004
    assert len({proofwriter_theory_id(r) for r in pw_records}) == 240
    assert len({r["id"] for r in pw_records}) == 4004
    counts = Counter((r["hops"], r["answer"]) for r in pw_records)
    assert {h: {a: counts[(h, a)] for a in ("yes", "no", "none")} for h in PW_BY_QDEP} == PW_BY_QDEP
    assert sum(counts.values()) == sum(sum(v.values()) for v in PW_BY_QDEP.values())


def test_proofwriter_record_fields_follow_the_proof(pw_records):
    records = by_id(pw_records)
    first = records["AttNonegNatLang-OWA-146-Q1"]
    assert first["question"] == "Bob is blue"  # final period stripped for "can we conclude ...?"
    assert first["answer"] == "yes" and first["hops"] == 0
    assert len(first["knowledge"]) == 9 and first["knowledge"][0] == "Bob has been blue because he's green with envy."
    assert first["facts"] == ["Bob has been blue because he's green with envy."]
    assert len(first["distractors"]) == 8

    # Q8 "Gary is not cold." (False, QDep 3): proof uses triple7-9 (sent3), rule3 (sent6),
    # rule1 (sent4) and rule4 (sent7); facts keep the theory's order.
    cold = records["AttNonegNatLang-OWA-146-Q8"]
    assert (cold["question"], cold["answer"], cold["hops"]) == ("Gary is not cold", "no", 3)
    k = cold["knowledge"]
    assert cold["facts"] == [k[2], k[3], k[5], k[6]]
    assert cold["distractors"] == [k[0], k[1], k[4], k[7], k[8]]


def test_proofwriter_unknown_questions_use_the_entity_facts_and_the_failed_rules(pw_records):
    records = by_id(pw_records)
    # "Bob is not round." Unknown, QDep 2, deepest failure (rule3 <- rule5 <- FAIL): Bob's
    # sentence (sent1) plus rule3 (sent6) and rule5 (sent8).
    q9 = records["AttNonegNatLang-OWA-146-Q9"]
    assert (q9["answer"], q9["hops"]) == ("none", 2)
    assert q9["facts"] == [q9["knowledge"][0], q9["knowledge"][5], q9["knowledge"][7]]
    # "Dave is rough." Dave is in no fact: the near misses (other entities that are rough).
    q14 = records["AttNonegNatLang-OWA-146-Q14"]
    assert (q14["question"], q14["answer"], q14["hops"]) == ("Dave is rough", "none", 0)
    assert q14["facts"] == [q14["knowledge"][1], q14["knowledge"][2]]
    unknown = [r for r in pw_records if r["answer"] == "none"]
    assert sum(not r["facts"] for r in unknown) == 40
    assert all(r["facts"] for r in pw_records if r["answer"] != "none")


def test_proofwriter_alternative_proofs_take_the_smallest_of_the_question_depth(pw_records):
    line = next(l for l in PROOFWRITER.read_text(encoding="utf-8").splitlines() if '"AttNonegNatLang-OWA-111"' in l)
    theory = json.loads(line)
    question = theory["questions"]["Q7"]
    assert " OR " in question["proofs"] and question["QDep"] == 3
    alternatives = _parse_proof(question["proofs"])
    assert [d for d, _ in alternatives] == [3, 3]
    assert alternatives[0][1] == ["triple7", "triple9", "triple12", "triple12", "triple10", "rule3", "rule2",
                                  "triple9", "rule4", "rule1"]
    assert set(alternatives[1][1]) ^ set(alternatives[0][1]) == {"triple7", "rule6"}
    used = [{theory["mappings"][i] for i in ids} for _, ids in alternatives]
    assert [len(u) for u in used] == [5, 6]  # the first alternative uses fewer sentences
    expected = [theory["sentences"][s] for s in sorted(used[0], key=lambda s: int(s[4:]))]
    record = by_id(pw_records)["AttNonegNatLang-OWA-111-Q7"]
    assert (record["hops"], record["answer"]) == (3, "yes")
    assert record["facts"] == expected

    assert _parse_proof("[(triple2)]") == [(0, ["triple2"])]
    assert _parse_proof("[(((triple8 triple9) -> rule3))]") == [(1, ["triple8", "triple9", "rule3"])]
    assert _parse_proof("[(((triple1 ((triple2) -> rule1)) -> rule2) OR triple5)]") == [
        (2, ["triple1", "triple2", "rule1", "rule2"]), (0, ["triple5"])]
    with pytest.raises(ValueError, match="rule id after '->'"):
        _parse_proof("[(((triple8 triple9) -> triple3))]")
    with pytest.raises(ValueError, match="a proof list in brackets"):
        _parse_proof("(triple1)")


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
    return path


def test_proofwriter_directory_keeps_the_release_splits(tmp_path):
    lines = PROOFWRITER.read_text(encoding="utf-8").splitlines()
    write_lines(tmp_path / "meta-train.jsonl", lines[:100])
    write_lines(tmp_path / "meta-dev.jsonl", lines[100:170])
    write_lines(tmp_path / "meta-test.jsonl", lines[170:])
    splits = read_proofwriter(tmp_path)
    sizes = {s: sum(len(json.loads(l)["questions"]) for l in part)
             for s, part in (("train", lines[:100]), ("validation", lines[100:170]), ("test", lines[170:]))}
    assert {s: len(r) for s, r in splits.items()} == sizes
    assert sum(sizes.values()) == 4004
    (tmp_path / "meta-test.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"missing \{'test': \['meta-test.jsonl', 'test.jsonl'\]\}"):
        read_proofwriter(tmp_path)


def test_synthetic_release_without_sentence_mappings_uses_triple_and_rule_texts(tmp_path):
    theory = json.loads(PROOFWRITER.read_text(encoding="utf-8").splitlines()[0])
    del theory["sentences"], theory["mappings"]
    records = by_id(read_proofwriter_file(write_lines(tmp_path / "meta-dev.jsonl", [json.dumps(theory)])))
    q3 = records["AttNonegNatLang-OWA-146-Q3"]
    assert len(q3["knowledge"]) == 9 + 6
    assert q3["knowledge"][:2] == ["Bob is green.", "Bob is blue."]
    assert q3["knowledge"][9] == "If someone is round and red then they are young."
    assert q3["facts"] == ["Gary is nice.", "Gary is blue.", "If someone is nice and blue then they are round."]
    assert (q3["question"], q3["answer"], q3["hops"]) == ("Gary is round", "yes", 1)


def test_single_file_is_split_by_theory_deterministically(pw_records):
    splits = read_proofwriter(PROOFWRITER, validation_fraction=0.1, test_fraction=0.1, seed=0)
    theories = {s: {proofwriter_theory_id(r) for r in recs} for s, recs in splits.items()}
    assert [len(theories[s]) for s in ("train", "validation", "test")] == [192, 24, 24]
    assert not theories["train"] & theories["validation"]
    assert not theories["train"] & theories["test"] and not theories["validation"] & theories["test"]
    assert sum(len(v) for v in splits.values()) == 4004
    again = read_proofwriter(PROOFWRITER, 0.1, 0.1, seed=0)
    assert [r["id"] for r in again["validation"]] == [r["id"] for r in splits["validation"]]
    other = read_proofwriter(PROOFWRITER, 0.1, 0.1, seed=1)
    assert {proofwriter_theory_id(r) for r in other["validation"]} != theories["validation"]


def test_malformed_proofwriter_lines_name_file_line_and_expectation(tmp_path):
    lines = PROOFWRITER.read_text(encoding="utf-8").splitlines()[:3]
    bad_json = write_lines(tmp_path / "bad.jsonl", [lines[0], lines[1][:-20], lines[2]])
    with pytest.raises(DataFormatError) as info:
        read_proofwriter_file(bad_json)
    assert str(info.value).startswith(f"{bad_json}, line 2: expected a JSON object (one ProofWriter theory per line)")
    assert info.value.line == 2

    theory = json.loads(lines[2])
    del theory["questions"]["Q3"]["QDep"]
    missing = write_lines(tmp_path / "missing.jsonl", [lines[0], lines[1], json.dumps(theory)])
    with pytest.raises(DataFormatError, match=r"missing.jsonl, line 3: theory '.*': question 'Q3': expected key 'QDep'"):
        read_proofwriter_file(missing)

    theory = json.loads(lines[0])
    theory["questions"]["Q3"]["proofs"] = "[(((triple8 triple99) -> rule3))]"
    unknown_id = write_lines(tmp_path / "ids.jsonl", [json.dumps(theory)])
    with pytest.raises(DataFormatError, match=r"line 1: .*names 'triple99', which is not a triple or rule"):
        read_proofwriter_file(unknown_id)

    theory = json.loads(lines[0])
    theory["questions"]["Q1"]["answer"] = "maybe"
    answer = write_lines(tmp_path / "answer.jsonl", [json.dumps(theory)])
    with pytest.raises(DataFormatError, match=r"expected answer true, false or \"Unknown\", got 'maybe'"):
        read_proofwriter_file(answer)


# --------------------------------------------------------------------------------------------- CLUTRR


def test_clutrr_file_parses_fully_with_the_readme_counts(clutrr_records):
    assert len(clutrr_records) == 1146
    assert dict(Counter(r["hops"] for r in clutrr_records)) == CLUTRR_BY_TASK
    assert dict(Counter(r["answer"] for r in clutrr_records)) == CLUTRR_BY_TARGET
    for r in clutrr_records:
        assert r["facts"] == r["knowledge"] and r["distractors"] == []
        assert not any("[" in s or "]" in s for s in r["knowledge"])


def test_clutrr_question_asks_for_the_relation_of_query1_to_query0(clutrr_records):
    records = by_id(clutrr_records)
    # query ('Jason', 'Lewis'), target grandson: "Jason is father of their father" -> Lewis is
    # Jason's grandson.
    first = records["a44d478f-c68e-4557-8750-1b2f6f17d705"]
    assert first["knowledge"] == ["Scott and Lewis are brothers.", "Jason is father of their father"]
    assert (first["question"], first["answer"], first["hops"]) == ("How is Lewis related to Jason?", "grandson", 2)
    # query ('Gabrielle', 'Lisa'), target daughter: Lisa is Gabrielle's daughter.
    second = records["3865f2ad-c7e9-45f0-b5e6-a64bc6960962"]
    assert second["knowledge"] == ["Jason and his wife Gabrielle baked a cake for Lisa, his daughter."]
    assert (second["question"], second["answer"]) == ("How is Lisa related to Gabrielle?", "daughter")
    # query ('Rosa', 'Nichole'), niece: Rosa's father Seth's son Christian has a daughter Nichole.
    third = records["49126c95-8093-4707-b394-85b964340284"]
    assert (third["question"], third["answer"], third["hops"]) == ("How is Nichole related to Rosa?", "niece", 5)


def _clutrr_lines():
    return CLUTRR.read_text(encoding="utf-8").splitlines()


def test_clutrr_directory_maps_files_to_splits(tmp_path):
    header, *rows = _clutrr_lines()
    write_lines(tmp_path / "train.csv", [header] + rows[:600])
    write_lines(tmp_path / "valid.csv", [header] + rows[600:800])
    write_lines(tmp_path / "test.csv", [header] + rows[800:])
    splits = read_clutrr(tmp_path)
    assert {s: len(r) for s, r in splits.items()} == {"train": 600, "validation": 200, "test": 346}


def test_clutrr_single_file_is_split_by_story(clutrr_records):
    splits = read_clutrr(CLUTRR, validation_fraction=0.2, test_fraction=0.1, seed=3)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [802, 229, 115]
    ids = [{r["id"] for r in splits[s]} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_malformed_clutrr_rows_name_file_line_and_column(tmp_path):
    header, *rows = _clutrr_lines()
    bad_query = rows[1].replace("\"('Gabrielle', 'Lisa')\"", "\"Gabrielle and Lisa\"")
    assert bad_query != rows[1]
    path = write_lines(tmp_path / "bad.csv", [header, rows[0], bad_query])
    with pytest.raises(DataFormatError) as info:
        read_clutrr_file(path)
    assert str(info.value).startswith(f"{path}, line 3, column 4 (query): expected a Python tuple of two names")

    wrong_k = rows[0].replace("task_1.2", "task_1.3")
    path = write_lines(tmp_path / "k.csv", [header, wrong_k])
    with pytest.raises(DataFormatError, match=r"line 2, column 10 \(task_name\): expected k of task_1.k to equal "
                                               r"the number of edge_types \(2\)"):
        read_clutrr_file(path)

    path = write_lines(tmp_path / "cols.csv", [header.replace("target_text", "label"), rows[0]])
    with pytest.raises(DataFormatError, match=r"line 1: expected CLUTRR columns .* missing \['target_text'\]"):
        read_clutrr_file(path)


# --------------------------------------------------------------------------------------------- HF datasets


def test_load_hf_reads_a_saved_datasetdict_and_validates_rows(tmp_path, pw_records):
    import datasets

    dd = datasets.DatasetDict({"train": to_dataset(pw_records[:30]), "dev": to_dataset(pw_records[30:40]),
                               "test": to_dataset(pw_records[40:50])})
    dd.save_to_disk(str(tmp_path / "pw"))
    loaded = load_hf(tmp_path / "pw")
    assert list(loaded) == ["train", "validation", "test"]
    assert loaded["train"].to_list() == pw_records[:30]
    assert loaded["validation"].to_list() == pw_records[30:40]

    broken = datasets.DatasetDict({s: datasets.Dataset.from_list([{"text": "x", "label": 1}])
                                   for s in ("train", "validation", "test")})
    broken.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataFormatError, match=r"split 'train': expected schema columns .* missing \['id', 'family'"):
        load_hf(tmp_path / "other")


def test_load_hf_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # fails fast: no connection is even tried
    with pytest.raises(ConnectionError, match=r"cannot load hub dataset 'CLUTRR/v1': HF_HUB_OFFLINE.*"
                                              r"Pass a local directory written by DatasetDict.save_to_disk"):
        load_hf("CLUTRR/v1")


# --------------------------------------------------------------------------------------------- load_splits


def test_load_splits_filters_hops_and_distractors_and_caps_file_sources():
    cfg = DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[2, 3], distractors=0,
                     num_train=100, num_validation=0, num_test=0)
    dd = load_splits(cfg)
    assert list(dd) == ["train", "validation", "test"]
    assert len(dd["train"]) == 100
    assert len(dd["validation"]) == sum(1 for _ in dd["validation"]) > 0
    for split in dd.values():
        for r in split.to_list():
            assert r["hops"] in (2, 3)
            assert r["distractors"] == [] and r["knowledge"] == r["facts"]
    # the full split before the cap, in file order
    full = load_splits(DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[2, 3], distractors=0,
                                  num_train=0, num_validation=0, num_test=0))
    assert len(full["train"]) > 100
    position = {rid: i for i, rid in enumerate(full["train"]["id"])}
    kept = [position[rid] for rid in dd["train"]["id"]]
    assert kept == sorted(kept)

    one = load_splits(DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[], distractors=1,
                                 num_train=0, num_validation=0, num_test=0))
    lengths = Counter((len(r["knowledge"]) - len(r["facts"]), bool(r["facts"])) for r in one["train"].to_list())
    assert set(lengths) <= {(1, True), (1, False)}  # tasks without facts keep one distractor
    zero = load_splits(DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[0], distractors=0,
                                  num_train=0, num_validation=0, num_test=0))
    assert min(len(r["knowledge"]) for s in zero.values() for r in s.to_list()) == 1


def test_load_splits_empty_split_names_the_hops_the_source_has():
    cfg = DataConfig(source="clutrr", path=str(CLUTRR), hops=[1], distractors=-1, num_train=0,
                     num_validation=0, num_test=0)
    with pytest.raises(ValueError, match=r"split 'train' is empty after filtering by data.hops=\[1\]: .* has hop "
                                         r"counts \[2, 3, 4, 5, 6, 7, 8, 9, 10\]"):
        load_splits(cfg)


def test_load_splits_accepts_a_dictconfig_and_generates_the_embedded_preset():
    cfg = load_config("embedded")
    dd = load_splits(cfg.data)
    assert {s: len(d) for s, d in dd.items()} == {"train": 1024, "validation": 128, "test": 128}
    # the paper in miniature: 2-hop theories, a distractor each, the three open-world labels
    assert set(dd["train"]["hops"]) == {2}
    assert set(dd["train"]["answer"]) == {"yes", "no", "none"}
    assert all(len(d) == 1 for d in dd["train"]["distractors"])
    assert all(len(f) >= 2 for f in dd["train"]["facts"])

    clutrr = load_config("paper", [f"data.path={CLUTRR}", "data.source=clutrr", "data.family=clutrr",
                                   "data.hops=[2,3]"])
    dd = load_splits(clutrr.data)
    assert set(dd["train"]["hops"]) | set(dd["validation"]["hops"]) | set(dd["test"]["hops"]) == {2, 3}
    assert sum(len(d) for d in dd.values()) == 38 + 105


# --------------------------------------------------------------------------------------------- selection=paper
# The expected task set is computed here from the raw JSON with its own small proof reader (a
# bracket stack, not the reader's parser), then compared with read_proofwriter_file(selection=paper).


def _alternatives(proofs: str) -> list[str]:
    """``"[(A OR B)]"`` -> ``["A", "B"]``: split the outer list at the ORs outside any bracket."""
    body = proofs.strip()[2:-2]
    parts, level, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "(":
            level += 1
        elif ch == ")":
            level -= 1
        elif level == 0 and body.startswith(" OR ", i):
            parts.append(body[start:i])
            start = i + 4
    return parts + [body[start:]]


def _depth(alternative: str) -> int:
    """Longest chain of rule applications: each bracket is one step deeper if it holds a '->'."""
    stack = [[0, 0]]  # [deepest child, 1 if this bracket applies a rule]
    for tok in re.findall(r"\(|\)|->", alternative):
        if tok == "(":
            stack.append([0, 0])
        elif tok == "->":
            stack[-1][1] = 1
        else:
            deepest, rule = stack.pop()
            stack[-1][0] = max(stack[-1][0], deepest + rule)
    return stack[0][0]


def _independent_paper_selection(seed: int):
    """Per theory: (kept yes qids, kept no qids, kept none qids) in question order, the sentence
    sets that qualify each kept question's facts, and the documented per-theory resampling."""
    theories = {}
    for line in PROOFWRITER.read_text(encoding="utf-8").splitlines():
        t = json.loads(line)
        sentences, mapping = t["sentences"], t["mappings"]
        kept = {"yes": [], "no": [], "none": []}
        facts = {}
        for qid, q in t["questions"].items():
            if q["answer"] == "Unknown":
                failure = q["proofs"].split("failure", 1)[1]
                rules = set(re.findall(r"rule\d+", failure))
                if len(rules) >= 2:
                    kept["none"].append(qid)
                    facts[qid] = [{sentences[mapping[r]].strip() for r in rules}]
            else:
                at_depth = [a for a in _alternatives(q["proofs"]) if _depth(a) == q["QDep"]]
                sets = [{sentences[mapping[i]].strip() for i in re.findall(r"(?:triple|rule)\d+", a)} for a in at_depth]
                smallest = min(len(s) for s in sets)
                if smallest >= 2:
                    kept["yes" if q["answer"] else "no"].append(qid)
                    facts[qid] = [s for s in sets if len(s) == smallest]
        # the documented balance: one Random per theory, yes then no, choices(k = #none)
        rng = random.Random(f"paper:{seed}:{t['id']}")
        n = len(kept["none"])
        drawn = {"none": list(kept["none"])}
        for label in ("yes", "no"):
            drawn[label] = rng.choices(kept[label], k=n) if kept[label] and n else []
        theories[t["id"]] = {"kept": kept, "facts": facts, "drawn": drawn,
                             "hops": {qid: q["QDep"] for qid, q in t["questions"].items()}}
    return theories


@pytest.fixture(scope="module")
def paper_records():
    return read_proofwriter_file(PROOFWRITER, selection="paper", seed=0)


@pytest.fixture(scope="module")
def paper_expected():
    return _independent_paper_selection(seed=0)


def _qid(record) -> str:
    return re.sub(r"-r\d+$", "", record["id"]).rsplit("-", 1)[1]


def test_paper_selection_counts_match_an_independent_reading(paper_records, paper_expected):
    expected_labels, expected_hops = Counter(), Counter()
    for theory in paper_expected.values():
        for label, qids in theory["drawn"].items():
            expected_labels[label] += len(qids)
            expected_hops.update((theory["hops"][q], label) for q in qids)
    assert Counter(r["answer"] for r in paper_records) == expected_labels
    assert Counter((r["hops"], r["answer"]) for r in paper_records) == expected_hops
    # the numbers themselves (shared/data NatLang dev): 297 Unknown questions have >= 2 failed rules
    assert expected_labels == {"yes": 297, "no": 297, "none": 297}
    assert {h: expected_hops[(h, "none")] for h in range(6)} == {0: 0, 1: 0, 2: 247, 3: 44, 4: 5, 5: 1}
    assert sum(expected_hops[(0, label)] for label in ("yes", "no", "none")) == 0  # a fact alone is 1 sentence
    kept_unknown = sum(len(t["kept"]["none"]) for t in paper_expected.values())
    assert kept_unknown == 297
    assert sum(bool(t["kept"]["none"]) for t in paper_expected.values()) == 165


def test_paper_selection_balances_each_theory_and_keeps_the_proof_facts(paper_records, paper_expected):
    ids = [r["id"] for r in paper_records]
    assert len(ids) == len(set(ids))
    per_theory = Counter((proofwriter_theory_id(r), r["answer"]) for r in paper_records)
    for tid, theory in paper_expected.items():
        n = len(theory["kept"]["none"])
        assert [per_theory[(tid, label)] for label in ("yes", "no", "none")] == \
            [n if theory["kept"]["yes"] else 0, n if theory["kept"]["no"] else 0, n], tid
        got = sorted(_qid(r) for r in paper_records if proofwriter_theory_id(r) == tid)
        assert got == sorted(q for qids in theory["drawn"].values() for q in qids), tid
    seen = Counter()
    for r in paper_records:
        theory, qid = paper_expected[proofwriter_theory_id(r)], _qid(r)
        # first copy keeps the release id, repeats are numbered -r1, -r2, ... in order
        key = (proofwriter_theory_id(r), qid)
        assert r["id"] == f"{key[0]}-{qid}" + (f"-r{seen[key]}" if seen[key] else "")
        seen[key] += 1
        assert r["hops"] == theory["hops"][qid]
        assert len(r["facts"]) >= 2
        assert set(r["facts"]) in theory["facts"][qid] and len(r["facts"]) == len(set(r["facts"]))
        if r["answer"] == "none":
            # exactly the sentences of the failed rules, never the entity's facts
            assert len(theory["facts"][qid]) == 1
    assert max(seen.values()) > 1  # some questions are drawn more than once


def test_paper_selection_is_deterministic_and_seeded(paper_records):
    again = read_proofwriter_file(PROOFWRITER, selection="paper", seed=0)
    assert again == paper_records
    other = read_proofwriter_file(PROOFWRITER, selection="paper", seed=1)
    assert [r["id"] for r in other] != [r["id"] for r in paper_records]
    assert Counter(r["answer"] for r in other) == Counter(r["answer"] for r in paper_records)
    unknown = [r for r in paper_records if r["answer"] == "none"]
    assert [r for r in other if r["answer"] == "none"] == unknown  # only yes / no are resampled
    # qdep is the default and ignores the seed
    assert read_proofwriter_file(PROOFWRITER, selection="qdep", seed=5) == read_proofwriter_file(PROOFWRITER)
    with pytest.raises(ValueError, match=r"data.selection='proof' is invalid: choose one of \('qdep', 'paper'\)"):
        read_proofwriter_file(PROOFWRITER, selection="proof")


def test_paper_selection_keeps_every_theory_in_its_qdep_split():
    qdep = read_proofwriter(PROOFWRITER, 0.1, 0.1, seed=0)
    paper = read_proofwriter(PROOFWRITER, 0.1, 0.1, seed=0, selection="paper")
    where = {proofwriter_theory_id(r): s for s, recs in qdep.items() for r in recs}
    for split, records in paper.items():
        assert records and all(where[proofwriter_theory_id(r)] == split for r in records)
        assert len({r["id"] for r in records}) == len(records)
    assert sum(len(v) for v in paper.values()) == 891


def test_paper_distractors_are_drawn_with_replacement_and_deduplicated():
    read = {}

    def splits(selection, distractors):
        cfg = DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[], selection=selection,
                         distractors=distractors, num_train=0, num_validation=0, num_test=0, seed=3)
        if selection not in read:
            read[selection] = read_records(cfg)
        return filter_splits(read[selection], cfg)  # load_splits without the Arrow round trip

    full = by_id(read_proofwriter_file(PROOFWRITER, selection="paper", seed=3))
    drawn = [r for s in splits("paper", 6).values() for r in s]
    assert len(drawn) == 891
    distinct = Counter()
    for r in drawn:
        source = full[r["id"]]
        assert r["facts"] == source["facts"] and set(r["facts"]) <= set(r["knowledge"])
        assert set(r["distractors"]) <= set(source["distractors"]) and 1 <= len(r["distractors"]) <= 6
        # the documented draw: 6 choices with replacement from Random(f"{seed}:{id}"), de-duplicated
        expected = set(random.Random(f"3:{r['id']}").choices(source["distractors"], k=6))
        assert set(r["distractors"]) == expected
        assert r["knowledge"] == [k for k in source["knowledge"] if k in set(r["facts"]) | expected]
        distinct[len(r["distractors"]) < min(6, len(source["distractors"]))] += 1
    assert distinct[True] > distinct[False]  # repeats in the draw: usually fewer than 6 distinct
    none = [r for s in splits("paper", 0).values() for r in s]
    assert all(r["knowledge"] == r["facts"] and not r["distractors"] for r in none)
    everything = [r for s in splits("paper", -1).values() for r in s]
    assert all(r["knowledge"] == full[r["id"]]["knowledge"] for r in everything)
    # qdep keeps its draw without replacement: exactly min(6, available) distinct distractors
    qdep = [r for s in splits("qdep", 6).values() for r in s]
    originals = by_id(read_proofwriter_file(PROOFWRITER))
    assert all(len(r["distractors"]) == min(6, len(originals[r["id"]]["distractors"])) for r in qdep)


# --------------------------------------------------------------------------------------------- per-split hops


def test_per_split_hops_on_the_clutrr_file_train_short_test_long():
    overrides = ["data.source=clutrr", "data.family=clutrr", f"data.path={CLUTRR}", "data.hops=[]",
                 "data.train_hops=[2,3]", "data.validation_hops=[2,3]", "data.test_hops=[2,3,4,5,6,7,8,9,10]",
                 "data.num_train=0", "data.num_validation=0", "data.num_test=0", "data.distractors=-1"]
    cfg = load_config(None, overrides)
    dd = load_splits(cfg.data)
    raw = read_clutrr(CLUTRR, cfg.data.validation_fraction, cfg.data.test_fraction, cfg.data.seed)
    assert set(dd["train"]["hops"]) == set(dd["validation"]["hops"]) == {2, 3}
    assert set(dd["test"]["hops"]) == set(range(2, 11))
    for split in ("train", "validation"):
        assert len(dd[split]) == sum(r["hops"] in (2, 3) for r in raw[split])
    assert len(dd["test"]) == len(raw["test"]) == 115

    with pytest.raises(ValueError, match=r"split 'test' is empty after filtering by data.test_hops=\[1\]: .* "
                                         r"set data.test_hops to some of them"):
        load_splits(load_config(None, overrides + ["data.test_hops=[1]"]).data)
    # a split without its own key falls back to data.hops
    dd = load_splits(load_config(None, overrides + ["data.hops=[4]", "data.validation_hops=null"]).data)
    assert set(dd["validation"]["hops"]) == {4}


def test_per_split_hops_generate_each_split_with_its_hop_counts():
    from reckoning_ray.core.data.generate import generate_splits

    common = dict(family="clutrr", num_train=40, num_validation=8, num_test=18, distractors=1, seed=4)
    dd = load_splits(DataConfig(hops=[2, 3], test_hops=[2, 3, 4], **common))
    assert Counter(dd["test"]["hops"]) == {2: 6, 3: 6, 4: 6}
    assert set(dd["train"]["hops"]) == {2, 3}
    same = generate_splits(DataConfig(hops=[2, 3], **common))
    assert dd["train"].to_list() == same["train"] and dd["validation"].to_list() == same["validation"]
    assert dd["test"].to_list() == generate_splits(DataConfig(hops=[2, 3, 4], **common))["test"]


# --------------------------------------------------------------------------------------------- data.balance / data.proofs


def _theories():
    return [json.loads(line) for line in PROOFWRITER.read_text(encoding="utf-8").splitlines()]


def test_balance_false_keeps_every_selected_question_once(paper_records, paper_expected):
    unbalanced = read_proofwriter_file(PROOFWRITER, selection="paper", seed=0, balance=False)
    kept = {f"{tid}-{q}" for tid, t in paper_expected.items() for qids in t["kept"].values() for q in qids}
    ids = [r["id"] for r in unbalanced]
    assert len(ids) == len(set(ids)) and set(ids) == kept
    labels = Counter(r["answer"] for r in unbalanced)
    assert labels == {label: sum(len(t["kept"][label]) for t in paper_expected.values())
                      for label in ("yes", "no", "none")}
    assert labels["none"] == 297 and labels["yes"] > 297 and labels["no"] > 297
    assert len(unbalanced) > len(paper_records) == 891
    # the same tasks as the balanced reading, without the resampling (and so without the seed)
    first_copies = {r["id"]: r for r in paper_records if not re.search(r"-r\d+$", r["id"])}
    assert all(r == first_copies[r["id"]] for r in unbalanced if r["id"] in first_copies)
    assert read_proofwriter_file(PROOFWRITER, selection="paper", seed=1, balance=False) == unbalanced
    # balance has no effect under qdep; the config threads it to the reader
    assert read_proofwriter_file(PROOFWRITER, balance=False) == read_proofwriter_file(PROOFWRITER)
    cfg = DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[], selection="paper", balance=False)
    assert sum(len(v) for v in read_records(cfg).values()) == len(unbalanced)


def test_merged_proofs_take_the_sentences_of_every_alternative_proof(pw_records):
    shortest = by_id(pw_records)
    merged = by_id(read_proofwriter_file(PROOFWRITER, proofs="merged"))
    assert list(merged) == list(shortest)
    # independently: every triple / rule id the proofs string names, as sentences in theory order
    for theory in _theories():
        order = list(theory["sentences"])
        for qid, q in theory["questions"].items():
            record = merged[f"{theory['id']}-{qid}"]
            if q["answer"] == "Unknown":
                assert record == shortest[record["id"]]  # Unknown questions have no proof
                continue
            used = {theory["mappings"][i] for i in re.findall(r"(?:triple|rule)\d+", q["proofs"])}
            assert record["facts"] == [theory["sentences"][s].strip() for s in sorted(used, key=order.index)]
    more = 0
    for rid, record in merged.items():
        assert record["knowledge"] == shortest[rid]["knowledge"]
        assert set(shortest[rid]["facts"]) <= set(record["facts"])
        more += len(record["facts"]) > len(shortest[rid]["facts"])
    assert more > 0
    # the two-proof question of test_proofwriter_alternative_proofs_...: 5 sentences vs 6 + 5 merged
    q7 = "AttNonegNatLang-OWA-111-Q7"
    assert len(shortest[q7]["facts"]) == 5 and len(merged[q7]["facts"]) > 5

    # knowledge without distractors (data.distractors=0, what training sees) is never smaller
    def knowledge(proofs, selection):
        cfg = DataConfig(source="proofwriter", path=str(PROOFWRITER), hops=[], selection=selection, balance=False,
                         proofs=proofs, distractors=0, num_train=0, num_validation=0, num_test=0)
        return {r["id"]: r["knowledge"] for s in filter_splits(read_records(cfg), cfg).values() for r in s}

    short, wide = knowledge("shortest", "paper"), knowledge("merged", "paper")
    assert set(short) < set(wide)  # a merged proof of >= 2 sentences keeps every shortest-kept question, and more
    assert all(len(wide[i]) >= len(short[i]) for i in short)
    assert sum(len(wide[i]) > len(short[i]) for i in short) > 0


def test_balance_and_proofs_defaults_reproduce_the_current_reading_and_are_validated(paper_records):
    cfg = load_config()
    assert (cfg.data.balance, cfg.data.proofs) == (True, "shortest")
    assert (DataConfig().balance, DataConfig().proofs) == (True, "shortest")
    assert read_proofwriter_file(PROOFWRITER, "paper", 0, True, "shortest") == paper_records
    assert read_proofwriter(PROOFWRITER, 0.1, 0.1, 0, "paper", True, "shortest") == \
        read_proofwriter(PROOFWRITER, 0.1, 0.1, 0, "paper")
    cfg = load_config(None, ["data.balance=false", "data.proofs=merged"])
    assert (cfg.data.balance, cfg.data.proofs) == (False, "merged")
    with pytest.raises(ValueError, match=r"data.proofs='all' is invalid: choose one of \('shortest', 'merged'\)"):
        load_config(None, ["data.proofs=all"])
    with pytest.raises(ValueError, match="data.balance"):
        load_config(None, ["data.balance=sometimes"])
    with pytest.raises(ValueError, match=r"data.proofs='all' is invalid"):
        read_proofwriter_file(PROOFWRITER, proofs="all")
