"""Test-wide settings and the helpers several test files share.

Settings: one CPU thread per test process (2-core machines; Ray tests run workers beside the test
process) and no W&B network access.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# the real ProofWriter / CLUTRR samples beside the repository (never copied into it)
SHARED_DATA = REPO.parent / "shared" / "data"
PROOFWRITER_DEV = SHARED_DATA / "proofwriter-owa-natlang-dev.jsonl"
CLUTRR_TEST = SHARED_DATA / "clutrr-gen_train23_test2to10-test.csv"

# The embedded preset's earlier task, for tests of mechanics rather than of learning: one-fact
# ProofWriter-style yes/no questions (8 names x 8 adjectives), a label-only target (a few tokens to
# generate) and outer AdamW 1e-3. A few dozen steps learn it, so sweeps, resumes and the engine's
# end-to-end checks stay fast whatever the embedded preset's own (harder, multi-hop) task is.
ONE_FACT = [
    "data.hops=[0]", "data.distractors=0", "data.generator.num_entities=8", "data.generator.num_attributes=8",
    'data.generator.labels=["yes","no"]', "outer.multi_task=false", "outer.lr=1e-3", "eval.max_new_tokens=4",
    "model.max_length=32",
]


def load_bench(name: str):
    """bench/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sweep_command(space, storage, name: str, *overrides: str) -> list:
    """``python -m reckoning_ray.tune`` on the embedded preset with a search space file, a storage
    path and a sweep name: one sample per point, short trials (64 training tasks, one epoch, no
    early stopping); ``overrides`` come last and win."""
    return [
        sys.executable, "-m", "reckoning_ray.tune", "embedded", f"space={space}",
        f"tune.storage_path={storage}", f"tune.name={name}", "tune.num_samples=1",
        "data.num_train=64", "data.num_validation=32", "train.epochs=1", "train.patience=0", *overrides,
    ]
