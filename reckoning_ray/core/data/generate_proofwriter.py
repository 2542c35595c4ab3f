"""Offline generator of ProofWriter-style theories (deterministic by seed).

Entities are lowercase names, attributes lowercase adjectives. Sentences are space-separated
lowercase tokens ending in " .", so a word-level tokenizer built from the corpus covers them:

    fact        "bob is red ."          "bob isnt red ."
    rule        "if someone is red and big then they are kind ."   (or "... they arent kind .")
    question    "bob is kind"           (no final period: the prompt adds "can we conclude ...?")

A question with ``hops = k`` needs exactly k rule applications (k = 0: a fact states it). The
answer follows the open-world reading: yes if "bob is kind" follows, no if "bob isnt kind"
follows, none if neither does. Each task is built around one chain of k rules
``A_0 -> A_1 -> ... -> A_k`` (``A_k`` the question's attribute; a rule may add an earlier chain
attribute as a second condition). For yes / no the base fact "bob is A_0 ." is stated; for none it
is replaced by a near miss (the same attribute of another entity, "bob isnt A_0 .", or another
attribute of bob), so the task has the same number of sentences whatever its label.

Distractors are sentences no proof of the answer uses, many of them hard negatives: the
question's attributes stated of other entities, other attributes stated of the question's entity,
rules that share the chain's attributes but conclude others, and a rule concluding the opposite
answer from a condition the entity never has. They are built so they can neither shorten the
proof nor contradict it.

``facts`` (schema) are the base fact and the chain rules; for none tasks the near miss and the
chain rules, i.e. what a reasoner must inspect to see that nothing follows (the same choice the
ProofWriter reader makes for "Unknown" questions).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

from reckoning_ray.core.data.schema import Record, make_record

PW_ENTITIES = (
    "bob", "alice", "charlie", "dave", "erin", "fiona", "gary", "harry", "anne", "eric", "grace",
    "henry", "iris", "jack", "kate", "leo", "mia", "nick", "olga", "paul", "quinn", "rose", "sam",
    "tina", "uma", "victor", "wendy", "xena", "yuri", "zoe", "adam", "bella",
)
PW_ATTRIBUTES = (
    "red", "big", "kind", "round", "cold", "nice", "young", "green", "blue", "rough", "quiet",
    "smart", "white", "furry", "rich", "tall", "calm", "brave", "happy", "shy", "small", "old",
    "loud", "wise", "quick", "slow", "soft", "hard", "warm", "wet", "dry", "strong",
)


def pw_fact(entity: str, attribute: str, positive: bool) -> str:
    """``bob is red .`` / ``bob isnt red .``"""
    return f"{entity} {'is' if positive else 'isnt'} {attribute} ."


def pw_rule(conditions: Sequence[str], conclusion: str, positive: bool) -> str:
    """``if someone is red and big then they are kind .`` (or ``... they arent kind .``)"""
    return f"if someone is {' and '.join(conditions)} then they {'are' if positive else 'arent'} {conclusion} ."


def pw_question(entity: str, attribute: str) -> str:
    """``bob is kind`` (no final period and no "?": the prompt template adds them)."""
    return f"{entity} is {attribute}"


def question_pairs(
    num_entities: int,
    num_attributes: int,
    holdout: bool,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[tuple[str, str]]]:
    """(entity, attribute) pairs each split may ask about.

    Without holdout every split asks about all pairs. With holdout, validation and test each get
    their own ``max(1, round(fraction * pairs))`` pairs that training never asks about, chosen so
    that every entity and every attribute is still asked about in training.
    """
    if not 1 <= num_entities <= len(PW_ENTITIES):
        raise ValueError(f"data.generator.num_entities={num_entities} is invalid: choose 1..{len(PW_ENTITIES)}")
    if not 1 <= num_attributes <= len(PW_ATTRIBUTES):
        raise ValueError(f"data.generator.num_attributes={num_attributes} is invalid: choose 1..{len(PW_ATTRIBUTES)}")
    pairs = [(e, a) for e in PW_ENTITIES[:num_entities] for a in PW_ATTRIBUTES[:num_attributes]]
    if not holdout:
        return {"train": pairs, "validation": pairs, "test": pairs}
    order = list(pairs)
    random.Random(f"holdout:{seed}").shuffle(order)
    per_entity = {e: num_attributes for e in PW_ENTITIES[:num_entities]}
    per_attribute = {a: num_entities for a in PW_ATTRIBUTES[:num_attributes]}
    held: dict[str, list[tuple[str, str]]] = {"validation": [], "test": []}
    for split, fraction in (("validation", validation_fraction), ("test", test_fraction)):
        want = max(1, round(fraction * len(pairs)))
        for pair in order:
            if len(held[split]) == want:
                break
            e, a = pair
            if pair in held["validation"] or pair in held["test"] or per_entity[e] <= 1 or per_attribute[a] <= 1:
                continue
            held[split].append(pair)
            per_entity[e] -= 1
            per_attribute[a] -= 1
        if len(held[split]) < want:
            raise ValueError(
                f"cannot hold out {want} {split} question pairs of {num_entities} entities x {num_attributes} "
                f"attributes and still ask about every entity and attribute in training: raise "
                f"data.generator.num_entities / num_attributes or set data.generator.holdout_pairs=false"
            )
    taken = set(held["validation"]) | set(held["test"])
    return {"train": [p for p in pairs if p not in taken], **held}


def _schedule(
    pairs: Sequence[tuple[str, str]], labels: Sequence[str], hops: Sequence[int], n: int, rng: random.Random
) -> list[tuple[tuple[str, str], str, int]]:
    """n (pair, label, hops) triples in which every pair is asked with every label equally often.

    Pairs are visited in shuffled rounds and each visit emits the pair once with every label (one
    hop count for the whole group, cycling through ``hops``), so per question the label counts
    differ by at most one, and per hop count the labels stay balanced.
    """
    out: list[tuple[tuple[str, str], str, int]] = []
    group = 0
    while len(out) < n:
        order = list(pairs)
        rng.shuffle(order)
        for pair in order:
            k = hops[group % len(hops)]
            group += 1
            group_labels = list(labels)
            rng.shuffle(group_labels)
            out.extend((pair, label, k) for label in group_labels)
            if len(out) >= n:
                break
    out = out[:n]
    rng.shuffle(out)
    return out


class _ChainTask:
    """The sentences of one ProofWriter-style task asking ``entity is target`` with k hops, built
    around the chain ``A_0 -> ... -> A_k`` (``A_k`` = target).

    Every random choice comes from ``rng``, in the order the methods are called by
    ``_proofwriter_task``, so a seed always gives the same task.
    """

    def __init__(self, rng: random.Random, entity: str, target: str, label: str, k: int,
                 entities: Sequence[str], attributes: Sequence[str]):
        others = [a for a in attributes if a != target]
        if k > len(others):
            raise ValueError(
                f"a {k}-hop question needs {k + 1} attributes but data.generator.num_attributes={len(attributes)}: "
                f"raise num_attributes or lower data.hops"
            )
        self.rng, self.entity, self.target, self.label, self.k = rng, entity, target, label, k
        self.entities, self.attributes = entities, attributes
        self.chain = rng.sample(others, k) + [target]  # A_0 ... A_k
        self.free = [a for a in attributes if a not in self.chain]
        self.other_entities = [e for e in entities if e != entity]
        # One polarity per free attribute, so facts and rules about it never contradict each other.
        self.polarity = {a: rng.random() < 0.5 for a in self.free}
        # A free attribute the entity never has (only ever negated): the condition of the rule that
        # would conclude the opposite answer.
        self.blocker = rng.choice(self.free) if self.free and k >= 1 else None
        if self.blocker is not None:
            self.polarity[self.blocker] = False
        self.final = {"yes": True, "no": False}.get(label, rng.random() < 0.5)
        # Other entities' facts about a one-hop question's attribute get a random polarity, fixed per
        # (entity, attribute) so that two distractors never contradict each other.
        self._other_polarity: dict[str, bool] = {}

    def other_positive(self, o: str) -> bool:
        return self._other_polarity.setdefault(o, self.rng.random() < 0.5)

    def chain_rules(self) -> list[str]:
        """The k rules ``A_{i-1} -> A_i``, the last one concluding the answer's polarity."""
        chain, k, rng = self.chain, self.k, self.rng
        rules = []
        for i in range(1, k + 1):
            conditions = [chain[i - 1]]
            if i >= 2 and rng.random() < 0.5:
                conditions.append(rng.choice(chain[: i - 1]))
                rng.shuffle(conditions)
            rules.append(pw_rule(conditions, chain[i], self.final if i == k else True))
        return rules

    def near_misses(self) -> list[list[str]]:
        # Groups by kind, so each kind is equally likely whatever the pool sizes.
        entity, chain, free = self.entity, self.chain, self.free
        if self.k == 0:
            groups = [[pw_fact(o, self.target, self.other_positive(o)) for o in self.other_entities],
                      [pw_fact(entity, a, self.polarity[a]) for a in free]]
        else:
            groups = [[pw_fact(o, chain[0], True) for o in self.other_entities],
                      [pw_fact(entity, chain[0], False)],
                      [pw_fact(entity, a, self.polarity[a]) for a in free]]
        return [g for g in groups if g]

    def base_fact(self) -> str:
        """``bob is A_0 .`` for yes / no (the question's own fact when k = 0), a near miss for none."""
        if self.label == "none":
            return self.rng.choice(self.rng.choice(self.near_misses()))
        if self.k:
            return pw_fact(self.entity, self.chain[0], True)
        return pw_fact(self.entity, self.target, self.final)

    def other_entity_fact(self) -> Optional[str]:
        # Same attribute, other name: the chain attributes of another entity, with the polarity
        # the chain itself would give that entity.
        if not self.other_entities:
            return None
        rng, k = self.rng, self.k
        j = rng.randrange(k + 1)
        o = rng.choice(self.other_entities)
        positive = self.other_positive(o) if k == 0 else (self.final if j == k else True)
        return pw_fact(o, self.chain[j], positive)

    def same_entity_fact(self) -> Optional[str]:
        # Same name, other attribute.
        if not self.free:
            return None
        a = self.rng.choice(self.free)
        return pw_fact(self.entity, a, self.polarity[a])

    def side_rule(self) -> Optional[str]:
        # A rule that may fire (its conditions can be chain attributes) but concludes a free
        # attribute, which no chain rule uses.
        if not self.free:
            return None
        rng = self.rng
        conclusion = rng.choice(self.free)
        pool = [a for a in self.chain + self.free if a != conclusion]
        if not pool:
            return None
        conditions = rng.sample(pool, min(len(pool), rng.choice((1, 2))))
        return pw_rule(conditions, conclusion, self.polarity[conclusion])

    def opposite_rule(self) -> Optional[str]:
        # Concludes the opposite answer about the question's attribute from the blocker, which
        # the entity never has: the rule never fires for it.
        if self.blocker is None:
            return None
        return pw_rule([self.blocker], self.target, not self.final)

    def distractors(self, num_distractors: int, num_rules: int, used: set[str]) -> list[str]:
        """``num_distractors`` distinct sentences not in ``used``, at most ``num_rules - k`` of
        them rules."""
        k, rng = self.k, self.rng
        fact_makers = [self.other_entity_fact, self.same_entity_fact]
        rule_makers = [self.side_rule, self.opposite_rule] if k >= 1 else []
        rule_budget = max(0, num_rules - k)
        distractors: list[str] = []
        attempts = 0
        while len(distractors) < num_distractors:
            attempts += 1
            if attempts > 200 * (num_distractors + 1):
                raise ValueError(
                    f"cannot find {num_distractors} distinct distractors for a {k}-hop task with "
                    f"{len(self.entities)} entities and {len(self.attributes)} attributes: lower data.distractors or "
                    f"raise data.generator.num_entities / num_attributes"
                )
            makers = fact_makers + (rule_makers if rule_budget > 0 else [])
            maker = rng.choice(makers)
            sentence = maker()
            if sentence is None or sentence in used:
                continue
            used.add(sentence)
            distractors.append(sentence)
            if maker in rule_makers:
                rule_budget -= 1
        return distractors


def _proofwriter_task(
    rng: random.Random,
    entity: str,
    target: str,
    label: str,
    k: int,
    num_distractors: int,
    entities: Sequence[str],
    attributes: Sequence[str],
    num_rules: int,
) -> tuple[list[str], list[str]]:
    """(knowledge, facts) of one ProofWriter-style task asking ``entity is target`` with k hops."""
    task = _ChainTask(rng, entity, target, label, k, entities, attributes)
    rules = task.chain_rules()
    facts = [task.base_fact()] + rules
    distractors = task.distractors(num_distractors, num_rules, set(facts))
    knowledge = facts + distractors
    rng.shuffle(knowledge)
    return knowledge, facts


def generate_proofwriter(
    n: int,
    hops: Sequence[int],
    labels: Sequence[str],
    num_distractors: int,
    pairs: Sequence[tuple[str, str]],
    num_entities: int,
    num_attributes: int,
    num_rules: int,
    rng: random.Random,
    split: str,
) -> list[Record]:
    """n ProofWriter-style records asking only about ``pairs``, labels balanced per question."""
    entities = PW_ENTITIES[:num_entities]
    attributes = PW_ATTRIBUTES[:num_attributes]
    records = []
    for i, ((entity, target), label, k) in enumerate(_schedule(pairs, labels, hops, n, rng)):
        knowledge, facts = _proofwriter_task(rng, entity, target, label, k, num_distractors, entities,
                                             attributes, num_rules)
        records.append(make_record(id=f"generated-proofwriter-{split}-{i}", family="proofwriter", source="generated",
                                   knowledge=knowledge, facts=facts, question=pw_question(entity, target),
                                   answer=label, hops=k))
    return records

