"""The relation words of CLUTRR-style tasks: what the generator writes and the independent solver
reads (the only thing the two share)."""

from __future__ import annotations

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
