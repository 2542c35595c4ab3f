"""Submit the sweep to a cluster from your machine, or run it on the cluster's head.

From your machine, as a Ray job (the form cluster/README.md shows; W&B keys travel with it):

    ray dashboard cluster/a100.yaml &      # the head's dashboard at http://127.0.0.1:8265
    python cluster/submit_tune.py --address http://127.0.0.1:8265 -- paper space=paper data.path=<dir>

submits a job that uploads the project (this repository, without what ``.gitignore`` lists) and
runs this file on the head with the arguments after ``--``. ``WANDB_API_KEY`` (and
``WANDB_ENTITY``, ``WANDB_PROJECT``, ``WANDB_BASE_URL`` where set) are read from your shell and
passed in the job's runtime environment (``env_vars``), which Ray gives the job's driver and every
trial: the key is never written to a file, put on a command line or printed (only the names of
the variables passed are). ``--no-wait`` returns once the job is submitted; otherwise its output
follows until it ends, and the exit status is the job's.

On the head (``ray submit`` uploads a script, not a module, so this file stands in for it):

    ray submit cluster/a100.yaml cluster/submit_tune.py -- paper space=paper data.path=<dir>

runs ``python -m reckoning_ray.tune paper space=paper data.path=<dir> tune.storage_path=<S>``,
where ``S`` is the shared storage the cluster's setup commands export as
``RECKONING_STORAGE_PATH`` (an explicit ``tune.storage_path=...`` argument wins). It runs from
the project's directory, so relative paths mean the same as in the README. The job form ends
here too, on the head.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import shlex
import sys
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

# The project: the job's working directory.
PROJECT_DIR = Path(__file__).resolve().parents[1]
# This file, relative to the project (the job's entrypoint runs it on the head).
SCRIPT = Path(__file__).resolve().relative_to(PROJECT_DIR).as_posix()


def parse_submit_args(argv: Sequence[str]) -> Tuple[Optional[argparse.Namespace], List[str]]:
    """(submit options, the tune arguments): options only when ``argv`` starts with ``--address``.

    The options come before ``--``; everything after it goes to ``reckoning_ray.tune`` unchanged
    (``--resume`` too). Without ``--address`` all of ``argv`` is the tune arguments (on the head).
    """
    argv = list(argv)
    if not argv or not argv[0].startswith("--address"):
        return None, argv
    parser = argparse.ArgumentParser(
        prog="python cluster/submit_tune.py",
        usage="%(prog)s --address URL [--no-wait] -- [preset] [key=value ...] [--resume]",
        description="Submit the sweep as a Ray job; W&B settings go with it from this shell's environment.")
    parser.add_argument("--address", required=True,
                        help="the cluster's dashboard: http://127.0.0.1:8265 after `ray dashboard cluster/a100.yaml`")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    if "--" not in argv:
        parser.error("put the sweep's arguments after --, e.g. -- paper space=paper data.path=<dir>")
    split = argv.index("--")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def submit(options: argparse.Namespace, tune_args: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """Submit ``python cluster/submit_tune.py <tune_args>`` as a Ray job; returns the exit code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from reckoning_ray.ops.jobs import job_runtime_env

    runtime_env = job_runtime_env(environ, PROJECT_DIR)
    forwarded = sorted(runtime_env.get("env_vars", {}))
    if "tracking.mode=online" in tune_args and "WANDB_API_KEY" not in forwarded:
        print("note: tracking.mode=online but WANDB_API_KEY is not set in this shell: the cluster cannot log "
              "in to W&B (export it here before submitting)", file=sys.stderr)
    entrypoint = shlex.join(["python", SCRIPT, *tune_args])
    client = JobSubmissionClient(options.address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}")
    print(f"  working dir {PROJECT_DIR}; environment from this shell: {', '.join(forwarded) or 'none'}")
    if options.no_wait:
        print(f"  follow: ray job logs --address {options.address} --follow {job_id}")
        print(f"  stop:   ray job stop --address {options.address} {job_id}")
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Submit (``--address``) or run the tune entry point as ``python -m`` would, with the storage path."""
    options, tune_args = parse_submit_args(sys.argv[1:] if argv is None else argv)
    if options is not None:
        return submit(options, tune_args)

    import reckoning_ray
    from reckoning_ray.ops.jobs import TUNE_MODULE, tune_argv

    args = tune_argv(tune_args, os.environ)
    # The editable install on the nodes points at ~/reckoning-ray (the cluster's file mount); a
    # job's uploaded working directory comes first on its path, so a job runs from there.
    os.chdir(Path(reckoning_ray.__file__).resolve().parents[1])
    print(f"python -m {TUNE_MODULE} {' '.join(args)}", flush=True)
    sys.argv = [TUNE_MODULE] + args
    runpy.run_module(TUNE_MODULE, run_name="__main__", alter_sys=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
