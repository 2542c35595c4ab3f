"""The storage mirrors (reckoning_ray.core.storage) on a real S3-compatible server and on file:// URIs:
what a push uploads, deletes and skips, what a pull fetches, and which copy of a run directory wins."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from s3_server import StoreProxy, create_bucket, s3_server
from reckoning_ray.core.storage import (
    CACHE_ENV,
    JOURNAL,
    Mirror,
    RunMirror,
    StorageError,
    cache_root,
    pull_checkpoint,
    read_journal,
)
from reckoning_ray.core.sweep_store import SweepStore
from reckoning_ray.core.uploads import Uploader


def _run_dir(path: Path, latest: int, best: int) -> Path:
    """A run directory as checkpoint.save_checkpoint leaves it (latest and best kept)."""
    path.mkdir(parents=True, exist_ok=True)
    for step in {latest, best}:
        ckpt = path / "checkpoints" / f"step-{step:06d}"
        if ckpt.exists():
            continue  # a checkpoint is written once
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(bytes([step]) * 64)
        if step == latest:
            (ckpt / "trainer_state.pt").write_bytes(b"s" * 32)
    for old in (path / "checkpoints").iterdir():
        if old.name not in {f"step-{latest:06d}", f"step-{best:06d}"}:
            shutil.rmtree(old)
    if best != latest:
        (path / "checkpoints" / f"step-{best:06d}" / "trainer_state.pt").unlink(missing_ok=True)
    (path / "checkpoints.json").write_text(json.dumps({"latest": f"step-{latest:06d}", "best": f"step-{best:06d}"}))
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": latest}) + "\n")
    return path


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("s3")
    with s3_server(log_dir) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        create_bucket(env, "runs")
        try:
            yield "s3://runs"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_run_mirror_on_s3_keeps_the_record_and_its_checkpoints_only(tmp_path, bucket):
    remote = f"{bucket}/a/trials/t1"
    run = _run_dir(tmp_path / "node-a" / "t1", latest=2, best=2)
    (run / "wandb").mkdir()
    (run / "wandb" / "run.wandb").write_text("owned by the W&B writer")
    mirror = RunMirror(run, remote)
    assert mirror.sync_up() == 4  # config-less run: 2 checkpoint files, record, metrics
    assert mirror.sync_up() == 0  # nothing changed
    _run_dir(run, latest=4, best=2)
    assert mirror.sync_up() == 4  # the new checkpoint's 2 files, the record, the metrics
    files = mirror.remote_files()
    assert "wandb/run.wandb" not in files
    assert sorted(f for f in files if f.startswith("checkpoints/")) == [
        "checkpoints/step-000002/model.safetensors",  # the best lost its trainer state, remotely too
        "checkpoints/step-000004/model.safetensors", "checkpoints/step-000004/trainer_state.pt"]
    _run_dir(run, latest=6, best=6)
    mirror.sync_up()
    # the superseded checkpoints are gone from the store, directories included
    from pyarrow import fs

    infos = mirror.fs.get_file_info(fs.FileSelector(f"{mirror.root}/checkpoints", recursive=True))
    assert sorted(i.path.rsplit("/", 1)[-1] for i in infos if i.type == fs.FileType.Directory) == ["step-000006"]

    # another node: an empty run directory takes the store's; a current one is left alone
    other = RunMirror(tmp_path / "node-b" / "t1", remote)
    assert other.sync_down()
    assert json.loads((other.local / "checkpoints.json").read_text())["latest"] == "step-000006"
    assert (other.local / "checkpoints" / "step-000006" / "trainer_state.pt").is_file()
    assert not (other.local / "wandb").exists()
    assert not other.sync_down()
    assert other.sync_up() == 0  # what the store holds is not uploaded again

    # node A comes back with an older run directory than the store's (the trial went on on node B)
    _run_dir(other.local, latest=8, best=6)
    other.sync_up()
    stale = RunMirror(run, remote)
    assert stale.sync_down()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert (run / "metrics.jsonl").read_text() == (other.local / "metrics.jsonl").read_text()

    # a worker killed while it uploads (ASHA stopped its trial) leaves a checkpoint no record names:
    # a node that takes the store's run directory skips it, and pruning removes it from the store
    _run_dir(other.local, latest=10, best=6)
    for name in ("model.safetensors", "trainer_state.pt"):  # the files, not yet the record
        other._upload(f"checkpoints/step-000010/{name}")
    fresh = RunMirror(tmp_path / "node-c" / "t1", remote)
    assert fresh.sync_down()
    assert sorted(p.name for p in (fresh.local / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert fresh.prune() == ["step-000010"] and fresh.prune() == []
    assert not any(rel.startswith("checkpoints/step-000010") for rel in fresh.remote_files())

    # a push cut short (a kill, an outage) between deleting an old checkpoint's files and its
    # directory leaves the directory's marker, which a download of the bucket makes an empty
    # checkpoint directory of: the next push removes it, and so does pruning
    def cut_short(name: str) -> None:
        with other.fs.open_output_stream(f"{other.root}/checkpoints/{name}/model.safetensors") as f:
            f.write(b"old")
        other.fs.delete_file(f"{other.root}/checkpoints/{name}/model.safetensors")
        assert f"checkpoints/{name}" in other.remote_listing()[1]

    cut_short("step-000003")
    other.sync_up()
    assert "checkpoints/step-000003" not in other.remote_listing()[1]
    cut_short("step-000005")
    assert fresh.prune() == ["step-000005"]
    assert sorted(d for d in fresh.remote_listing("checkpoints")[1]) == ["checkpoints/step-000006",
                                                                         "checkpoints/step-000010"]


class RecordingMirror(RunMirror):
    """A run mirror that remembers the order of its uploads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.order: list[str] = []

    def _upload(self, rel, data=None):
        done = super()._upload(rel, data)
        self.order.append(rel)
        return done


def _stored_as_local(mirror: Mirror) -> None:
    """The store holds exactly the run directory's files (but the W&B writer's), byte for byte."""
    local = {rel for rel in mirror.local_files() if not rel.startswith("wandb")}
    assert sorted(mirror.remote_files()) == sorted(local)
    for rel in local:
        with mirror.fs.open_input_stream(f"{mirror.root}/{rel}") as f:
            assert f.read() == (mirror.local / rel).read_bytes(), rel


def test_uploads_wait_out_a_store_that_goes_away_and_keep_their_order(tmp_path, bucket, monkeypatch):
    """The store goes away between two validations: the push returns at once, a journal lists the
    backlog (the record last), training goes on; when the store is back the backlog goes, files
    before the record that names them, and the store ends as the run directory."""
    proxy = StoreProxy({"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]})
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.env["AWS_ENDPOINT_URL"])
    run = _run_dir(tmp_path / "node" / "t1", latest=2, best=2)
    mirror = RecordingMirror(run, f"{bucket}/outage/trials/t1")
    logged: list[str] = []
    uploads = Uploader(mirror, log=logged.append, first_delay_s=0.1, max_delay_s=0.4, **RunMirror.PUSH)
    assert uploads.flush(while_answering=True)  # the store answers: stored before the caller goes on
    _stored_as_local(mirror)

    proxy.down()
    _run_dir(run, latest=4, best=2)
    assert not uploads.flush(while_answering=True)  # returns once the store fails; the push goes on
    journal = read_journal(run)
    assert journal["remote"] == mirror.remote and journal["files"] == [
        "checkpoints/step-000004/model.safetensors", "checkpoints/step-000004/trainer_state.pt", "metrics.jsonl",
        "checkpoints.json"]  # the record after the checkpoint it names
    assert mirror.remote in logged[0] and "unreachable" in logged[0] and str(run / JOURNAL) in logged[0]
    _run_dir(run, latest=6, best=6)  # training goes on meanwhile
    assert not uploads.flush(while_answering=True)
    assert read_journal(run)["files"][-1] == "checkpoints.json"

    mirror.order.clear()
    proxy.up()
    assert uploads.flush(timeout_s=120)
    assert not (run / JOURNAL).exists() and "answers again" in logged[-1]
    record = mirror.order.index("checkpoints.json")
    assert all(mirror.order.index(rel) < record for rel in mirror.order if rel.startswith("checkpoints/step-000006"))
    _stored_as_local(mirror)  # step-2 and step-4 are gone from the store too
    assert uploads.close(wait_s=10) == []


def test_a_run_that_ends_while_the_store_is_away_leaves_its_backlog_to_sync(tmp_path, bucket, monkeypatch, capsys):
    """The store is away when the run ends: after tune.storage_wait_s the run finishes from its
    local files, naming what is left; a restart on the node trains on from its own checkpoint;
    `tune sync` uploads the backlog when the store is back."""
    from reckoning_ray.tune import main as tune_main

    proxy = StoreProxy({"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]})
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    sweep = f"{bucket}/away"
    run = _run_dir(cache_root() / "away" / "trials" / "t1", latest=2, best=2)
    mirror = RunMirror(run, f"{sweep}/trials/t1")
    logged: list[str] = []
    uploads = Uploader(mirror, log=logged.append, first_delay_s=0.1, max_delay_s=0.4, **RunMirror.PUSH)
    assert uploads.flush(while_answering=True)
    proxy.down()
    _run_dir(run, latest=4, best=4)
    (run / "summary.json").write_text("{}")
    left = uploads.close(wait_s=1)
    assert left == read_journal(run)["files"] and left[-2:] == ["checkpoints.json", "summary.json"]
    assert "finished from its local files" in logged[-1] and "reckoning_ray.tune sync" in logged[-1]

    # a restart on this node: the store does not answer, the node's own newest checkpoint is there
    restarted: list[str] = []
    again = RunMirror(run, mirror.remote)
    assert not again.sync_down(log=restarted.append)
    assert "training on from this node's own checkpoint (step 4)" in restarted[0]
    assert again.changed(exclude=RunMirror.PUSH["exclude"]) == sorted(left)  # the backlog goes with its first push
    with pytest.raises(StorageError, match="cannot read"):  # a node without a checkpoint cannot start
        RunMirror(tmp_path / "other-node" / "t1", mirror.remote).sync_down(log=restarted.append)
    assert tune_main(["sync", sweep]) == 2  # still away: one line, the journal stays
    assert "run this again when the store answers" in capsys.readouterr().err and read_journal(run)

    proxy.up()
    assert tune_main(["sync", sweep]) == 0
    assert f"{len(left)} file(s) of 1" in capsys.readouterr().out
    assert read_journal(run) is None
    _stored_as_local(RunMirror(run, mirror.remote))
    assert tune_main(["sync", sweep]) == 0 and "nothing waits to upload" in capsys.readouterr().out
    assert tune_main(["sync", str(tmp_path)]) == 2


def test_pull_takes_missing_and_newer_files_and_checkpoints_once(tmp_path):
    remote = f"file://{tmp_path / 'store'}"
    writer = Mirror(tmp_path / "worker", remote)
    (writer.local / "trials" / "t").mkdir(parents=True)
    (writer.local / "trials" / "t" / "metrics.jsonl").write_text("1\n")
    writer.push()
    reader = Mirror(tmp_path / "driver", remote)
    assert reader.pull() == 1 and reader.pull() == 0
    (writer.local / "trials" / "t" / "metrics.jsonl").write_text("1\n2\n")
    os.utime(writer.local / "trials" / "t" / "metrics.jsonl", ns=(2 * 10**18, 2 * 10**18))  # later
    writer.push()
    assert reader.pull() == 1
    assert (reader.local / "trials" / "t" / "metrics.jsonl").read_text() == "1\n2\n"
    # a local file written after the stored one stays (the driver's own W&B files, an unpushed round)
    (reader.local / "trials" / "t" / "metrics.jsonl").write_text("1\n2\n3\n")
    os.utime(reader.local / "trials" / "t" / "metrics.jsonl", ns=(3 * 10**18, 3 * 10**18))
    assert reader.pull() == 0

    run = _run_dir(tmp_path / "run", latest=3, best=1)
    RunMirror(run, f"{remote}/run").sync_up()
    best = pull_checkpoint(tmp_path / "tester" / "run", f"{remote}/run", "best")
    assert best.name == "step-000001" and (best / "model.safetensors").read_bytes() == bytes([1]) * 64
    assert not (tmp_path / "tester" / "run" / "checkpoints" / "step-000003").exists()  # only the best


def test_sweep_store_splits_files_by_writer(tmp_path):
    remote = f"file://{tmp_path / 'store'}/sweep"
    store = SweepStore(tmp_path / "driver", remote)
    (store.local / "trials" / "t").mkdir(parents=True)
    for name in ("sweep_config.yaml", "asha_state.json", "stray.txt"):
        (store.local / name).write_text(name)
    (store.local / "trials" / "t" / "wandb_run.json").write_text("{}")
    (store.local / "trials" / "t" / "metrics.jsonl").write_text("from the driver's stale copy\n")
    assert store.push_sweep()  # the sweep's own files, nothing else
    assert store.push_trial("t")  # the W&B writer's record, never the workers' metrics
    assert sorted(store.sweep.remote_files()) == ["asha_state.json", "sweep_config.yaml", "trials/t/wandb_run.json"]
    (store.local / "asha_state.json").unlink()  # a fresh sweep of the same name
    store.push_sweep()
    assert "asha_state.json" not in store.sweep.remote_files()


def test_bad_storage_uri_names_the_setting(tmp_path, monkeypatch):
    with pytest.raises(StorageError, match="tune.storage_path"):
        Mirror(tmp_path, "nosuchscheme://bucket/x")
    monkeypatch.setenv("RECKONING_RUNS_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"


def test_a_store_that_cannot_be_written_stops_the_sweep_before_ray(tmp_path, bucket):
    import subprocess
    import sys

    from reckoning_ray.core.errors import ConfigError
    from reckoning_ray.on_ray.sweep import run
    from reckoning_ray.core.config import load_config

    Mirror(tmp_path / "ok", f"{bucket}/reachable").check_access()  # the bucket exists: no error
    with pytest.raises(StorageError, match=r"cannot write under s3://no-such-bucket/x"):
        Mirror(tmp_path / "missing", "s3://no-such-bucket/x").check_access()
    # the sweep: one line, exit status 2, before Ray starts
    cfg = load_config(None, ["tune.storage_path=s3://no-such-bucket/sweeps", "tune.name=typo",
                             "tune.space=embedded"])
    import ray

    with pytest.raises(ConfigError, match=r"^tune.storage_path: cannot write under s3://no-such-bucket/sweeps/typo"):
        run(cfg)
    assert not ray.is_initialized()
    # a store that cannot even be opened (here: an unknown scheme) is the same one-line input error
    cfg.tune.storage_path = "nosuchscheme://bucket/x"
    with pytest.raises(ConfigError, match=r"storage nosuchscheme://bucket/x/typo: .*tune.storage_path must be"):
        run(cfg)
    assert not ray.is_initialized()
    out = subprocess.run([sys.executable, "-m", "reckoning_ray.tune", "tune.storage_path=s3://no-such-bucket/sweeps"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tune.storage_path: cannot write under s3://no-such-bucket/sweeps" in lines[0], lines


def test_report_of_a_sweep_in_the_store_reads_the_bucket_and_writes_back_to_it(tmp_path, bucket, monkeypatch, capsys):
    from sweep_files import write_sweep

    from reckoning_ray.core.storage import CACHE_ENV
    from reckoning_ray.on_ray.report import PICTURES
    from reckoning_ray.tune import main as tune_main

    written = write_sweep(tmp_path / "written")
    Mirror(written, f"{bucket}/report-sweep").push()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert tune_main(["report", f"{bucket}/report-sweep"]) == 0
    out = capsys.readouterr().out
    assert f"report copied to {bucket}/report-sweep/report/" in out
    remote = Mirror(tmp_path / "elsewhere", f"{bucket}/report-sweep").remote_files()
    assert {f"report/{name}" for name in PICTURES + ("report.html",)} <= set(remote)
