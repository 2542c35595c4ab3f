"""The cluster command line: check the cluster YAMLs, print the node pins, a machine's resources.

    python -m reckoning_ray.cluster check [CLUSTER_YAML ...]
    python -m reckoning_ray.cluster pins
    python -m reckoning_ray.cluster node-resources
    python -m reckoning_ray.cluster fake-config CLUSTER_YAML

The cluster YAMLs (``cluster/a100.yaml`` on AWS, ``cluster/local.yaml`` on premises) give two
worker node types besides a CPU-only head: one with A100 GPUs for RECKONING trials and one with
RTX 3090-class GPUs for the in-context baseline. Ray cannot tell GPU models apart, so each type
declares a custom resource named after its GPU (``a100`` / ``rtx3090``) that the training workers
ask for (``resources.node_type``). The checks are :mod:`reckoning_ray.ops.checks` and
:mod:`reckoning_ray.ops.pins`; the fake cluster is :mod:`reckoning_ray.ops.fake_cluster`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml

from reckoning_ray.ops.checks import (
    ClusterConfigError,
    load_cluster_yaml,
    storage_path,
    validate_cluster_file,
)
from reckoning_ray.ops.fake_cluster import fake_cluster_config
from reckoning_ray.ops.jobs import detect_gpu_names, gpu_node_resources
from reckoning_ray.ops.pins import pins_command

# -- command line -----------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m reckoning_ray.cluster check|node-resources|pins|fake-config``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m reckoning_ray.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate cluster YAMLs (Ray's validation and the project's checks)")
    check.add_argument("paths", nargs="+", type=Path)
    sub.add_parser("node-resources", help="print this machine's GPU model resources as JSON (for ray start --resources)")
    sub.add_parser("pins", help="print the nodes' install line (the project with constraints.txt, the versions CI tests)")
    fake = sub.add_parser("fake-config", help="print the fake multi-node config derived from a cluster YAML")
    fake.add_argument("path", type=Path)
    args = parser.parse_args(argv)

    if args.command == "node-resources":
        names = detect_gpu_names()
        resources = gpu_node_resources(names)
        if not resources:
            print(f"note: no A100 or RTX 3090 among this machine's GPUs {names}; it joins without a node type",
                  file=sys.stderr)
        print(json.dumps(resources))
        return 0
    if args.command == "fake-config":
        print(yaml.safe_dump(fake_cluster_config(args.path), sort_keys=False), end="")
        return 0
    if args.command == "pins":
        print(pins_command())
        return 0
    status = 0
    for path in args.paths:
        try:
            prepared = validate_cluster_file(path)
        except ClusterConfigError as exc:  # the message names the file, then one problem a line
            print(f"FAIL {exc}", file=sys.stderr)
            status = 1
            continue
        except Exception as exc:  # Ray's errors come in several types; show them all the same way
            print(f"FAIL {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        types = {name: t.get("resources", {}) for name, t in prepared["available_node_types"].items()}
        print(f"ok   {path}: storage {storage_path(load_cluster_yaml(path))}; node types {types}")
    return status


if __name__ == "__main__":
    sys.exit(main())
