"""Test-wide settings: one CPU thread per test process (2-core machines; Ray tests run workers
beside the test process) and no W&B network access."""

import os

import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(1)
