"""Reasoning data for reckoning-ray.

- ``schema``: the one record schema every source produces.
- ``errors``: ``DataFormatError``, raised for a data file that cannot be parsed.
- ``splits``: the train / validation / test splits; a file split by group, a directory by file.
- ``proofwriter`` / ``clutrr``: readers of the original ProofWriter / CLUTRR files.
- ``generate``: offline generators (``generate_proofwriter``, ``generate_clutrr``; vocabulary in
  ``relations``), checked by the independent solvers of ``solvers``.
- ``sources``: ``read_records`` / ``filter_splits`` / ``load_splits``, the entry point training
  uses, and ``load_hf`` for HF datasets.
- ``encode``: tokenisation and collation into tensors.

Only ``encode`` imports torch (this package does not import it); ``datasets`` is imported only
when a DatasetDict is built.
"""

from reckoning_ray.core.data.clutrr import read_clutrr, read_clutrr_file
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.generate import generate_splits
from reckoning_ray.core.data.proofwriter import read_proofwriter, read_proofwriter_file
from reckoning_ray.core.data.schema import (
    make_record,
    validate_record,
    without_distractors,
)
from reckoning_ray.core.data.solvers import solve_clutrr, solve_proofwriter
from reckoning_ray.core.data.sources import load_hf, load_splits

__all__ = [
    "DataFormatError",
    "generate_splits",
    "load_hf",
    "load_splits",
    "make_record",
    "read_clutrr",
    "read_clutrr_file",
    "read_proofwriter",
    "read_proofwriter_file",
    "solve_clutrr",
    "solve_proofwriter",
    "validate_record",
    "without_distractors",
]
