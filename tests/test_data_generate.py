"""Offline generators: every answer re-derived by the independent solvers, determinism, label
balance, held-out question pairs and the calibration task of the embedded preset."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from reckoning_ray.core.schema import DataConfig
from reckoning_ray.core.data.generate import generate_splits
from reckoning_ray.core.data.generate_proofwriter import PW_ATTRIBUTES, PW_ENTITIES
from reckoning_ray.core.data.relations import CLUTRR_RELATIONS
from reckoning_ray.core.data.solvers import solve_clutrr, solve_proofwriter

SPLITS = ("train", "validation", "test")


def config(family="proofwriter", hops=(0,), distractors=0, labels=("yes", "no"), n=(200, 40, 40), seed=0, **gen):
    cfg = DataConfig(family=family, hops=list(hops), distractors=distractors, num_train=n[0], num_validation=n[1],
                     num_test=n[2], seed=seed)
    cfg.generator.labels = list(labels)
    for key, value in gen.items():
        setattr(cfg.generator, key, value)
    return cfg


def all_records(splits):
    return [r for s in SPLITS for r in splits[s]]


# --------------------------------------------------------------------------------------------- the solvers themselves


def test_proofwriter_solver_on_hand_written_theories():
    theory = ["bob is red .", "if someone is red then they are big .", "if someone is big and red then they arent kind .",
              "anne is cold ."]
    assert solve_proofwriter(theory, "bob is red") == ("yes", 0)
    assert solve_proofwriter(theory, "bob is big") == ("yes", 1)
    assert solve_proofwriter(theory, "bob is kind") == ("no", 2)
    # anne is not red: the two rules towards "kind" fail two deep
    assert solve_proofwriter(theory, "anne is kind") == ("none", 2)
    assert solve_proofwriter(theory, "anne is cold") == ("yes", 0)
    assert solve_proofwriter(theory, "anne is quiet") == ("none", 0)
    with pytest.raises(ValueError, match="derives both polarities"):
        solve_proofwriter(theory + ["if someone is red then they are kind ."], "bob is kind")
    with pytest.raises(ValueError, match="contradicting facts"):
        solve_proofwriter(["bob is red .", "bob isnt red ."], "bob is red")
    with pytest.raises(ValueError, match="cannot parse sentence"):
        solve_proofwriter(["Bob is red."], "bob is red")


def test_clutrr_solver_on_hand_written_families():
    assert solve_clutrr(["james is the father of mary .", "john is the brother of james ."],
                        "How is john related to mary?") == ("uncle", 2)
    assert solve_clutrr(["john is the husband of mary .", "linda is the mother of john ."],
                        "How is linda related to mary?") == ("mother-in-law", 2)
    assert solve_clutrr(["mary is the sister of john .", "paul is the husband of mary .", "kevin is the son of paul ."],
                        "How is kevin related to john?") == ("nephew", 3)
    # the mother of mary's son is mary herself, so his father is her husband
    assert solve_clutrr(["john is the son of mary .", "james is the father of john ."],
                        "How is james related to mary?") == ("husband", 2)
    # the answer's gender comes from a fact about that person
    with pytest.raises(ValueError, match="do not say who mary and john are"):
        solve_clutrr(["james is the father of mary .", "john is the brother of james ."], "How is mary related to john?")
    assert solve_clutrr(["mary is the daughter of james .", "john is the brother of james ."],
                        "How is mary related to john?") == ("niece", 2)
    with pytest.raises(ValueError, match="not defined or not unique"):  # a cousin
        solve_clutrr(["james is the father of mary .", "john is the brother of james .", "paul is the son of john ."],
                     "How is paul related to mary?")
    with pytest.raises(ValueError, match="cannot all be members of one couple"):  # two fathers
        solve_clutrr(["james is the father of mary .", "john is the father of mary ."], "How is john related to mary?")
    with pytest.raises(ValueError, match="do not connect"):
        solve_clutrr(["james is the father of mary .", "john is the father of lisa ."], "How is john related to mary?")


# --------------------------------------------------------------------------------------------- answers re-derived


@pytest.mark.parametrize("distractors", [0, 2, 6])
def test_every_proofwriter_answer_and_hop_count_is_rederived(distractors):
    cfg = config(hops=range(7), distractors=distractors, labels=("yes", "no", "none"), n=(420, 42, 42), seed=distractors)
    records = all_records(generate_splits(cfg))
    assert len(records) == 504
    for r in records:
        assert solve_proofwriter(r["knowledge"], r["question"]) == (r["answer"], r["hops"]), r
        assert len(r["distractors"]) == distractors
        rules = [s for s in r["facts"] if s.startswith("if ")]
        assert len(rules) == r["hops"]  # the proof: k rules plus its base (or near-miss) fact
    combos = Counter((r["hops"], r["answer"]) for r in records)
    assert set(combos) == {(k, a) for k in range(7) for a in ("yes", "no", "none")}
    assert max(combos.values()) - min(combos.values()) <= 4


@pytest.mark.parametrize("distractors", [0, 2])
def test_every_clutrr_answer_and_hop_count_is_rederived(distractors):
    cfg = config(family="clutrr", hops=range(1, 7), distractors=distractors, n=(300, 30, 30), seed=distractors)
    records = all_records(generate_splits(cfg))
    for r in records:
        assert solve_clutrr(r["knowledge"], r["question"]) == (r["answer"], r["hops"]), r
        assert len(r["facts"]) == r["hops"] and len(r["distractors"]) == distractors
        assert r["answer"] in CLUTRR_RELATIONS
    assert Counter(r["hops"] for r in records) == {k: 60 for k in range(1, 7)}
    assert len({r["answer"] for r in records}) >= 18


def test_clutrr_generator_covers_the_gendered_relation_set_and_longer_chains():
    records = all_records(generate_splits(config(family="clutrr", hops=range(1, 7), n=(600, 0, 0), seed=5)))
    assert {r["answer"] for r in records} == set(CLUTRR_RELATIONS)
    assert len(CLUTRR_RELATIONS) == 22
    longer = all_records(generate_splits(config(family="clutrr", hops=[7, 8], distractors=1, n=(20, 0, 0))))
    for r in longer:
        assert solve_clutrr(r["knowledge"], r["question"]) == (r["answer"], r["hops"])


def test_clutrr_facts_follow_the_documented_convention():
    r = generate_splits(config(family="clutrr", hops=[1], n=(30, 0, 0), seed=2))["train"]
    for record in r:
        (fact,) = record["knowledge"]
        subject, word, other = re.fullmatch(r"(\w+) is the ([\w-]+) of (\w+) \.", fact).groups()
        # "How is subject related to other?" is answered by the fact's own relation word
        assert record["question"] == f"How is {subject} related to {other}?"
        assert record["answer"] == word


# --------------------------------------------------------------------------------------------- determinism


def test_generation_is_deterministic_by_seed():
    for family, hops in (("proofwriter", range(4)), ("clutrr", range(1, 4))):
        a = generate_splits(config(family=family, hops=hops, distractors=2, labels=("yes", "no", "none"), seed=7))
        b = generate_splits(config(family=family, hops=hops, distractors=2, labels=("yes", "no", "none"), seed=7))
        c = generate_splits(config(family=family, hops=hops, distractors=2, labels=("yes", "no", "none"), seed=8))
        assert a == b
        assert [r["knowledge"] for r in a["train"]] != [r["knowledge"] for r in c["train"]]
        # splits differ from each other
        assert [r["knowledge"] for r in a["validation"]] != [r["knowledge"] for r in a["test"]]


# --------------------------------------------------------------------------------------------- calibration task


def test_one_fact_calibration_task_is_balanced_and_holds_out_question_pairs():
    splits = generate_splits(config(hops=[0], labels=("yes", "no"), n=(1024, 128, 128), num_entities=8,
                                    num_attributes=8, holdout_pairs=True))
    questions = {s: {r["question"] for r in splits[s]} for s in SPLITS}
    assert [len(questions[s]) for s in SPLITS] == [52, 6, 6]  # 64 pairs, round(0.1 * 64) held out twice
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"] and not questions["validation"] & questions["test"]
    asked = [q.split() for q in questions["train"]]
    assert {e for e, _, _ in asked} == set(PW_ENTITIES[:8]) and {a for _, _, a in asked} == set(PW_ATTRIBUTES[:8])
    for split in SPLITS:
        per_question = defaultdict(Counter)
        for r in splits[split]:
            entity, _, attribute = r["question"].split()
            assert r["hops"] == 0 and r["distractors"] == []
            fact = f"{entity} is {attribute} ." if r["answer"] == "yes" else f"{entity} isnt {attribute} ."
            assert r["knowledge"] == r["facts"] == [fact]
            per_question[r["question"]][r["answer"]] += 1
        # every question comes with both labels, equally often (within one)
        assert all(set(c) == {"yes", "no"} and abs(c["yes"] - c["no"]) <= 1 for c in per_question.values())
        labels = Counter(r["answer"] for r in splits[split])
        assert abs(labels["yes"] - labels["no"]) <= 1
        # so the best guess from the question alone is a coin flip
        best = sum(max(c.values()) for c in per_question.values()) / len(splits[split])
        assert best <= 0.53


def test_holdout_off_asks_every_pair_in_every_split():
    splits = generate_splits(config(hops=[0], n=(256, 128, 128), num_entities=4, num_attributes=4, holdout_pairs=False))
    assert all(len({r["question"] for r in splits[s]}) == 16 for s in SPLITS)


def test_one_distractor_tasks_have_two_facts_and_none_has_no_fact_about_the_pair():
    splits = generate_splits(config(hops=[0], distractors=1, labels=("yes", "no", "none"), n=(600, 60, 60)))
    records = all_records(splits)
    assert Counter(r["answer"] for r in splits["train"]) == {"yes": 200, "no": 200, "none": 200}
    for r in records:
        entity, _, attribute = r["question"].split()
        assert len(r["knowledge"]) == 2 and len(r["facts"]) == 1 and len(r["distractors"]) == 1
        about_pair = [s for s in r["knowledge"] if re.fullmatch(rf"{entity} (is|isnt) {attribute} \.", s)]
        assert len(about_pair) == (0 if r["answer"] == "none" else 1)
        for sentence in r["knowledge"]:
            if sentence in about_pair:
                continue
            e, _, a, _ = sentence.split()
            # hard negatives: the same name with another attribute or the same attribute of another name
            assert (e == entity) != (a == attribute), sentence


def test_sentences_are_simple_lowercase_tokens():
    records = all_records(generate_splits(config(hops=range(7), distractors=3, labels=("yes", "no", "none"))))
    records += all_records(generate_splits(config(family="clutrr", hops=range(1, 7), distractors=3)))
    for r in records:
        for sentence in r["knowledge"]:
            assert re.fullmatch(r"[a-z-]+( [a-z-]+)* \.", sentence), sentence
        if r["family"] == "proofwriter":
            assert re.fullmatch(r"[a-z]+ is [a-z]+", r["question"])
        else:
            assert re.fullmatch(r"How is [a-z]+ related to [a-z]+\?", r["question"])


def test_rules_per_theory_follow_num_rules():
    splits = generate_splits(config(hops=[1, 2, 6], distractors=6, labels=("yes", "no", "none"), num_rules=4))
    for r in all_records(splits):
        rules = sum(s.startswith("if ") for s in r["knowledge"])
        assert rules == r["hops"] if r["hops"] >= 4 else r["hops"] <= rules <= 4


# --------------------------------------------------------------------------------------------- errors


def test_bad_generator_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"data.hops=\[0, 1\] is invalid for data.family=clutrr"):
        generate_splits(config(family="clutrr", hops=[0, 1]))
    with pytest.raises(ValueError, match=r"data.generator.labels=\['yes', 'maybe'\] is invalid"):
        generate_splits(config(labels=("yes", "maybe")))
    with pytest.raises(ValueError, match=r"a 6-hop question needs 7 attributes but data.generator.num_attributes=4"):
        generate_splits(config(hops=[6], num_attributes=4))
    with pytest.raises(ValueError, match=r"cannot hold out .* validation question pairs of 1 entities"):
        generate_splits(config(num_entities=1, num_attributes=8))
    # YAML 1.1 turns an unquoted yes / no into booleans; they still mean the labels
    splits = generate_splits(config(labels=("True", "False"), n=(8, 2, 2)))
    assert {r["answer"] for r in splits["train"]} == {"yes", "no"}
