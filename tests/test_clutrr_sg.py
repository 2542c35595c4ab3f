"""The CLUTRR-SG text reader (NicolasAG/SGinPG's release) against the CLUTRR CSV reader.

The fixture turns the shared CLUTRR CSV into SG lines the way SGinPG's ``scripts/csv2txt.py``
does (from the CLUTRR generator's columns: the story's relation templates in shuffled order, the
query and target templates, the proof from ``proof_state``, brackets stripped, Moses-tokenized), in
the release's layout (forward/{train,valid}/..., forward/test/{k}/...). The reader must then give,
for every row, the answer and hop count that ``read_clutrr_file`` gives for the same row.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path

import pytest

from conftest import CLUTRR_TEST, clutrr_sg_release, csv2txt_line, csv_rows, level_of
from reckoning_ray.core.schema import DataConfig
from reckoning_ray.core.data.clutrr import read_clutrr_file
from reckoning_ray.core.data.clutrr_sg import is_clutrr_sg, read_clutrr_sg, read_clutrr_sg_file, sg_file_info
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.sources import filter_splits, read_records
from reckoning_ray.data import main as data_main

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("clutrr_sg")
    return root / "forward", clutrr_sg_release(root)


@pytest.fixture(scope="module")
def csv_records():
    return {r["id"]: r for r in read_clutrr_file(CLUTRR_TEST)}


def _check_against_csv(records, where, csv_records):
    for record in records:
        name, line = record["id"].rsplit(":", 1)
        row = where[(name, int(line))]
        expected = csv_records[row["id"]]
        assert (record["answer"], record["hops"]) == (expected["answer"], expected["hops"]), record["id"]
        assert record["question"] == expected["question"], record["id"]
        assert len(record["knowledge"]) == level_of(row) == len(ast.literal_eval(row["edge_types"]))
        assert record["facts"] == record["knowledge"] and record["distractors"] == []


def test_every_converted_row_reads_back_with_the_csv_readers_answer_and_hops(release, csv_records):
    root, where = release
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("queries"))
    assert len(files) == 2 * (9 + 2 * 3)
    total = 0
    for file in files:
        records = read_clutrr_sg_file(file)
        _check_against_csv(records, where, csv_records)
        info = sg_file_info(file)
        assert {r["hops"] for r in records} == {int(info["level"])}
        total += len(records)
    assert total == 2 * len(csv_records) == 2 * 1146


def test_one_sg_line_becomes_one_record(tmp_path):
    line = ("<STORY> Kristie is the daughter of Sara . John is Kristie 's grandfather . <QUERY> How is Sara "
            "related to John ? <PROOF> Since John is the grandfather of Kristie , and Kristie is a daughter to "
            "Sara , then John is the father of Sara . <ANSWER> John is the father of Sara . \n")
    path = tmp_path / "short_proof_1.2_test_facts_ANON.txt"
    path.write_text(line, encoding="utf-8")
    [record] = read_clutrr_sg_file(path)
    assert record == {
        "id": "short_proof_1.2_test_facts_ANON:1", "family": "clutrr", "source": "clutrr",
        "knowledge": ["Kristie is the daughter of Sara.", "John is Kristie's grandfather."],
        "facts": ["Kristie is the daughter of Sara.", "John is Kristie's grandfather."], "distractors": [],
        "question": "How is John related to Sara?", "answer": "father", "hops": 2,
    }


def test_format_variants_genders_anonymised_names_reversed_tags_bare_answers_and_distractors(tmp_path):
    rows = [r for r in csv_rows() if level_of(r) == 3][:20]
    expected = {r["id"]: r for r in read_clutrr_file(CLUTRR_TEST)}
    rng = random.Random(1)
    path = tmp_path / "one_file.txt"  # not a release name: recognised by its first line
    path.write_text("".join(csv2txt_line(r, rng, gender_aware=True) for r in rows), encoding="utf-8")
    assert is_clutrr_sg(path) and sg_file_info(path) is None
    records = read_clutrr_sg_file(path)
    for record, row in zip(records, rows):
        assert (record["answer"], record["hops"], record["question"]) == \
            (expected[row["id"]]["answer"], 3, expected[row["id"]]["question"])
        assert not any("[" in k for k in record["knowledge"])  # Name[gender] -> Name

    anon = tmp_path / "short_proof_1.3_valid_facts_anon.txt.4000"
    anon.write_text("".join(csv2txt_line(r, rng, anonymise=True) for r in rows).replace("ent_", "ent _ "),
                    encoding="utf-8")
    for record, row in zip(read_clutrr_sg_file(anon), rows):
        assert (record["answer"], record["hops"]) == (expected[row["id"]]["answer"], 3)
        assert re.fullmatch(r"How is ent_\d+ related to ent_\d+\?", record["question"])

    # --reversed puts the answer before the proof; a bare relation word is an answer too; a story
    # sentence the short proof does not use is a distractor
    odd = tmp_path / "mixed.txt"
    odd.write_text(
        "<STORY> Ann is the sister of Bob . Carl is Dan 's son . Bob is a brother to Eve . <QUERY> How is Eve "
        "related to Ann ? <ANSWER> sister <PROOF> Since Bob is the brother of Eve , and Ann is the sister of Bob , "
        "then Ann is the sister of Eve . \n", encoding="utf-8")
    [record] = read_clutrr_sg_file(odd)
    assert (record["answer"], record["hops"], record["question"]) == ("sister", 2, "How is Ann related to Eve?")
    assert record["distractors"] == ["Carl is Dan's son."]
    assert record["facts"] == ["Ann is the sister of Bob.", "Bob is a brother to Eve."]


def test_a_directory_is_read_at_the_levels_of_the_hop_counts(release, csv_records):
    root, where = release

    def read(**keys):
        cfg = DataConfig(source="clutrr", family="clutrr", path=str(root.parent), distractors=-1, num_train=0,
                         num_validation=0, num_test=0, **keys)
        return filter_splits(read_records(cfg), cfg)

    # the authors' clutrr_4_hop: level-4 train / valid / test files only, short proofs read
    four = read(hops=[4])
    level4 = [r for r in csv_rows() if level_of(r) == 4]
    assert [len(four[s]) for s in ("train", "validation", "test")] == [len(level4[0::3]), len(level4[1::3]),
                                                                       len(level4[2::3])]
    assert {r["id"].split(":")[0] for s in four.values() for r in s} == {
        "short_proof_1.4_train_facts_anon", "short_proof_1.4_valid_facts_anon", "short_proof_1.4_test_facts_ANON"}
    for records in four.values():
        _check_against_csv(records, where, csv_records)

    # train on 2, test on every level
    wide = read(hops=[], train_hops=[2], validation_hops=[2])
    assert {r["hops"] for r in wide["train"]} == {r["hops"] for r in wide["validation"]} == {2}
    assert {r["hops"] for r in wide["test"]} == set(range(2, 11))
    levels = _levels()
    assert len(wide["train"]) + len(wide["validation"]) == len(levels[2][0::3]) + len(levels[2][1::3])
    assert len(wide["test"]) == sum(len(rows[2::3] if k in (2, 4, 6) else rows) for k, rows in levels.items())
    everything = read(hops=[])
    assert sum(len(v) for v in everything.values()) == 1146

    with pytest.raises(DataFormatError, match=r"expected CLUTRR-SG train files of level\(s\) \[3\] \(data.hops=\[3\]: "
                                              r"level 1.k = k hops\); the directory has train levels \[2, 4, 6\]: "
                                              r"set data.hops to some of them"):
        read(hops=[3])
    with pytest.raises(DataFormatError, match=r"data.test_hops=\[11\]"):
        read(hops=[2], test_hops=[11])
    # one file: its lines split by id like a single CSV
    single = read_clutrr_sg(root / "test" / "7" / "short_proof_1.7_test_facts_ANON.txt", None, 0.1, 0.1, 0)
    assert sum(len(v) for v in single.values()) == 144 and all(single.values())


def _levels() -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in csv_rows():
        out.setdefault(level_of(row), []).append(row)
    return out


def test_csv_sources_still_go_to_the_csv_reader_and_malformed_lines_name_file_and_line(tmp_path):
    assert not is_clutrr_sg(CLUTRR_TEST) and not is_clutrr_sg(CLUTRR_TEST.parent)
    cfg = DataConfig(source="clutrr", family="clutrr", path=str(CLUTRR_TEST), hops=[])
    assert sum(len(v) for v in read_records(cfg).values()) == 1146
    bad = tmp_path / "short_proof_1.2_train_facts_anon.txt.4000"
    good = ("<STORY> Ann is the sister of Bob . Bob is a brother to Eve . <QUERY> How is Eve related to Ann ? "
            "<PROOF> none <ANSWER> Ann is the sister of Eve . ")
    cases = {
        "<QUERY> How is A related to B ? <ANSWER> son": "expected a line starting with <STORY>",
        good.replace("<ANSWER> Ann is the sister of Eve .", "<ANSWER>"): r"expected tags .*missing or empty: \['<ANSWER>'\]",
        good.replace("sister of Eve .", "friend of Eve ."): "expected an answer that is a relation word",
        good.replace("<PROOF> none", "<PROOF> Ann is nice ."): "expected proof steps",
        good.replace("<PROOF> none", "<PROOF> Since Bob is the brother of Eve , and Ann is the sister of Bob , then "
                     "Ann is the sister of Eve . Since Bob is the brother of Eve , and Ann is the sister of Bob , "
                     "then Ann is the sister of Eve ."): r"expected a proof of 1 steps \(level 1.2",
        good.replace("Ann is the sister of Eve .", "Ann is the sister of Carl ."): "expected the answer to name the two people",
    }
    for text, message in cases.items():
        bad.write_text(good + "\n" + text + "\n", encoding="utf-8")
        with pytest.raises(DataFormatError, match=rf"{re.escape(str(bad))}, line 2: {message}"):
            read_clutrr_sg_file(bad)


def test_data_stats_reads_an_sg_directory(release, capsys):
    root, _ = release
    assert data_main(["stats", str(root.parent), "hops=2,4,6"]) == 0
    out = capsys.readouterr().out
    assert f"tasks in {root.parent} (clutrr)" in out
    total = sum(len(rows) for k, rows in _levels().items() if k in (2, 4, 6))
    assert re.search(rf"^total\s+{total:,}$", out, re.MULTILINE)
    assert data_main(["stats", str(root.parent), "hops=3"]) == 2
    assert "set data.hops to some of them" in capsys.readouterr().err


def test_real_release_names_are_recognised():
    for name, info in {
        "short_proof_1.4_train_facts_anon.txt.4000": ("short", "4", "train", "facts"),
        "no_proof_1.6_valid_amt_anon.txt.4000": ("no", "6", "validation", "amt"),
        "long_proof_1.10_test_facts_ANON.txt": ("long", "10", "test", "facts"),
    }.items():
        got = sg_file_info(Path("/data/forward/x") / name)
        assert (got["proof"], got["level"], got["split"], got["story"]) == info
    assert sg_file_info("1.2345678910_train.csv") is None
    assert sg_file_info("queries_1.2_test_facts_ANON.txt") is None  # query-only: no answers
