"""Offline generator of CLUTRR-style family chains (deterministic by seed).

Facts read "alice is the mother of bob ." meaning alice is bob's mother (the subject comes first,
the relation word is the subject's relation to the object). A chain of k such facts links
``p_0 ... p_k``; the question "How is p_k related to p_0?" asks for p_k's relation to p_0, the
direction of the CLUTRR reader (CLUTRR's target is the relation of query[1] to query[0]).
Chains are random walks over a random family tree (couples with children, spouses married in
with their own parents and siblings), so the facts are always consistent. The answer is the
composition of the walk's relation types through ``COMPOSE``; walks whose composition is not
defined (cousins, great-grandparents, ...) or not unique (a grandparent's child is a parent or
an uncle) are rejected. Distractors are true facts of the same tree about other people.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from reckoning_ray.core.data.relations import RELATION_WORDS
from reckoning_ray.core.data.schema import Record, make_record

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

