"""The train / validation / test splits every reader returns, and how a file or a directory
becomes them.

A directory holding one file per split keeps the release's split; a single file is split
deterministically by group (theory id for ProofWriter, story id for CLUTRR) so that no theory is
shared between splits.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.schema import Record

SPLITS = ("train", "validation", "test")

Splits = dict[str, list[Record]]


def split_by_group(
    records: Sequence[Record],
    group_of: Callable[[Record], str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Optional[Iterable[str]] = None,
) -> Splits:
    """Split one file's records into train / validation / test with no group in two splits.

    Groups (e.g. theories) are shuffled with ``seed`` (sorted first, so the result does not depend
    on file order); the first ``round(validation_fraction * groups)`` go to validation, the next
    ``round(test_fraction * groups)`` to test, the rest to train. A positive fraction always gets at
    least one group. Records keep their file order within a split. ``groups``: all the file's
    groups, also those with no record left (ProofWriter selection=paper), so that a selection
    sends each theory to the same split as selection=qdep does; default: the records' groups.
    """
    groups = sorted({group_of(r) for r in records} | set(groups or ()))
    random.Random(f"split:{seed}").shuffle(groups)

    def count(fraction: float) -> int:
        return max(1, round(fraction * len(groups))) if fraction > 0 else 0

    n_val, n_test = count(validation_fraction), count(test_fraction)
    if n_val + n_test >= len(groups):
        raise ValueError(
            f"cannot split {len(groups)} groups (theories / stories) into train, validation "
            f"({validation_fraction}) and test ({test_fraction}): lower data.validation_fraction / data.test_fraction"
        )
    where = {g: "validation" for g in groups[:n_val]}
    where.update({g: "test" for g in groups[n_val:n_val + n_test]})
    out: Splits = {s: [] for s in SPLITS}
    for record in records:
        out[where.get(group_of(record), "train")].append(record)
    return out


def _split_files(directory: Path, names: Mapping[str, Sequence[str]]) -> dict[str, Path]:
    found = {}
    for split, candidates in names.items():
        for name in candidates:
            if (directory / name).is_file():
                found[split] = directory / name
                break
    return found


def read_splits(
    path: str | os.PathLike,
    reader: Callable[[Path], list[Record]],
    split_names: Mapping[str, Sequence[str]],
    group_of: Callable[[Record], str],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    kind: str,
) -> Splits:
    """``{split: records}`` of a ``kind`` source at ``path``: a directory with one file per split
    (the first of ``split_names[split]`` that exists, read with ``reader``) or one file split by
    ``group_of`` (``split_by_group``)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        files = _split_files(path, split_names)
        missing = [s for s in SPLITS if s not in files]
        if missing:
            expected = {s: list(split_names[s]) for s in missing}
            raise DataFormatError(path, None, f"expected a {kind} directory with one file per split; missing {expected}")
        return {split: reader(files[split]) for split in SPLITS}
    if path.is_file():
        return split_by_group(reader(path), group_of, validation_fraction, test_fraction, seed)
    raise FileNotFoundError(f"{kind} data path {str(path)!r} does not exist: pass a file or a directory")
