"""Tracking: everything that imports ``wandb``.

- ``writer``: one run's W&B run (offline unless configured online), written from whichever
  process hosts it; the test metrics of a run and a report's tables;
- ``secrets``: which config keys are secrets, scrubbing, and whether a W&B key is configured;
- ``sweeps``: a sweep as a W&B sweep (config translation, creation, publishing finished runs);
- ``artifacts``: the authors' processed data sets, downloaded as W&B artifacts.
"""
