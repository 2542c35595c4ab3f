"""The Ray layer: everything that imports ``ray``.

- ``trainer``: a run on Ray Train (``TorchTrainer``, the data-parallel worker, placement on the
  cluster's node types, retries) or in this process without Ray (``resources.num_workers=0``);
- ``sweep``: the Ray Tune driver (``Tuner`` over the search space, resume);
- ``trials``: one trial (a Train run inside a Tune trial) and ASHA's promotion board;
- ``schedulers``, ``curve``: Tune schedulers that survive a driver restart (ASHA, curve stopping);
- ``callbacks``: the W&B writer's hosts in the Train controller and the Tune driver;
- ``results``: the sweep's table, best trial, test of the best checkpoints.

It builds on :mod:`reckoning_ray.core` (no Ray there) and :mod:`reckoning_ray.tracking`.
"""

import os

# Ray folds log lines that differ only in numbers into one "[repeated Nx across cluster]" line,
# which hides trials' validation lines from the sweep's console; it reads this when ray is
# imported, and every module of this package is imported after this one.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
