"""Where a driver's named actors live (the sweep's promotion board, its worker pool).

Nothing here imports Ray at import time.
"""

from __future__ import annotations

from typing import Any


def on_this_node() -> dict[str, Any]:
    """Actor options that place an actor on this process's node: a driver's named actor (no CPU
    of its own) would otherwise go to any node, and die with a worker node that is lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


__all__ = ["on_this_node"]
