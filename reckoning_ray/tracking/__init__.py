"""Tracking: everything that imports ``wandb``.

- ``writer``: one run's W&B run (offline unless configured online), written from whichever
  process hosts it;
- ``sweeps``: a sweep as a W&B sweep (config translation, creation, publishing finished runs).
"""
