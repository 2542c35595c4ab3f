"""Independent solvers of the generated tasks: they read the knowledge sentences and the question
text only.

``solve_proofwriter`` (forward chaining over the parsed sentences) and ``solve_clutrr`` (a family
graph rebuilt from the sentences, relation read off the path between the two people) use only the
knowledge text and the question, never the generator's bookkeeping: this module imports no
generator, only the relation words of ``relations``. Tests check every generated answer and hop
count with them.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Sequence

from reckoning_ray.core.data.relations import PRIMITIVE_TYPES, RELATION_WORDS

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


Slot = tuple[str, str]


class _Family:
    """The family the facts describe, as union-find over slots.

    Every person has two slots: the couple they are a child of (P) and the couple they are a
    member of (M). A fact equates two slots ("x is the father of y": M(x) = P(y); "x is the son of
    y": P(x) = M(y); siblings: P(x) = P(y); spouses: M(x) = M(y)); union-find merges them into
    couples. Raises ValueError on a sentence that is not a parent / child / sibling / spouse fact
    or a person called both male and female.
    """

    def __init__(self, knowledge: Sequence[str]):
        self._parent: dict[Slot, Slot] = {}
        self.male: dict[str, bool] = {}
        self.people: set[str] = set()
        # person -> the people a fact links them to (for the hop count)
        self.adjacency: dict[str, set[str]] = {}
        self.members: dict[Slot, list[str]] = {}
        self.children: dict[Slot, list[str]] = {}
        for sentence in knowledge:
            self._add_fact(sentence)

    def find(self, slot: Slot) -> Slot:
        parent = self._parent
        parent.setdefault(slot, slot)
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def _union(self, a: Slot, b: Slot) -> None:
        self._parent[self.find(a)] = self.find(b)

    def _add_fact(self, sentence: str) -> None:
        m = _KIN_FACT.fullmatch(sentence)
        if not m or m.group(2) not in _WORD_TYPE:
            raise ValueError(f"cannot parse sentence {sentence!r}")
        x, word, y = m.groups()
        relation_type, is_male = _WORD_TYPE[word]
        if relation_type not in PRIMITIVE_TYPES:
            raise ValueError(f"{sentence!r}: only parent, child, sibling and spouse facts are supported")
        if self.male.setdefault(x, is_male) != is_male:
            raise ValueError(f"{x} is called both male and female")
        self.people |= {x, y}
        self.adjacency.setdefault(x, set()).add(y)
        self.adjacency.setdefault(y, set()).add(x)
        slots = {"parent": (("M", x), ("P", y)), "child": (("P", x), ("M", y)),
                 "sibling": (("P", x), ("P", y)), "spouse": (("M", x), ("M", y))}[relation_type]
        self._union(*slots)

    def build_couples(self) -> None:
        """Fill ``members`` and ``children`` of every couple; ValueError when someone would be
        their own parent or a couple would have more than two members or two of one gender."""
        find = self.find
        for p in self.people:
            if find(("P", p)) == find(("M", p)):
                raise ValueError(f"{p} would be their own parent")
        for p in sorted(self.people):
            self.members.setdefault(find(("M", p)), []).append(p)
            self.children.setdefault(find(("P", p)), []).append(p)
        male = self.male
        for couple, ms in self.members.items():
            if len(ms) > 2 or (len(ms) == 2 and ms[0] in male and ms[1] in male and male[ms[0]] == male[ms[1]]):
                raise ValueError(f"{ms} cannot all be members of one couple")

    def steps(self, node: tuple[str, Any]) -> list[tuple[str, tuple[str, Any]]]:
        """(step label, next node) from a ("person", name) or ("couple", slot) node."""
        kind, value = node
        if kind == "person":
            return [("up", ("couple", self.find(("P", value)))), ("wed", ("couple", self.find(("M", value))))]
        return ([("member", ("person", p)) for p in self.members.get(value, [])]
                + [("down", ("person", p)) for p in self.children.get(value, [])])


def _path_signatures(family: _Family, anchor: str, target: str) -> set[tuple[str, ...]]:
    """The step labels of every shortest path from ``anchor`` to ``target`` (breadth-first)."""
    start, goal = ("person", anchor), ("person", target)
    distance = {start: 0}
    signatures: dict[Any, set[tuple[str, ...]]] = {start: {()}}
    frontier = [start]
    while frontier and goal not in distance:
        following = []
        for node in frontier:
            for label, nxt in family.steps(node):
                if nxt not in distance:
                    distance[nxt] = distance[node] + 1
                    signatures[nxt] = set()
                    following.append(nxt)
                if distance[nxt] == distance[node] + 1:
                    signatures[nxt] |= {s + (label,) for s in signatures[node]}
        frontier = following
    if goal not in distance:
        raise ValueError(f"the facts do not connect {anchor} and {target}")
    return signatures[goal]


def _fact_distance(adjacency: dict[str, set[str]], anchor: str, target: str) -> int:
    """The fewest facts that link ``anchor`` to ``target`` (breadth-first over the people)."""
    hops = {anchor: 0}
    queue = deque([anchor])
    while queue:
        p = queue.popleft()
        for r in adjacency.get(p, ()):
            if r not in hops:
                hops[r] = hops[p] + 1
                queue.append(r)
    return hops[target]


def solve_clutrr(knowledge: Sequence[str], question: str) -> tuple[str, int]:
    """(relation word, hops) for a CLUTRR-style task by rebuilding the family graph.

    The facts are merged into couples (``_Family``). The answer is read off the shortest paths
    between the two people in the person / couple graph (generations up and down, marriages) and
    the answer person's gender; hops is the length of the shortest chain of facts linking them.
    Raises ValueError when the facts are inconsistent or the relation is not defined or not
    unique.
    """
    family = _Family(knowledge)
    q = _KIN_QUESTION.fullmatch(question)
    if not q:
        raise ValueError(f"cannot parse question {question!r}")
    target, anchor = q.group(1), q.group(2)
    if target not in family.male or anchor not in family.people:
        raise ValueError(f"the facts do not say who {target} and {anchor} are")
    family.build_couples()
    signatures = _path_signatures(family, anchor, target)
    types = {_SIGNATURES.get(s) for s in signatures}
    if None in types or len(types) != 1:
        raise ValueError(f"the relation of {target} to {anchor} is not defined or not unique: paths {sorted(signatures)}")
    (relation_type,) = types
    answer = RELATION_WORDS[relation_type][0 if family.male[target] else 1]
    return answer, _fact_distance(family.adjacency, anchor, target)
