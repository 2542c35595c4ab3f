"""Elastic runs: the worker pool's decisions (fair shares, growth into free workers only, what a
trial about to start needs) and the record of each worker group, without Ray. The runs on Ray
are in tests/test_tune.py (a sweep whose surviving trial grows) and bench/elastic_sweep.py."""

from __future__ import annotations

from reckoning_ray.core.elastic import (
    WorkerPool,
    append_event,
    history_text,
    read_events,
    steps_redone,
    timeline,
    water_fill,
)
from reckoning_ray.on_ray.elastic import worker_slots


def test_water_fill_gives_each_run_its_least_then_evens_out_up_to_its_most():
    assert water_fill(8, {"a": (1, 4), "b": (1, 4)}) == {"a": 4, "b": 4}
    assert water_fill(5, {"a": (1, 4), "b": (1, 4)}) == {"a": 3, "b": 2}
    assert water_fill(5, {"a": (1, 2), "b": (1, 4)}) == {"a": 2, "b": 3}
    assert water_fill(1, {"a": (1, 4), "b": (1, 4)}) == {"a": 1, "b": 1}  # each waits for its least
    assert water_fill(3, {}) == {}


def test_a_trial_grows_onto_what_stopped_trials_free_and_a_new_trial_still_starts():
    pool = WorkerPool(slots=4, concurrency=2)
    # the sweep's first trial, before the driver said how many wait: the second is counted in
    assert pool.start("a", 1, 4) == 2
    pool.release("a")
    pool.set_pending(5)
    # a trial about to start is counted in: the first takes half, not everything
    assert pool.start("a", 1, 4) == 2
    pool.set_pending(4)
    assert pool.start("b", 1, 4) == 2
    assert pool.resize("a", 2, 1, 4) == 2 and "a" not in pool.restart  # nothing free: no resize
    pool.release("b")  # ASHA stops b; a trial is waiting to start, so a keeps its share
    assert pool.resize("a", 2, 1, 4) == 2
    pool.set_pending(0)  # ... it starts
    assert pool.start("c", 1, 4) == 2
    pool.release("c")  # the last trial stopped: a takes the whole cluster at its next validation
    assert pool.resize("a", 2, 1, 4) == 4 and pool.restart == {"a": 4}
    assert pool.start("a", 1, 4) == 4 and pool.restart == {}  # its next group


def test_a_run_grows_only_into_free_workers_and_gives_back_above_its_share():
    pool = WorkerPool(slots=4)
    assert pool.start("a", 1, 4) == 4  # alone
    assert pool.start("b", 1, 4) == 1  # nothing free: b waits for its least
    assert pool.resize("b", 1, 1, 4) == 1  # still nothing free
    assert pool.resize("a", 4, 1, 4) == 2  # a holds more than its share while b waits
    assert pool.resize("b", 1, 1, 4) == 2  # the workers a gave back
    pool.set_slots(2)  # a node is lost
    assert pool.start("a", 1, 4) == 1  # a's group failed; it starts again with what is left


def test_worker_slots_count_the_places_of_live_nodes_for_one_worker_shape():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0, "a100": 4.0}},
             {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 4.0, "a100": 4.0}},
             {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0, "a100": 8.0}},
             {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert worker_slots(nodes, {"CPU": 1.0, "GPU": 1.0, "a100": 1.0}) == 4 + 2
    assert worker_slots(nodes, {"CPU": 2.0}) == 4 + 1 + 4


def test_the_record_of_worker_groups_gives_the_timeline_and_the_steps_redone(tmp_path):
    events = [("launch", 1, {"t": 10.0}), ("ready", 1, {"t": 40.0, "step": 0}),
              ("round", 1, {"t": 50.0, "round": 1, "step": 4}), ("end", 1, {"t": 51.0, "why": "resize to 2", "step": 4}),
              ("launch", 2, {"t": 52.0}), ("ready", 2, {"t": 80.0, "step": 4}),
              ("round", 2, {"t": 85.0, "round": 2, "step": 8}),
              ("launch", 1, {"t": 99.0}), ("ready", 1, {"t": 120.0, "step": 4}),  # a lost node: back to step 4
              ("round", 1, {"t": 130.0, "round": 3, "step": 12}), ("end", 1, {"t": 131.0, "why": "done", "step": 12})]
    for event, workers, fields in events:
        append_event(tmp_path, event, workers, **fields)
    with open(tmp_path / "workers.jsonl", "a") as f:
        f.write('{"event": "rou')  # a line cut by a killed writer
    groups = timeline(read_events(tmp_path))
    assert [(g["workers"], g["ready"] - g["launch"], g["rounds"], g["why"]) for g in groups] == [
        (1, 30.0, 1, "resize to 2"), (2, 28.0, 1, None), (1, 21.0, 1, "done")]
    assert steps_redone(groups) == 4  # 8 reached, resumed from 4; the resize redid none
    assert history_text([1, 2, 2, None, 1]) == "1x1 2x2 1x1" and history_text([]) == ""


def test_a_count_that_could_not_be_placed_replaces_the_decided_one():
    pool = WorkerPool(slots=4)
    assert pool.start("a", 1, 4) == 4
    assert pool.start("b", 1, 4) == 1
    pool.release("b")
    assert pool.resize("a", 2, 1, 4) == 4 and pool.next_start("a") == 4
    assert pool.hold("a", 2) == 2 and pool.next_start("a") is None  # 2 more could not be placed
    assert pool.held == {"a": 2}
