"""Reasoning data for reckoning-ray: one record schema (``schema``), readers of the original
ProofWriter / CLUTRR files and of HF datasets (``sources``), offline generators with independent
solvers (``generate``), and ``load_splits``, the entry point training uses.

Nothing here imports torch; ``datasets`` is imported only when a DatasetDict is built.
"""

from reckoning_ray.data.generate import generate_splits, solve_clutrr, solve_proofwriter
from reckoning_ray.data.schema import make_record, validate_record, without_distractors
from reckoning_ray.data.sources import (
    DataFormatError,
    load_hf,
    load_splits,
    read_clutrr,
    read_clutrr_file,
    read_proofwriter,
    read_proofwriter_file,
)

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
