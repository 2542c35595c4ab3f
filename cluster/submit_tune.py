"""Run the sweep on a cluster's head node: ``python -m reckoning_ray.tune`` with these arguments.

``ray submit`` uploads a script, not a module, so this file stands in for the module:

    ray submit cluster/a100.yaml cluster/submit_tune.py -- paper space=paper data.path=<dir>

runs ``python -m reckoning_ray.tune paper space=paper data.path=<dir> tune.storage_path=<S>`` on
the head, where ``S`` is the shared storage the cluster's setup commands export as
``RECKONING_STORAGE_PATH`` (an explicit ``tune.storage_path=...`` argument wins). It runs from
the project's directory on the head, so relative paths mean the same as in the README.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the tune entry point as ``python -m`` would, with the cluster's storage path added."""
    import reckoning_ray
    from reckoning_ray.cluster import TUNE_MODULE, tune_argv

    args = tune_argv(sys.argv[1:] if argv is None else argv, os.environ)
    # The editable install on the nodes points at ~/reckoning-ray (the cluster's file mount).
    os.chdir(Path(reckoning_ray.__file__).resolve().parents[1])
    print(f"python -m {TUNE_MODULE} {' '.join(args)}", flush=True)
    sys.argv = [TUNE_MODULE] + args
    runpy.run_module(TUNE_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
