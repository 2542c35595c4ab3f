"""Offline task generators (deterministic by seed): ``generate_splits`` builds the train /
validation / test records of data.family from the data.* config.

- ProofWriter-style theories: ``reckoning_ray.core.data.generate_proofwriter``.
- CLUTRR-style family chains: ``reckoning_ray.core.data.generate_clutrr``.

Every generated answer and hop count is checked in the tests by the independent solvers of
``reckoning_ray.core.data.solvers``, which import no generator.
"""

from __future__ import annotations

import random
from typing import Any

from reckoning_ray.core.data.generate_clutrr import generate_clutrr
from reckoning_ray.core.data.generate_proofwriter import generate_proofwriter, question_pairs
from reckoning_ray.core.data.schema import PROOFWRITER_LABELS, Record

# Used when data.distractors = -1 ("all the source has") for generated data.
DEFAULT_GENERATED_DISTRACTORS = 2
# Hop counts generated when data.hops is empty.
DEFAULT_PROOFWRITER_HOPS = (0, 1, 2, 3, 4, 5, 6)
DEFAULT_CLUTRR_HOPS = (1, 2, 3, 4, 5, 6)


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
