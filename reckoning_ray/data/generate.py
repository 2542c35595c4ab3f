"""Offline task generators (deterministic by seed) and the independent solvers that check them.

ProofWriter-style theories
--------------------------
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

CLUTRR-style family chains
--------------------------
Facts read "alice is the mother of bob ." meaning alice is bob's mother (the subject comes first,
the relation word is the subject's relation to the object). A chain of k such facts links
``p_0 ... p_k``; the question "How is p_k related to p_0?" asks for p_k's relation to p_0, the
direction of the CLUTRR reader (CLUTRR's target is the relation of query[1] to query[0]).
Chains are random walks over a random family tree (couples with children, spouses married in
with their own parents and siblings), so the facts are always consistent. The answer is the
composition of the walk's relation types through ``COMPOSE``; walks whose composition is not
defined (cousins, great-grandparents, ...) or not unique (a grandparent's child is a parent or
an uncle) are rejected. Distractors are true facts of the same tree about other people.

Independent solvers
-------------------
``solve_proofwriter`` (forward chaining over the parsed sentences) and ``solve_clutrr`` (a family
graph rebuilt from the sentences, relation read off the path between the two people) use only the
knowledge text and the question, never the generator's bookkeeping. Tests check every generated
answer and hop count with them.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from reckoning_ray.data.schema import PROOFWRITER_LABELS, make_record

Record = dict[str, Any]

# Used when data.distractors = -1 ("all the source has") for generated data.
DEFAULT_GENERATED_DISTRACTORS = 2
# Hop counts generated when data.hops is empty.
DEFAULT_PROOFWRITER_HOPS = (0, 1, 2, 3, 4, 5, 6)
DEFAULT_CLUTRR_HOPS = (1, 2, 3, 4, 5, 6)

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

MALE_NAMES = (
    "james", "john", "robert", "michael", "william", "david", "richard", "joseph", "thomas",
    "charles", "daniel", "matthew", "anthony", "mark", "donald", "steven", "paul", "andrew",
    "joshua", "kevin", "brian", "george", "edward", "ronald", "timothy", "jason", "jeffrey",
    "ryan", "jacob", "gary",
)
FEMALE_NAMES = (
    "mary", "patricia", "jennifer", "linda", "elizabeth", "barbara", "susan", "jessica", "sarah",
    "karen", "nancy", "lisa", "betty", "margaret", "sandra", "ashley", "kimberly", "emily",
    "donna", "michelle", "dorothy", "carol", "amanda", "melissa", "deborah", "stephanie",
    "rebecca", "sharon", "laura", "cynthia",
)

# Gender-neutral relation types -> (male word, female word). The first four are the primitive
# relations a fact may state; the others only appear as answers.
RELATION_WORDS: dict[str, tuple[str, str]] = {
    "parent": ("father", "mother"),
    "child": ("son", "daughter"),
    "sibling": ("brother", "sister"),
    "spouse": ("husband", "wife"),
    "grandparent": ("grandfather", "grandmother"),
    "grandchild": ("grandson", "granddaughter"),
    "pibling": ("uncle", "aunt"),
    "nibling": ("nephew", "niece"),
    "parent-in-law": ("father-in-law", "mother-in-law"),
    "child-in-law": ("son-in-law", "daughter-in-law"),
    "sibling-in-law": ("brother-in-law", "sister-in-law"),
}
PRIMITIVE_TYPES = ("parent", "child", "sibling", "spouse")
CLUTRR_RELATIONS = tuple(w for pair in RELATION_WORDS.values() for w in pair)

# (relation type of p to p_0, primitive type of q to p) -> relation type of q to p_0, assuming the
# family model of the generator: couples are monogamous, every child has both parents of one
# couple, siblings share both parents, and different names are different people. Pairs not listed
# are undefined in the relation set (cousin, great-grandparent, ...) or not unique from the words
# alone (a grandparent's child is a parent or an uncle; a nephew's father is a brother or a
# brother-in-law); the generator never composes through them.
COMPOSE: dict[tuple[str, str], str] = {
    ("parent", "parent"): "grandparent",
    ("parent", "child"): "sibling",
    ("parent", "sibling"): "pibling",
    ("parent", "spouse"): "parent",
    ("child", "child"): "grandchild",
    ("child", "sibling"): "child",
    ("child", "spouse"): "child-in-law",
    ("sibling", "parent"): "parent",
    ("sibling", "child"): "nibling",
    ("sibling", "sibling"): "sibling",
    ("sibling", "spouse"): "sibling-in-law",
    ("spouse", "parent"): "parent-in-law",
    ("spouse", "child"): "child",
    ("spouse", "sibling"): "sibling-in-law",
    ("grandparent", "spouse"): "grandparent",
    ("grandchild", "sibling"): "grandchild",
    ("pibling", "spouse"): "pibling",
    ("nibling", "sibling"): "nibling",
    ("parent-in-law", "spouse"): "parent-in-law",
    ("child-in-law", "child"): "grandchild",
    ("child-in-law", "spouse"): "child",
    ("sibling-in-law", "child"): "nibling",
}


# ---------------------------------------------------------------------------------------------
# ProofWriter-style generator
# ---------------------------------------------------------------------------------------------


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
    others = [a for a in attributes if a != target]
    if k > len(others):
        raise ValueError(
            f"a {k}-hop question needs {k + 1} attributes but data.generator.num_attributes={len(attributes)}: "
            f"raise num_attributes or lower data.hops"
        )
    chain = rng.sample(others, k) + [target]  # A_0 ... A_k
    free = [a for a in attributes if a not in chain]
    other_entities = [e for e in entities if e != entity]
    # One polarity per free attribute, so facts and rules about it never contradict each other.
    polarity = {a: rng.random() < 0.5 for a in free}
    # A free attribute the entity never has (only ever negated): the condition of the rule that
    # would conclude the opposite answer.
    blocker = rng.choice(free) if free and k >= 1 else None
    if blocker is not None:
        polarity[blocker] = False
    final = {"yes": True, "no": False}.get(label, rng.random() < 0.5)
    # Other entities' facts about a one-hop question's attribute get a random polarity, fixed per
    # (entity, attribute) so that two distractors never contradict each other.
    other_polarity: dict[str, bool] = {}

    def other_positive(o: str) -> bool:
        return other_polarity.setdefault(o, rng.random() < 0.5)

    rules = []
    for i in range(1, k + 1):
        conditions = [chain[i - 1]]
        if i >= 2 and rng.random() < 0.5:
            conditions.append(rng.choice(chain[: i - 1]))
            rng.shuffle(conditions)
        rules.append(pw_rule(conditions, chain[i], final if i == k else True))

    def near_misses() -> list[list[str]]:
        # Groups by kind, so each kind is equally likely whatever the pool sizes.
        if k == 0:
            groups = [[pw_fact(o, target, other_positive(o)) for o in other_entities],
                      [pw_fact(entity, a, polarity[a]) for a in free]]
        else:
            groups = [[pw_fact(o, chain[0], True) for o in other_entities],
                      [pw_fact(entity, chain[0], False)],
                      [pw_fact(entity, a, polarity[a]) for a in free]]
        return [g for g in groups if g]

    if label == "none":
        base = rng.choice(rng.choice(near_misses()))
    else:
        base = pw_fact(entity, chain[0], True) if k else pw_fact(entity, target, final)
    facts = [base] + rules
    used = set(facts)

    def other_entity_fact() -> Optional[str]:
        # Same attribute, other name: the chain attributes of another entity, with the polarity
        # the chain itself would give that entity.
        if not other_entities:
            return None
        j = rng.randrange(k + 1)
        o = rng.choice(other_entities)
        positive = other_positive(o) if k == 0 else (final if j == k else True)
        return pw_fact(o, chain[j], positive)

    def same_entity_fact() -> Optional[str]:
        # Same name, other attribute.
        if not free:
            return None
        a = rng.choice(free)
        return pw_fact(entity, a, polarity[a])

    def side_rule() -> Optional[str]:
        # A rule that may fire (its conditions can be chain attributes) but concludes a free
        # attribute, which no chain rule uses.
        if not free:
            return None
        conclusion = rng.choice(free)
        pool = [a for a in chain + free if a != conclusion]
        if not pool:
            return None
        conditions = rng.sample(pool, min(len(pool), rng.choice((1, 2))))
        return pw_rule(conditions, conclusion, polarity[conclusion])

    def opposite_rule() -> Optional[str]:
        # Concludes the opposite answer about the question's attribute from the blocker, which
        # the entity never has: the rule never fires for it.
        if blocker is None:
            return None
        return pw_rule([blocker], target, not final)

    fact_makers = [other_entity_fact, same_entity_fact]
    rule_makers = [side_rule, opposite_rule] if k >= 1 else []
    rule_budget = max(0, num_rules - k)
    distractors: list[str] = []
    attempts = 0
    while len(distractors) < num_distractors:
        attempts += 1
        if attempts > 200 * (num_distractors + 1):
            raise ValueError(
                f"cannot find {num_distractors} distinct distractors for a {k}-hop task with "
                f"{len(entities)} entities and {len(attributes)} attributes: lower data.distractors or raise "
                f"data.generator.num_entities / num_attributes"
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


# ---------------------------------------------------------------------------------------------
# CLUTRR-style generator
# ---------------------------------------------------------------------------------------------


@dataclass
class _Person:
    male: bool
    parents: Optional[int] = None  # index of the couple this person is a child of
    marriage: Optional[int] = None  # index of the couple this person is a member of


@dataclass
class _Couple:
    members: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)


class FamilyTree:
    """A random family: founders, their descendants over ``generations``, and spouses married in
    with their own parents and siblings (so in-law chains exist)."""

    def __init__(self, rng: random.Random, generations: int = 4):
        self.people: list[_Person] = []
        self.couples: list[_Couple] = []
        self._rng = rng
        founders = self._couple(self._person(True), self._person(False))
        self._descend(founders, 1, generations)

    def _person(self, male: bool, parents: Optional[int] = None) -> int:
        self.people.append(_Person(male=male, parents=parents))
        if parents is not None:
            self.couples[parents].children.append(len(self.people) - 1)
        return len(self.people) - 1

    def _couple(self, a: int, b: int) -> int:
        self.couples.append(_Couple(members=[a, b]))
        index = len(self.couples) - 1
        self.people[a].marriage = self.people[b].marriage = index
        return index

    def _descend(self, couple: int, generation: int, generations: int) -> None:
        if generation >= generations:
            return
        rng = self._rng
        for _ in range(rng.randint(2, 4)):
            child = self._person(rng.random() < 0.5, parents=couple)
            if generation + 1 < generations and rng.random() < 0.8:
                spouse = self._person(not self.people[child].male)
                if rng.random() < 0.6:
                    # The spouse's own family: parents and 0-2 siblings.
                    in_laws = self._couple(self._person(True), self._person(False))
                    self.people[spouse].parents = in_laws
                    self.couples[in_laws].children.append(spouse)
                    for _ in range(rng.randint(0, 2)):
                        self._person(rng.random() < 0.5, parents=in_laws)
                self._descend(self._couple(child, spouse), generation + 1, generations)

    def neighbours(self, p: int) -> list[tuple[int, str]]:
        """(q, type) for every q whose primitive relation to p is ``type`` (q is p's <type>)."""
        person = self.people[p]
        out = []
        if person.parents is not None:
            couple = self.couples[person.parents]
            out += [(m, "parent") for m in couple.members]
            out += [(c, "sibling") for c in couple.children if c != p]
        if person.marriage is not None:
            couple = self.couples[person.marriage]
            out += [(m, "spouse") for m in couple.members if m != p]
            out += [(c, "child") for c in couple.children]
        return out

    def word(self, q: int, relation_type: str) -> str:
        return RELATION_WORDS[relation_type][0 if self.people[q].male else 1]


def _walk(tree: FamilyTree, k: int, rng: random.Random, budget: int = 4000) -> Optional[tuple[list[int], list[str], str]]:
    """A walk of k steps over distinct people whose composed relation is defined at every prefix.

    Returns (people p_0..p_k, primitive types, composed type of p_k to p_0) or None.
    """
    expansions = 0
    start = rng.randrange(len(tree.people))

    def extend(path: list[int], types: list[str], state: Optional[str]):
        nonlocal expansions
        if len(types) == k:
            return path, types, state
        expansions += 1
        if expansions > budget:
            return None
        options = tree.neighbours(path[-1])
        rng.shuffle(options)
        for q, t in options:
            if q in path:
                continue
            new_state = t if state is None else COMPOSE.get((state, t))
            if new_state is None:
                continue
            found = extend(path + [q], types + [t], new_state)
            if found is not None:
                return found
        return None

    return extend([start], [], None)


def _clutrr_task(rng: random.Random, k: int, num_distractors: int) -> tuple[list[str], list[str], str, str]:
    """(knowledge, facts, question, answer) of one CLUTRR-style k-hop chain."""
    for _ in range(200):
        tree = FamilyTree(rng)
        found = _walk(tree, k, rng)
        if found is None:
            continue
        path, types, composed = found
        on_chain = set(path)
        # Distractors: true facts of the same family with at least one person off the chain.
        # Each off-chain person appears in one fact only, so no distractor links two chain
        # members (no shorter proof, no second route to the answer).
        candidates = [(u, v, t) for u in range(len(tree.people)) for v, t in tree.neighbours(u)
                      if not (u in on_chain and v in on_chain)]
        rng.shuffle(candidates)
        chosen: list[tuple[int, int, str]] = []
        used: set[int] = set()
        for u, v, t in candidates:
            if len(chosen) == num_distractors:
                break
            off = {u, v} - on_chain
            if off & used:
                continue
            used |= off
            chosen.append((u, v, t))
        if len(chosen) == num_distractors:
            break
    else:
        raise ValueError(f"could not build a {k}-hop family chain with {num_distractors} distractors: lower "
                         f"data.hops (chains of 1..10 hops are tested) or data.distractors")

    people = list(path) + sorted(used)
    males = [p for p in people if tree.people[p].male]
    females = [p for p in people if not tree.people[p].male]
    if len(males) > len(MALE_NAMES) or len(females) > len(FEMALE_NAMES):
        raise ValueError(f"too many people for the name lists: lower data.hops or data.distractors={num_distractors}")
    name = dict(zip(males, rng.sample(MALE_NAMES, len(males))))
    name.update(zip(females, rng.sample(FEMALE_NAMES, len(females))))

    def sentence(subject: int, relation_type: str, of: int) -> str:
        return f"{name[subject]} is the {tree.word(subject, relation_type)} of {name[of]} ."

    facts = [sentence(path[i], types[i - 1], path[i - 1]) for i in range(1, k + 1)]
    distractors = [sentence(v, t, u) for u, v, t in chosen]
    knowledge = facts + distractors
    rng.shuffle(knowledge)
    x, y = path[-1], path[0]
    return knowledge, facts, f"How is {name[x]} related to {name[y]}?", tree.word(x, composed)


def generate_clutrr(n: int, hops: Sequence[int], num_distractors: int, rng: random.Random, split: str) -> list[Record]:
    """n CLUTRR-style records, hop counts cycling through ``hops`` (equal shares)."""
    schedule = [hops[i % len(hops)] for i in range(n)]
    rng.shuffle(schedule)
    records = []
    for i, k in enumerate(schedule):
        knowledge, facts, question, answer = _clutrr_task(rng, k, num_distractors)
        records.append(make_record(id=f"generated-clutrr-{split}-{i}", family="clutrr", source="generated",
                                   knowledge=knowledge, facts=facts, question=question, answer=answer, hops=k))
    return records


# ---------------------------------------------------------------------------------------------
# Splits from the config
# ---------------------------------------------------------------------------------------------


def generate_splits(data_cfg: Any) -> dict[str, list[Record]]:
    """train / validation / test records for data.family from data.* and data.generator.*.

    Sizes from data.num_train / num_validation / num_test; hop counts from data.hops (empty: all
    the generator supports); distractors per task from data.distractors (-1 means
    ``DEFAULT_GENERATED_DISTRACTORS``); every split seeded from data.seed and its name. For the
    ProofWriter family, data.validation_fraction / test_fraction size the held-out question
    pairs when data.generator.holdout_pairs is set.
    """
    family = data_cfg.family
    gen = data_cfg.generator
    seed = int(data_cfg.seed)
    hops = [int(h) for h in data_cfg.hops] or list(DEFAULT_PROOFWRITER_HOPS if family == "proofwriter" else DEFAULT_CLUTRR_HOPS)
    distractors = int(data_cfg.distractors)
    if distractors < 0:
        distractors = DEFAULT_GENERATED_DISTRACTORS
    sizes = {"train": int(data_cfg.num_train), "validation": int(data_cfg.num_validation), "test": int(data_cfg.num_test)}
    if family == "proofwriter":
        # YAML 1.1 reads an unquoted yes / no as a boolean, which the string list keeps as
        # "True" / "False": map those back to the labels they were written as.
        labels = [{"True": "yes", "False": "no"}.get(str(x), str(x)) for x in gen.labels]
        bad = [x for x in labels if x not in PROOFWRITER_LABELS]
        if not labels or bad or len(set(labels)) != len(labels):
            raise ValueError(f"data.generator.labels={labels} is invalid: a non-empty list of distinct labels from {PROOFWRITER_LABELS}")
        if any(h < 0 for h in hops):
            raise ValueError(f"data.hops={hops} is invalid: ProofWriter-style hop counts are >= 0")
        pairs = question_pairs(int(gen.num_entities), int(gen.num_attributes), bool(gen.holdout_pairs),
                               float(data_cfg.validation_fraction), float(data_cfg.test_fraction), seed)
        return {
            split: generate_proofwriter(n, hops, labels, distractors, pairs[split], int(gen.num_entities),
                                        int(gen.num_attributes), int(gen.num_rules),
                                        random.Random(f"proofwriter:{seed}:{split}"), split)
            for split, n in sizes.items()
        }
    if family == "clutrr":
        if any(h < 1 for h in hops):
            raise ValueError(f"data.hops={hops} is invalid for data.family=clutrr: a relation chain has >= 1 hop "
                             f"(e.g. data.hops=[1,2,3])")
        return {split: generate_clutrr(n, hops, distractors, random.Random(f"clutrr:{seed}:{split}"), split)
                for split, n in sizes.items()}
    raise ValueError(f"data.family={family!r} is invalid: choose proofwriter or clutrr")


# ---------------------------------------------------------------------------------------------
# Independent solvers: they read the knowledge sentences and the question text only
# ---------------------------------------------------------------------------------------------

_FACT = re.compile(r"(\w+) (is|isnt) (\w+) \.")
_RULE = re.compile(r"if someone is (\w+(?: and \w+)*) then they (are|arent) (\w+) \.")
_QUESTION = re.compile(r"(\w+) is (\w+)")


def solve_proofwriter(knowledge: Sequence[str], question: str) -> tuple[str, int]:
    """(label, hops) for a ProofWriter-style task by forward chaining over the sentences.

    yes / no: the question or its negation follows; hops = the fewest rounds of rule applications
    that derive it (0 when a fact states it). none: neither follows; hops = the depth of the
    deepest failed backward-chaining attempt on the question's attribute (ProofWriter's QDep of an
    Unknown question). Raises ValueError on an unparsable sentence or a contradiction.
    """
    facts: dict[tuple[str, str], tuple[bool, int]] = {}
    rules: list[tuple[list[str], str, bool]] = []
    for sentence in knowledge:
        if m := _FACT.fullmatch(sentence):
            key, value = (m.group(1), m.group(3)), m.group(2) == "is"
            if key in facts and facts[key][0] != value:
                raise ValueError(f"contradicting facts about {key}")
            facts[key] = (value, 0)
        elif m := _RULE.fullmatch(sentence):
            rules.append((m.group(1).split(" and "), m.group(3), m.group(2) == "are"))
        else:
            raise ValueError(f"cannot parse sentence {sentence!r}")
    q = _QUESTION.fullmatch(question)
    if not q:
        raise ValueError(f"cannot parse question {question!r}")
    q_entity, q_attribute = q.group(1), q.group(2)
    entities = {e for e, _ in facts} | {q_entity}
    depth = 0
    while True:
        depth += 1
        new = {}
        for conditions, conclusion, value in rules:
            for e in entities:
                if all(facts.get((e, c), (False, 0))[0] for c in conditions):
                    key = (e, conclusion)
                    if key in facts or key in new:
                        if (facts.get(key) or new[key])[0] != value:
                            raise ValueError(f"the theory derives both polarities of {key}")
                        continue
                    new[key] = (value, depth)
        if not new:
            break
        facts.update(new)
    if (q_entity, q_attribute) in facts:
        value, hops = facts[(q_entity, q_attribute)]
        return ("yes" if value else "no"), hops

    def failure_depth(attribute: str, polarities: tuple[bool, ...], seen: frozenset[str]) -> int:
        # Backward chaining from a statement that does not follow: 0 when no rule concludes it,
        # else 1 + the deepest failing condition over the rules that conclude it. The question
        # may be settled either way; a rule's condition only by a positive conclusion.
        concluding = [r for r in rules if r[1] == attribute and r[2] in polarities and attribute not in seen]
        deepest = 0
        for conditions, _, _ in concluding:
            failing = [c for c in conditions if not facts.get((q_entity, c), (False, 0))[0]]
            deepest = max(deepest, 1 + max((failure_depth(c, (True,), seen | {attribute}) for c in failing), default=0))
        return deepest

    return "none", failure_depth(q_attribute, (True, False), frozenset())


_KIN_FACT = re.compile(r"(\w+) is the ([\w-]+) of (\w+) \.")
_KIN_QUESTION = re.compile(r"How is (\w+) related to (\w+)\?")
# Path signatures in the family graph (person -> couple: "up" to the couple one is a child of,
# "wed" to the couple one is a member of; couple -> person: "down" to a child, "member" to a
# member), read from the asking person to the answer person.
_SIGNATURES: dict[tuple[str, ...], str] = {
    ("wed", "member"): "spouse",
    ("up", "member"): "parent",
    ("wed", "down"): "child",
    ("up", "down"): "sibling",
    ("up", "member", "up", "member"): "grandparent",
    ("wed", "down", "wed", "down"): "grandchild",
    ("up", "member", "up", "down"): "pibling",
    ("up", "member", "up", "down", "wed", "member"): "pibling",
    ("up", "down", "wed", "down"): "nibling",
    ("wed", "member", "up", "down", "wed", "down"): "nibling",
    ("wed", "member", "up", "member"): "parent-in-law",
    ("wed", "down", "wed", "member"): "child-in-law",
    ("wed", "member", "up", "down"): "sibling-in-law",
    ("up", "down", "wed", "member"): "sibling-in-law",
}
_WORD_TYPE = {word: (t, gender == 0) for t, words in RELATION_WORDS.items() for gender, word in enumerate(words)}


def solve_clutrr(knowledge: Sequence[str], question: str) -> tuple[str, int]:
    """(relation word, hops) for a CLUTRR-style task by rebuilding the family graph.

    Every person has two slots: the couple they are a child of (P) and the couple they are a
    member of (M). A fact equates two slots ("x is the father of y": M(x) = P(y); "x is the son of
    y": P(x) = M(y); siblings: P(x) = P(y); spouses: M(x) = M(y)); union-find merges them into
    couples. The answer is read off the shortest paths between the two people in the person /
    couple graph (generations up and down, marriages) and the answer person's gender; hops is the
    length of the shortest chain of facts linking them. Raises ValueError when the facts are
    inconsistent or the relation is not defined or not unique.
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(slot: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(slot, slot)
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def union(a: tuple[str, str], b: tuple[str, str]) -> None:
        parent[find(a)] = find(b)

    male: dict[str, bool] = {}
    people: set[str] = set()
    adjacency: dict[str, set[str]] = {}
    for sentence in knowledge:
        m = _KIN_FACT.fullmatch(sentence)
        if not m or m.group(2) not in _WORD_TYPE:
            raise ValueError(f"cannot parse sentence {sentence!r}")
        x, word, y = m.groups()
        relation_type, is_male = _WORD_TYPE[word]
        if relation_type not in PRIMITIVE_TYPES:
            raise ValueError(f"{sentence!r}: only parent, child, sibling and spouse facts are supported")
        if male.setdefault(x, is_male) != is_male:
            raise ValueError(f"{x} is called both male and female")
        people |= {x, y}
        adjacency.setdefault(x, set()).add(y)
        adjacency.setdefault(y, set()).add(x)
        slots = {"parent": (("M", x), ("P", y)), "child": (("P", x), ("M", y)),
                 "sibling": (("P", x), ("P", y)), "spouse": (("M", x), ("M", y))}[relation_type]
        union(*slots)
    q = _KIN_QUESTION.fullmatch(question)
    if not q:
        raise ValueError(f"cannot parse question {question!r}")
    target, anchor = q.group(1), q.group(2)
    if target not in male or anchor not in people:
        raise ValueError(f"the facts do not say who {target} and {anchor} are")
    for p in people:
        if find(("P", p)) == find(("M", p)):
            raise ValueError(f"{p} would be their own parent")
    members: dict[tuple[str, str], list[str]] = {}
    children: dict[tuple[str, str], list[str]] = {}
    for p in sorted(people):
        members.setdefault(find(("M", p)), []).append(p)
        children.setdefault(find(("P", p)), []).append(p)
    for couple, ms in members.items():
        if len(ms) > 2 or (len(ms) == 2 and ms[0] in male and ms[1] in male and male[ms[0]] == male[ms[1]]):
            raise ValueError(f"{ms} cannot all be members of one couple")

    def steps(node: tuple[str, Any]) -> list[tuple[str, tuple[str, Any]]]:
        kind, value = node
        if kind == "person":
            return [("up", ("couple", find(("P", value)))), ("wed", ("couple", find(("M", value))))]
        return ([("member", ("person", p)) for p in members.get(value, [])]
                + [("down", ("person", p)) for p in children.get(value, [])])

    # Breadth-first search collecting the signatures of all shortest paths.
    start, goal = ("person", anchor), ("person", target)
    distance = {start: 0}
    signatures: dict[Any, set[tuple[str, ...]]] = {start: {()}}
    frontier = [start]
    while frontier and goal not in distance:
        following = []
        for node in frontier:
            for label, nxt in steps(node):
                if nxt not in distance:
                    distance[nxt] = distance[node] + 1
                    signatures[nxt] = set()
                    following.append(nxt)
                if distance[nxt] == distance[node] + 1:
                    signatures[nxt] |= {s + (label,) for s in signatures[node]}
        frontier = following
    if goal not in distance:
        raise ValueError(f"the facts do not connect {anchor} and {target}")
    types = {_SIGNATURES.get(s) for s in signatures[goal]}
    if None in types or len(types) != 1:
        raise ValueError(f"the relation of {target} to {anchor} is not defined or not unique: paths {sorted(signatures[goal])}")
    (relation_type,) = types
    answer = RELATION_WORDS[relation_type][0 if male[target] else 1]

    hops = {anchor: 0}
    queue = deque([anchor])
    while queue:
        p = queue.popleft()
        for r in adjacency.get(p, ()):
            if r not in hops:
                hops[r] = hops[p] + 1
                queue.append(r)
    return answer, hops[target]
