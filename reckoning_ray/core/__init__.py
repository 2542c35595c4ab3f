"""The core: RECKONING in plain PyTorch, with no Ray and no W&B import (a test checks).

- ``config``: the typed config tree, presets, validation and the documentation of every key;
- ``data/``: one record schema, readers of the original files, offline generators, encoding;
- ``modeling``, ``hub``: the causal LM and tokenizer (hub id, local directory, or embedded);
- ``bilevel/``, ``baseline``, ``method``: RECKONING's engines and the in-context baselines;
- ``loop``, ``plan``, ``progress``, ``schedules``: the training loop, its run-length arithmetic,
  its progress display and learning-rate schedules;
- ``runs``: a run's directory, input checks and parts; ``checkpoint``, ``evaluate``, ``predict``,
  ``soup``: what a run leaves and what is done with it;
- ``spaces``, ``storage``: search spaces and where results live (paths or object stores).
"""
