"""Test-wide settings and the helpers several test files share.

Settings: one CPU thread per test process (2-core machines; Ray tests run workers beside the test
process) and no W&B network access.
"""

import ast
import csv
import importlib.util
import os
import random
import re
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# the real ProofWriter / CLUTRR samples beside the repository (never copied into it)
SHARED_DATA = REPO.parent / "shared" / "data"
PROOFWRITER_DEV = SHARED_DATA / "proofwriter-owa-natlang-dev.jsonl"
CLUTRR_TEST = SHARED_DATA / "clutrr-gen_train23_test2to10-test.csv"

# The embedded preset's earlier task, for tests of mechanics rather than of learning: one-fact
# ProofWriter-style yes/no questions (8 names x 8 adjectives), a label-only target (a few tokens to
# generate) and outer AdamW 1e-3. A few dozen steps learn it, so sweeps, resumes and the engine's
# end-to-end checks stay fast whatever the embedded preset's own (harder, multi-hop) task is.
ONE_FACT = [
    "data.hops=[0]", "data.distractors=0", "data.generator.num_entities=8", "data.generator.num_attributes=8",
    'data.generator.labels=["yes","no"]', "outer.multi_task=false", "outer.lr=1e-3", "eval.max_new_tokens=4",
    "model.max_length=32",
]


# The Ray tests run in two lanes, two xdist groups: the tests of a lane run one after the other on
# one worker, and the two lanes run side by side (each command's local Ray instance is its own:
# reckoning_ray.on_ray.trainer.init_ray; a fake cluster has its own ports and temp dir). A module
# stays in one lane (module-scoped fixtures start Ray once), and the users of the suite-wide fake
# cluster share the "cluster" lane. The split evens out the lanes' measured minutes: the ASHA sweep,
# the Ray Train runs and the installed wheel's sweep in one; the object-store sweep, the paper on
# the fake cluster and the other cluster tests in the other.
CLUSTER_LANE = ("test_object_store.py", "test_node_loss.py", "test_cluster.py", "test_cluster_sweep.py")


def ray_lane(item) -> str:
    return "ray-cluster" if item.path.name in CLUSTER_LANE else "ray-local"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``ray`` form two xdist groups, the lanes (``ray_lane``); they are collected
    first, so that each lane's long chain starts at once on a worker of its own, and the users of
    the suite-wide fake cluster come last in their lane (the cluster lives until the session ends).
    The other tests follow, the slow ones first: whichever worker ends its lane first takes them."""
    ray = [item for item in items if item.get_closest_marker("ray")]
    ray.sort(key=lambda item: "fake_a100_cluster" in getattr(item, "fixturenames", ()))  # stable
    for item in ray:
        item.add_marker(pytest.mark.xdist_group(ray_lane(item)))
    rest = [item for item in items if not item.get_closest_marker("ray")]
    rest.sort(key=lambda item: not item.get_closest_marker("slow"))  # stable
    items[:] = ray + rest


def pytest_collection_finish(session):
    """Refuse to spread the Ray tests over the workers: under ``--dist loadgroup`` xdist marks each
    grouped test's id with its lane (``@ray-...``); a pytest / xdist pair that does not (xdist 3.8
    with pytest 9) would spread them over the workers."""
    if getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        spread = [item for item in session.items
                  if item.get_closest_marker("ray") and not item.nodeid.endswith("@" + ray_lane(item))]
        if spread:
            raise pytest.UsageError(f"pytest-xdist did not group the Ray tests ({spread[0].nodeid} has no "
                                    f"@{ray_lane(spread[0])}): install the pytest the test extra allows "
                                    "(pytest>=8,<9), or run with -n 0")


class CodeOnUnpickle:
    """A pickle that runs code when loaded: unpickling it creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def load_bench(name: str):
    """bench/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sweep_command(space, storage, name: str, *overrides: str) -> list:
    """``python -m reckoning_ray.tune`` on the embedded preset with a search space file, a storage
    path and a sweep name: one sample per point, short trials (64 training tasks, one epoch, no
    early stopping); ``overrides`` come last and win."""
    return [
        sys.executable, "-m", "reckoning_ray.tune", "embedded", f"space={space}",
        f"tune.storage_path={storage}", f"tune.name={name}", "tune.num_samples=1",
        "data.num_train=64", "data.num_validation=32", "train.epochs=1", "train.patience=0", *overrides,
    ]


# ------------------------------------------------------------------------ csv2txt, as a fixture
# NicolasAG/clutrr's clutrr/store/relations_store.yaml ("p" templates per relation word) and
# question_store.yaml; the generator fills e_1 / e_2 with "[Name]" and appends ". ".

_OWN = {
    "son": ["e_1 has a son called e_2", "e_2 is e_1's son"],
    "daughter": ["e_1 has a daughter called e_2", "e_2 is e_1's daughter"],
    "husband": ["The husband of e_1 is e_2", "e_2 is e_1's husband"],
    "wife": ["e_1 has a wife who is e_2", "e_2 is e_1's wife"],
    "brother": ["e_1 has a brother named e_2", "e_2 is e_1's brother"],
    "sister": ["e_1 has a sister named e_2", "e_2 is e_1's sister"],
    "grandson": ["e_1 has a grandson who is e_2", "e_2 is e_1's grandson"],
    "granddaughter": ["e_1 has a granddaughter who is e_2", "e_2 is e_1's granddaughter"],
    "son-in-law": ["e_1 has a son-in-law who is e_2"],
    "daughter-in-law": ["e_1 has a daughter-in-law who is e_2"],
}
QUESTIONS = [
    "How is e_1 related to e_2 ?",
    "How are e_1 and e_2 related to each other ?",
    "Who is e_2 from the point of relation of e_1 ?",
    "For e_1, who is e_2 ?",
    "What is the family connection between e_1 and e_2 ?",
]


def templates(relation: str) -> list[str]:
    common = [f"e_2 is a {relation} to e_1", f"e_2 is a {relation} of e_1", f"e_2 is the {relation} of e_1"]
    return common + _OWN.get(relation, [f"e_2 is e_1's {relation}"])


def fill(template: str, e1: str, e2: str) -> str:
    return template.replace("e_1", f"[{e1}]").replace("e_2", f"[{e2}]") + ". "


def moses(text: str) -> str:
    """sacremoses' MosesTokenizer(lang='en').tokenize(text, return_str=True, escape=False) on
    these sentences: 's and sentence punctuation become tokens."""
    text = re.sub(r"(\w)'s\b", r"\1 's", text)
    text = re.sub(r"([.,?!:])(?=\s|$)", r" \1", text)
    return " ".join(text.split())


def unbracket(text: str) -> str:
    return text.replace("[", "").replace("]", "").replace("  ", " ").strip()


def sample_relation(rng: random.Random) -> tuple[str, str]:
    return rng.choice([("a", "to"), ("a", "of"), ("the", "of")])


def csv2txt_line(row: dict, rng: random.Random, proof_type: str = "short", gender_aware: bool = False,
                 anonymise: bool = False, neice: bool = False) -> str:
    """One SG line from one CLUTRR CSV row, as csv2txt.py (reversed=no) writes it."""
    people = [p.split(":") for p in row["genders"].split(",")]
    names = [n for n, _ in people]
    word = (lambda r: "neice" if r == "niece" else r) if neice else (lambda r: r)
    edges = ast.literal_eval(row["story_edges"])
    story = [fill(rng.choice(templates(r)).replace(r, word(r)), names[a], names[b])
             for (a, b), r in zip(edges, ast.literal_eval(row["edge_types"]))]
    story = rng.sample(story, len(story))  # build_story_text shuffles the story's sentences
    q0, q1 = ast.literal_eval(row["query"])
    query = (rng.choice(QUESTIONS).replace("e_1", f"[{q0}]").replace("e_2", f"[{q1}]") + ". ").replace("?.", "?")
    target = row["target_text"]
    answer = fill(rng.choice(templates(target)).replace(target, word(target)), q0, q1)
    if proof_type == "short":
        proof = ""
        for element in ast.literal_eval(row["proof_state"])[::-1]:
            for result, premises in element.items():
                (r11, r12), (r21, r22), (r31, r32) = (sample_relation(rng) for _ in range(3))
                proof += (f"Since {premises[1][2]} is {r11} {premises[1][1]} {r12} {premises[1][0]}, and "
                          f"{premises[0][2]} is {r21} {premises[0][1]} {r22} {premises[0][0]}, then "
                          f"{result[2]} is {r31} {result[1]} {r32} {result[0]}. ")
    else:
        proof = "none"
    story, query, answer, proof = (moses(unbracket(t)) for t in (" ".join(story), query, answer, proof))
    if gender_aware:  # csv2txt replaces each name by name[gender] in the story
        story = " ".join(f"{t}[{dict(people)[t]}]" if t in names else t for t in story.split())
    if anonymise:
        anon = {n: f"ent_{i + 1}" for i, n in enumerate(names)}
        story, query, answer, proof = (" ".join(anon.get(t, t) for t in part.split())
                                       for part in (story, query, answer, proof))
    return f"<STORY> {story} <QUERY> {query} <PROOF> {proof} <ANSWER> {answer} \n"


def csv_rows() -> list[dict]:
    with open(CLUTRR_TEST, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def level_of(row: dict) -> int:
    return int(row["task_name"].split(".")[1])


def clutrr_sg_release(root: Path, levels=(2, 4, 6)) -> dict:
    """The shared CLUTRR CSV as a CLUTRR-SG release under ``root`` (SGinPG's layout, lines as its
    ``scripts/csv2txt.py`` writes them): the given levels split a third each into train / valid /
    test, the other levels test only; short and no proof files of each, plus query-only files the
    reader skips. Returns {(file name without .txt[.N], line): CSV row}."""
    root = Path(root) / "forward"
    rng = random.Random(0)
    by_level: dict[int, list[dict]] = {}
    for row in csv_rows():
        by_level.setdefault(level_of(row), []).append(row)
    where = {}
    for k, rows in sorted(by_level.items()):
        parts = {"train": rows[0::3], "valid": rows[1::3], "test": rows[2::3]} if k in levels else {"test": rows}
        for split, part in parts.items():
            folder = root / "test" / str(k) if split == "test" else root / split
            folder.mkdir(parents=True, exist_ok=True)
            suffix = "ANON.txt" if split == "test" else "anon.txt.4000"
            for proof in ("short", "no"):
                name = f"{proof}_proof_1.{k}_{split}_facts_{suffix}"
                lines = [csv2txt_line(row, rng, proof, neice=bool(i % 2)) for i, row in enumerate(part)]
                (folder / name).write_text("".join(lines), encoding="utf-8")
                prefix = re.sub(r"\.txt(\.\d+)?$", "", name)  # record ids: <name without .txt[.N]>:<line>
                where.update({(prefix, i + 1): row for i, row in enumerate(part)})
            if split == "test":
                (folder / f"queries_1.{k}_test_facts_ANON.txt").write_text(
                    "<STORY> A is the son of B . <QUERY> How is B related to A ? <PROOF> . . . <ANSWER> . . . \n",
                    encoding="utf-8")
    return where


# ------------------------------------------------------------------------ the paper's data, fetched
# every cell with the embedded model: a few tasks, one optimizer step, a short answer
PAPER_MINI = [
    "model.name_or_path=embedded", "model.n_layer=1", "model.n_embd=32", "model.n_positions=512",
    "model.dtype=float32", "resources.use_gpu=false", "resources.cpus_per_worker=1", "resources.max_failures=0",
    "train.max_steps=1", "train.validations_per_epoch=1", "data.num_train=8", "data.num_validation=4",
    "data.num_test=4", "eval.max_new_tokens=6", "tracking.mode=offline",
]


def _owa_archive(path: Path) -> Path:
    """A release-shaped ProofWriter zip from the shared sample: its theories split among
    depth-{2,3,5}'s train / dev / test files."""
    import zipfile

    lines = PROOFWRITER_DEV.read_text().splitlines()
    with zipfile.ZipFile(path, "w") as z:
        for d, depth in enumerate((2, 3, 5, 0, 1)):  # the release's depths; the tables read 2, 3, 5
            for s, split in enumerate(("train", "dev", "test")):
                part = lines[(3 * d + s)::9] if depth in (2, 3, 5) else lines[s:s + 3]
                z.writestr(f"proofwriter-dataset-V2020.12.3/OWA/depth-{depth}/meta-{split}.jsonl", "\n".join(part) + "\n")
    return path


@pytest.fixture(scope="session")
def paper_data(tmp_path_factory):
    """The data of every table, fetched as a user fetches it: ProofWriter from a local archive,
    CLUTRR-SG from text files converted from the shared CLUTRR CSV as SGinPG's csv2txt.py does."""
    import hashlib

    from reckoning_ray.core.paper import CLUTRR_SG_LEVELS
    from reckoning_ray.data import main as data_main

    root = tmp_path_factory.mktemp("paper-data")
    archive = _owa_archive(root / "proofwriter.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert data_main(["fetch", "proofwriter", "--archive", str(archive), "--sha256", digest,
                      "--to", str(root / "proofwriter")]) == 0
    clutrr_sg_release(root / "clutrr-sg", levels=CLUTRR_SG_LEVELS)
    return {"proofwriter": str(root / "proofwriter"), "clutrr-sg": str(root / "clutrr-sg")}


# ------------------------------------------------------------------------ one suite-wide fake cluster

@pytest.fixture(scope="session")
def fake_a100_cluster():
    """A fake autoscaling cluster with cluster/a100.yaml's node types (a head, then one a100 and
    one rtx3090 node added on demand) for the tests that only need a cluster to exist; tests that
    tear a cluster down or kill a node start their own. Ray Train keeps its run and worker records
    (state tracking, for the state API). Token authentication is off for it and its clients (Ray
    2.60 turns it on wherever ~/.ray/auth_token exists, and the dashboard then answers 401)."""
    import time

    from reckoning_ray.ops import fake_cluster as fc

    started = time.time()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        with fc.fake_cluster(REPO / "cluster" / "a100.yaml", cpus_per_node=1, max_workers_per_type=1,
                             env={"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_AUTH_MODE": "disabled"}) as cluster:
            print(f"fake cluster up in {time.time() - started:.1f}s at {cluster.address}")
            yield cluster
    # Teardown killed every process of the cluster (fake_cluster's finally).


@pytest.fixture
def one_thread():
    """One intra-op thread, as a training worker of the embedded preset runs
    (resources.cpus_per_worker=1): for these small models, synchronising threads costs more than
    the arithmetic, and stalls badly on a busy machine. Modules of small-model tests use it for
    every test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
