"""Where training data comes from: ``read_records`` dispatches on data.source, ``filter_splits``
applies the data.* filters, and ``load_splits`` (the entry point training uses) does both and
builds a ``datasets.DatasetDict``.

Sources
-------
- ``proofwriter``: the original ProofWriter files (``reckoning_ray.core.data.proofwriter``).
- ``clutrr``: the original CLUTRR CSV files (``reckoning_ray.core.data.clutrr``), or the CLUTRR-SG
  text files of NicolasAG/SGinPG (``reckoning_ray.core.data.clutrr_sg``; told apart by file name or
  first line; a directory's files are picked by level with each split's hop counts).
- ``hf``: a DatasetDict saved with ``save_to_disk`` (or a hub id, online only) whose rows already
  follow the schema (``load_hf``, here).
- ``generate``: the offline generators of ``reckoning_ray.core.data.generate``.

Every source gives ``{"train": [...], "validation": [...], "test": [...]}`` of plain dicts built
with ``schema.make_record`` (``reckoning_ray.core.data.splits``).
"""

from __future__ import annotations

import os
import random
from typing import Any, Sequence

from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.data.clutrr import read_clutrr
from reckoning_ray.core.data.clutrr_sg import is_clutrr_sg, read_clutrr_sg
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.generate import generate_splits
from reckoning_ray.core.data.proofwriter import read_proofwriter
from reckoning_ray.core.data.schema import FIELDS, Record, validate_record, without_distractors
from reckoning_ray.core.data.splits import SPLITS, Splits
from reckoning_ray.core.hub import hub_offline, hub_reachable, looks_like_hub_id

# Split names other tools use for our "validation".
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                  "val": "validation", "test": "test"}


# ---------------------------------------------------------------------------------------------
# HF datasets
# ---------------------------------------------------------------------------------------------


def load_hf(path_or_id: str | os.PathLike) -> "datasets.DatasetDict":  # noqa: F821
    """Load schema records from a DatasetDict directory (``save_to_disk``) or a hub dataset id.

    Splits named valid / dev / val are renamed validation. Every row is checked against the
    schema (ValueError naming the split, row id and field). A hub id needs the network: with
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or when the hub cannot be reached within seconds,
    this raises at once and asks for a local directory instead.
    """
    import datasets

    text = os.path.expanduser(str(path_or_id))
    if os.path.isdir(text):
        try:
            loaded = datasets.load_from_disk(text)
        except FileNotFoundError as exc:
            raise DataFormatError(text, None, f"expected a directory written by DatasetDict.save_to_disk: {exc}") from None
        if isinstance(loaded, datasets.Dataset):
            raise DataFormatError(text, None, "expected a DatasetDict (train / validation / test) saved with "
                                              "save_to_disk, found a single Dataset")
    else:
        if not looks_like_hub_id(str(path_or_id)):
            raise FileNotFoundError(f"data.path {text!r} is not an existing directory; pass the directory "
                                    f"written by save_to_disk")
        offline = hub_offline(datasets=True)
        if offline or not hub_reachable():
            reason = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
            raise ConnectionError(
                f"cannot load hub dataset {text!r}: {reason}. Pass a local directory written by "
                f"DatasetDict.save_to_disk instead (data.path=/path/to/dir), e.g. one made by "
                f"`python -m reckoning_ray.data generate <spec> --out DIR`"
            )
        loaded = datasets.load_dataset(text)
    splits = {}
    for name in loaded:
        canonical = _SPLIT_ALIASES.get(name)
        if canonical is None:
            continue
        if canonical in splits:
            raise DataFormatError(text, None, f"expected one split per role; {name!r} repeats {canonical!r}")
        splits[canonical] = loaded[name]
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataFormatError(text, None, f"expected splits {list(SPLITS)} (validation may be named valid/dev); "
                                          f"found {list(loaded)}")
    for split, ds in splits.items():
        absent = [f for f in FIELDS if f not in ds.column_names]
        if absent:
            raise DataFormatError(text, None, f"split {split!r}: expected schema columns {list(FIELDS)}; missing {absent} "
                                              f"(convert the dataset with reckoning_ray.core.data.schema.make_record)")
        for row in ds.to_list():
            try:
                validate_record(row)
            except ValueError as exc:
                raise DataFormatError(text, None, f"split {split!r}: {exc}") from None
    return datasets.DatasetDict({s: splits[s] for s in SPLITS})


# ---------------------------------------------------------------------------------------------
# The entry point used by training
# ---------------------------------------------------------------------------------------------


def to_dataset(records: Sequence[Record]) -> "datasets.Dataset":  # noqa: F821
    """Records -> ``datasets.Dataset`` with fixed features (so empty lists keep their string type)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "family": datasets.Value("string"),
            "source": datasets.Value("string"),
            "knowledge": datasets.List(datasets.Value("string")),
            "facts": datasets.List(datasets.Value("string")),
            "distractors": datasets.List(datasets.Value("string")),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "hops": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in records], features=features)


# The per-split hop keys (length generalisation); null falls back to data.hops.
SPLIT_HOPS_KEYS = {"train": "train_hops", "validation": "validation_hops", "test": "test_hops"}


def split_hops(data_cfg: Any, split: str) -> tuple[str, list[int]]:
    """``(key, hop counts)`` that select ``split``'s tasks: ``("data.test_hops", [2, ..., 10])`` when
    data.test_hops is set, else ``("data.hops", data.hops)``. An empty list keeps every hop count."""
    name = SPLIT_HOPS_KEYS[split]
    value = getattr(data_cfg, name, None)
    if value is None:
        return "data.hops", [int(h) for h in data_cfg.hops]
    return f"data.{name}", [int(h) for h in value]


class _Override:
    """A read-only view of a data config with some keys replaced (for ``generate_splits``)."""

    def __init__(self, base: Any, **values: Any):
        self._base, self._values = base, values

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["_values"]
        return values[name] if name in values else getattr(self.__dict__["_base"], name)


def read_records(data_cfg: Any) -> Splits:
    """The unfiltered records of ``data.source`` as ``{split: [record, ...]}``.

    Generated data is generated with each split's hop counts (``split_hops``): splits that share
    hop counts come from one ``generate_splits`` call, a split with its own from a call that asks
    for that split only (each split's tasks depend on its seed, size and hop counts alone).
    """
    source = data_cfg.source
    if source == "generate":

        by_hops: dict[tuple[int, ...], list[str]] = {}
        for split in SPLITS:
            by_hops.setdefault(tuple(split_hops(data_cfg, split)[1]), []).append(split)
        if len(by_hops) == 1 and list(by_hops) == [tuple(int(h) for h in data_cfg.hops)]:
            return generate_splits(data_cfg)
        out: Splits = {}
        for hops, names in by_hops.items():
            others = {f"num_{s}": 0 for s in SPLITS if s not in names}
            generated = generate_splits(_Override(data_cfg, hops=list(hops), **others))
            out.update({s: generated[s] for s in names})
        return {s: out[s] for s in SPLITS}
    if source in ("proofwriter", "clutrr", "hf") and not data_cfg.path:
        raise ValueError(f"data.source={source} needs data.path=<file or directory>")
    if source == "proofwriter":
        return read_proofwriter(data_cfg.path, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed,
                                getattr(data_cfg, "selection", "qdep"), bool(getattr(data_cfg, "balance", True)),
                                str(getattr(data_cfg, "proofs", "shortest")))
    if source == "clutrr" and is_clutrr_sg(data_cfg.path):
        # the files of the levels each split's hop counts list (data.<split>_hops, else data.hops)
        return read_clutrr_sg(data_cfg.path, {split: split_hops(data_cfg, split) for split in SPLITS},
                              data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed)
    if source == "clutrr":
        return read_clutrr(data_cfg.path, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed)
    if source == "hf":
        loaded = load_hf(data_cfg.path)
        return {split: loaded[split].to_list() for split in SPLITS}
    raise ValueError(f"data.source={source!r} is invalid: choose one of generate, proofwriter, clutrr, hf")


def _cap(records: list[Record], limit: int, seed: int, split: str) -> list[Record]:
    """A seeded random subset of ``limit`` records in their original order (limit 0 = all)."""
    if limit <= 0 or len(records) <= limit:
        return records
    keep = sorted(random.Random(f"cap:{seed}:{split}").sample(range(len(records)), limit))
    return [records[i] for i in keep]


def filter_splits(splits: Splits, data_cfg: Any) -> Splits:
    """Apply each split's hop counts (data.<split>_hops, else data.hops; empty = all),
    data.distractors (-1 = all) and the num_* caps.

    Generated data already has the requested hop counts, distractors and sizes, so only file and
    hf sources are filtered for distractors and capped. Under data.selection=paper the distractors
    are data.distractors draws with replacement, de-duplicated (the authors' setting); under qdep
    that many distinct ones. A task without relevant facts keeps at least one distractor, so no task
    is left with empty knowledge. Raises ValueError when a split ends up empty, naming the hop key
    that emptied it (data.hops or data.<split>_hops) and the hop counts the source has.
    """
    caps = {"train": data_cfg.num_train, "validation": data_cfg.num_validation, "test": data_cfg.num_test}
    generated = data_cfg.source == "generate"
    replace = getattr(data_cfg, "selection", "qdep") == "paper"
    out: Splits = {}
    for split in SPLITS:
        key, hop_list = split_hops(data_cfg, split)
        hops = set(hop_list)
        records = splits.get(split, [])
        kept = [r for r in records if not hops or r["hops"] in hops]
        if not generated:
            if data_cfg.distractors >= 0:
                # A task with no relevant facts (a few ProofWriter "Unknown" questions) keeps at
                # least one distractor: RECKONING needs some knowledge to encode.
                kept = [without_distractors(r, keep=max(data_cfg.distractors, 0 if r["facts"] else 1),
                                            seed=data_cfg.seed, replace=replace)
                        for r in kept]
            kept = _cap(kept, int(caps[split]), data_cfg.seed, split)
        if not kept:
            available = sorted({r["hops"] for r in records})
            where = f"data.source={data_cfg.source}" + (f" data.path={data_cfg.path}" if data_cfg.path else "")
            if records:
                raise ConfigError(
                    f"split {split!r} is empty after filtering by {key}={sorted(hops)}: {where} has hop "
                    f"counts {available} in that split; set {key} to some of them (or [] for all)"
                )
            if generated:
                raise ConfigError(f"split {split!r} of generated data has no tasks: set data.num_{split} >= 1")
            raise ConfigError(f"split {split!r} of {where} has no tasks; check the source (or the split fractions)")
        out[split] = kept
    return out


def load_splits(data_cfg: Any) -> "datasets.DatasetDict":  # noqa: F821
    """train / validation / test ``datasets.DatasetDict`` for ``data`` (a DictConfig or DataConfig).

    Dispatches on data.source (generate | proofwriter | clutrr | hf; ProofWriter files read with
    data.selection, data.balance and data.proofs; CLUTRR-SG directories read at the levels of the
    hop counts), then filters hop counts (data.train_hops / validation_hops / test_hops, or
    data.hops for a split without its own; empty keeps all), distractors (data.distractors; -1
    keeps all) and caps file sources at data.num_* (> 0). Rows follow ``reckoning_ray.core.data.schema``.
    """
    import datasets

    splits = filter_splits(read_records(data_cfg), data_cfg)
    return datasets.DatasetDict({split: to_dataset(records) for split, records in splits.items()})
