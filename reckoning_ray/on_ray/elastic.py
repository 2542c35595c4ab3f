"""Elastic runs on Ray: the :class:`~reckoning_ray.core.elastic.WorkerPool` as a named actor that
counts the cluster's worker places itself, and the Tune callback that tells it which trials wait
to start and which ended.

The pool is created by whoever starts the runs that share it: a sweep's driver (one pool for all
its trials, :func:`pool_name`) or a ``train`` command (a pool of one run); it lives as long as that
process. Runs and their rank-0 workers reach it by name.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.tune import Callback

from reckoning_ray.core.elastic import WorkerPool
from reckoning_ray.on_ray.actors import on_this_node


def worker_slots(nodes: list[dict[str, Any]], per_worker: dict[str, float]) -> int:
    """How many workers asking for ``per_worker`` the live ``nodes`` (``ray.nodes()``) hold in all."""
    need = {k: float(v) for k, v in per_worker.items() if float(v) > 0}
    slots = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        slots += int(min((have.get(k, 0.0) + 1e-9) // v for k, v in need.items())) if need else 0
    return slots


class ClusterPool(WorkerPool):
    """A :class:`WorkerPool` whose slots are the places of the live nodes for one worker shape,
    counted again before every decision (a lost node leaves, an added node joins)."""

    def __init__(self, per_worker: dict[str, float], concurrency: int = 1) -> None:
        self.per_worker = dict(per_worker)
        super().__init__(0, concurrency)
        self._count()

    def _count(self) -> None:
        import ray

        self.set_slots(worker_slots(ray.nodes(), self.per_worker))

    def start(self, run: str, least: int, most: int) -> int:
        self._count()
        return super().start(run, least, most)

    def resize(self, run: str, current: int, least: int, most: int) -> int:
        self._count()
        return super().resize(run, current, least, most)


def placeable(count: int, least: int, per_worker: dict[str, float], timeout_s: float = 10.0,
              log: Any = print) -> int:
    """The most workers, from ``count`` down to ``least``, that the cluster places now: a
    placement group of that many worker bundles is reserved and released again. The node list
    can still show a node that was just lost, and another run may hold workers it has not yet
    released; ``least`` is never checked (the run waits for it, as a fixed run does)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    for workers in range(int(count), int(least), -1):
        group = placement_group([dict(per_worker)] * workers, strategy="PACK")
        try:
            ready = group.wait(timeout_seconds=timeout_s)
        finally:
            remove_placement_group(group)
        if ready:
            return workers
        log(f"{workers} worker(s) cannot be placed within {timeout_s:.0f}s; trying {workers - 1}")
    return int(least)


def pool_name(kind: str, name: str) -> str:
    return f"reckoning-ray-workers/{kind}/{name}"


class PoolClient:
    def __init__(self, actor: Any, name: str) -> None:
        self.actor, self.name = actor, name

    def __getattr__(self, method: str) -> Any:
        import ray

        remote = getattr(self.actor, method)
        return lambda *args: ray.get(remote.remote(*args))


def worker_pool(name: str, per_worker: Optional[dict[str, float]] = None, concurrency: int = 1) -> PoolClient:
    """The pool named ``name``; with ``per_worker`` (the workers' resources) started here if it
    is not running (it lives as long as this process)."""
    import ray

    if per_worker is None:
        return PoolClient(ray.get_actor(name), name)
    actor = ray.remote(num_cpus=0)(ClusterPool).options(name=name, get_if_exists=True, **on_this_node()).remote(
        per_worker, concurrency)  # on the driver's node: a lost worker node does not take it along
    return PoolClient(actor, name)


class ElasticCallback(Callback):
    """Tells the sweep's pools (one per node type) how many trials wait to start, and which
    trials ended (finished, stopped by the scheduler, failed): their workers go to the others."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._pending: Optional[int] = None
        self._ended: set[str] = set()

    def _pools(self) -> list[Any]:
        import ray

        return [ray.get_actor(name) for name in self.names]

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        pending = sum(1 for t in trials if t.status == "PENDING")
        if pending != self._pending:
            self._pending = pending
            for pool in self._pools():
                pool.set_pending.remote(pending)
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self._ended:
                self._release(trial)

    def _release(self, trial: Any) -> None:
        self._ended.add(trial.trial_id)
        for pool in self._pools():
            pool.release.remote(trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.discard(trial.trial_id)  # a trial started again (a resumed sweep)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)


__all__ = ["ClusterPool", "ElasticCallback", "PoolClient", "placeable", "pool_name", "worker_pool", "worker_slots"]
