"""Cluster YAMLs under cluster/: Ray's validation, the project's checks (node types, storage, the
pinned node software, placeholders, W&B keys), the README's install and commands, the job
submission that carries W&B keys, and a fake autoscaling cluster with the same node types (no
cloud account, no GPU)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import click
import jsonschema
import pytest
import yaml

from reckoning_ray import cluster as cluster_cli
from reckoning_ray.ops import checks as rc
from reckoning_ray.ops import fake_cluster as fc
from reckoning_ray.ops import jobs, pins
from reckoning_ray.core.config import available_presets, load_config, node_type_for

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
A100_YAML = CLUSTER_DIR / "a100.yaml"
LOCAL_YAML = CLUSTER_DIR / "local.yaml"
CLUSTER_YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))
# What a user fills in for the placeholders of the shipped a100.yaml.
FILLED = {"YOUR-BUCKET": "my-results-bucket", "YOUR-ACCOUNT-ID": "123456789012"}


def _filled_copy(path: Path, tmp_path: Path) -> Path:
    text = path.read_text()
    for placeholder, value in FILLED.items():
        text = text.replace(placeholder, value)
    copy_path = tmp_path / path.name
    copy_path.write_text(text)
    return copy_path


def test_every_cluster_yaml_is_found():
    assert [p.name for p in CLUSTER_YAMLS] == ["a100.yaml", "local.yaml"]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_validation_and_project_checks(path: Path, tmp_path: Path):
    filled = _filled_copy(path, tmp_path)
    prepared = rc.validate_cluster_file(filled)
    # prepare_config merged Ray's defaults: these only exist after it ran.
    assert "cluster_synced_files" in prepared and prepared["head_node_type"] in prepared["available_node_types"]
    assert rc.project_problems(rc.load_cluster_yaml(path)) == []
    assert rc.text_problems(filled.read_text()) == []


def test_shipped_a100_yaml_fails_only_on_its_placeholders(capsys):
    text = A100_YAML.read_text()
    expected = [(number, name) for number, line in enumerate(text.splitlines(), start=1)
                for name in dict.fromkeys(re.findall(r"YOUR-[A-Z0-9-]*[A-Z0-9]", line))]
    assert sorted({name for _, name in expected}) == sorted(FILLED)
    with pytest.raises(rc.ClusterConfigError) as info:
        rc.validate_cluster_file(A100_YAML)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{A100_YAML}:"
    assert lines[1:] == [f"  - line {n}: placeholder {name}: replace it with {rc.PLACEHOLDER_HINTS[name]} "
                         f"(cluster/README.md, 'Before the first start')" for n, name in expected]
    # The command line: non-zero, the same lines, nothing about local.yaml but its summary.
    assert cluster_cli.main(["check", str(A100_YAML), str(LOCAL_YAML)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"FAIL {line}" if i == 0 else line for i, line in enumerate(lines)]
    assert out.startswith(f"ok   {LOCAL_YAML}: storage /mnt/shared/reckoning-ray")


def test_a100_yaml_node_types():
    cfg = rc.load_cluster_yaml(A100_YAML)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 8, "GPU": 0}
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    by_gpu = {g: [n for n, t in types.items() if t["resources"].get(g)] for g in rc.GPU_NODE_TYPES}
    assert by_gpu == {"a100": ["ray.worker.a100"], "rtx3090": ["ray.worker.rtx3090"]}
    a100, rtx = types["ray.worker.a100"], types["ray.worker.rtx3090"]
    assert (a100["node_config"]["InstanceType"], a100["resources"]) == ("p4d.24xlarge", {"CPU": 96, "GPU": 8, "a100": 8})
    assert (rtx["node_config"]["InstanceType"], rtx["resources"]) == ("g5.12xlarge", {"CPU": 48, "GPU": 4, "rtx3090": 4})
    for t in (a100, rtx):
        assert (t["min_workers"], t["max_workers"]) == (0, 2)
    assert cfg["file_mounts"] == {"~/reckoning-ray": "."}
    assert rc.storage_path(cfg) == "s3://YOUR-BUCKET/reckoning-ray"


# -- one constraints file: CI, the README's GPU install and every cluster's setup_commands ---------

def test_readme_gpu_install_is_the_nodes_install_line():
    section = pins.readme_section((REPO / "README.md").read_text())
    assert [line for line in _shell_lines(section) if line] == [pins.INSTALL_COMMAND]
    assert pins.pip_installs(pins.pins_command()) == [["-c", "constraints.txt", "-e", ".[cluster]"]]


def test_ci_and_the_main_job_install_with_the_constraints_file():
    # .ci/run runs the README's test command; every pip install there and in the main job's
    # command uses constraints.txt (sweeps is installed --no-deps: its pins are not taken).
    text = (REPO / "README.md").read_text()
    test_command = text.split("<!-- test-command:start -->", 1)[1].split("<!-- test-command:end -->", 1)[0]
    main_job = next(line for line in text.splitlines() if line.endswith("python -m reckoning_ray.tune"))
    for command in (test_command, main_job):
        installs = [args for line in _shell_lines(command) for args in pins.pip_installs(line)]
        assert len(installs) >= 2
        for args in installs:
            assert args[:2] == ["-c", "constraints.txt"] or args[:1] == ["--no-deps"], args


def test_constraints_pin_every_requirement_at_an_allowed_version():
    from packaging.requirements import Requirement

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    node = pins.node_pins()
    assert node["torch"] == "2.13.0" and "+" not in node["torch"]  # the CPU and the CUDA build alike
    for spec in project["dependencies"] + extras["cluster"] + extras["test"] + extras["bench"]:
        req = Requirement(spec)
        name = pins.normalize(req.name)
        assert name in node, f"{name} ({spec} in pyproject.toml) is not pinned in constraints.txt"
        assert req.specifier.contains(node[name], prereleases=True), \
            f"constraints.txt pins {name}=={node[name]}, outside pyproject's {spec}"
    # what is installed here is what the file pins (the test command installs with it)
    from importlib import metadata

    for name in ("torch", "ray", "transformers", "wandb", "datasets", "numpy", "scipy"):
        assert metadata.version(name).split("+")[0] == node[name], name


def test_constraints_file_errors_name_the_line(tmp_path: Path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("# pins\ntorch==2.13.0\nray>=2.5\n")
    with pytest.raises(pins.PinsError, match=r"constraints.txt:3: 'ray>=2.5' is not a name==version pin"):
        pins.node_pins(bad)
    with pytest.raises(pins.PinsError, match="run this from a checkout"):
        pins.node_pins(tmp_path / "absent.txt")


@pytest.mark.parametrize("text, installs", [
    ('pip install -c constraints.txt "torch>=2.4"', [["-c", "constraints.txt", "torch>=2.4"]]),
    ("python3 -m pip install -U 'ray[default]==2.60.0' boto3", [["-U", "ray[default]==2.60.0", "boto3"]]),
    ('cd ~/x && pip install -e ".[cluster]"; echo done', [["-e", ".[cluster]"]]),
    ("~/venv/bin/pip3.11 install a && pip install b", [["a"], ["b"]]),
    ("pip download torch; pip uninstall -y torch; echo pip install x", []),
])
def test_pip_installs(text: str, installs: List[List[str]]):
    assert pins.pip_installs(text) == installs


def test_readme_section_missing_markers():
    with pytest.raises(ValueError, match="gpu-install:start"):
        pins.readme_section("# no install section here")


def _shell_lines(text: str) -> List[str]:
    """Command lines of a Markdown bash block: backslash continuations joined, fences and ``$ `` dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            continue
        line = line[2:] if line.startswith("$ ") else line
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines + ([pending] if pending else [])


# -- broken copies: who rejects them -------------------------------------------------------------

def _ray_error(cfg: Dict[str, Any]) -> Exception | None:
    try:
        rc.ray_validate(cfg)
    except Exception as exc:  # noqa: BLE001 - the test records what Ray raised
        return exc
    return None


def _parent(cfg: Dict[str, Any], path: str) -> tuple[Dict[str, Any], str]:
    """The mapping holding the last key of ``path`` ("a/b/c"), and that key."""
    *parents, last = path.split("/")
    for key in parents:
        cfg = cfg[key]
    return cfg, last


def _set(path: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(cfg: Dict[str, Any]) -> None:
        node, key = _parent(cfg, path)
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value
    return mutate


def _rename(path: str, new: str) -> Callable[[Dict[str, Any]], None]:
    def mutate(cfg: Dict[str, Any]) -> None:
        node, key = _parent(cfg, path)
        node[new] = node.pop(key)
    return mutate


def _all(*mutations: Callable[[Dict[str, Any]], None]) -> Callable[[Dict[str, Any]], None]:
    def mutate(cfg: Dict[str, Any]) -> None:
        for m in mutations:
            m(cfg)
    return mutate


def _storage_command(replacement: str | None) -> Callable[[Dict[str, Any]], None]:
    """Replace (None: drop) the setup command that sets the storage path."""
    def mutate(cfg: Dict[str, Any]) -> None:
        commands = cfg["setup_commands"]
        index = next(i for i, c in enumerate(commands) if jobs.STORAGE_ENV in c)
        if replacement is None:
            del commands[index]
        else:
            commands[index] = replacement
    return mutate


def _pins_command(replacement: str | None) -> Callable[[Dict[str, Any]], None]:
    """Replace (None: drop) the setup command that installs the project with the constraints file."""
    def mutate(cfg: Dict[str, Any]) -> None:
        commands = cfg["setup_commands"]
        index = commands.index(INSTALL)
        if replacement is None:
            del commands[index]
        else:
            commands[index] = replacement
    return mutate


INSTALL = f"cd ~/reckoning-ray && {pins.INSTALL_COMMAND}"


def _venv_command(replacement: str) -> Callable[[Dict[str, Any]], None]:
    def mutate(cfg: Dict[str, Any]) -> None:
        commands = cfg["setup_commands"]
        index = next(i for i, c in enumerate(commands) if " -m venv " in c)
        commands[index] = replacement
    return mutate


_DELETE = object()
W = "available_node_types"

# (id, mutation, Ray's exception type or None if Ray accepts it and the project's check rejects it,
#  text in the message of whichever rejects it)
BROKEN = [
    ("typo_top_level_key", _rename("max_workers", "max_worker"), jsonschema.ValidationError,
     "'max_worker' was unexpected"),
    ("typo_node_type_key", _rename(f"{W}/ray.worker.a100/min_workers", "min_worker"), jsonschema.ValidationError,
     "'min_worker' was unexpected"),
    ("unknown_head_node_type", _set("head_node_type", "ray.head.gpu"), ValueError,
     "`head_node_type` must be one of `available_node_types`"),
    ("string_for_integer", _set("max_workers", "4"), jsonschema.ValidationError, "'4' is not of type 'integer'"),
    ("string_resource_count", _set(f"{W}/ray.worker.a100/resources/a100", "8"), jsonschema.ValidationError,
     "'8' is not of type 'integer'"),
    ("sum_min_workers_above_max", _all(_set("max_workers", 1), _set(f"{W}/ray.worker.a100/min_workers", 1),
                                      _set(f"{W}/ray.worker.rtx3090/min_workers", 1)), ValueError,
     "smaller than the sum of `min_workers`"),
    # Ray fills in its default head type "ray.head.default" silently, which exists here.
    ("missing_head_node_type", _set("head_node_type", _DELETE), None, "head_node_type is missing"),
    ("node_min_workers_above_max", _set(f"{W}/ray.worker.a100/min_workers", 3), None,
     "min_workers=3 is above max_workers=2"),
    ("head_with_gpu", _set(f"{W}/ray.head.default/resources/GPU", 1), None, "resources.GPU must be 0"),
    ("head_on_gpu_instance", _set(f"{W}/ray.head.default/node_config/InstanceType", "g5.xlarge"), None,
     "is a GPU instance"),
    ("a100_resource_missing", _set(f"{W}/ray.worker.a100/resources", {"CPU": 96, "GPU": 8}), None,
     "no worker node type declares the custom resource 'a100'"),
    ("rtx3090_resource_on_a100_type", _set(f"{W}/ray.worker.a100/resources/rtx3090", 8), None,
     "declares both 'a100' and ['rtx3090']"),
    ("gpu_units_differ", _set(f"{W}/ray.worker.rtx3090/resources/rtx3090", 1), None, "rtx3090=1 should equal GPU=4"),
    ("instance_type_missing", _set(f"{W}/ray.worker.rtx3090/node_config/InstanceType", _DELETE), None,
     "ray.worker.rtx3090.node_config.InstanceType is missing"),
    ("worker_without_instance_profile", _set(f"{W}/ray.worker.a100/node_config/IamInstanceProfile", _DELETE), None,
     "ray.worker.a100.node_config.IamInstanceProfile is missing"),
    ("storage_path_missing", _storage_command(None), None, "no shared storage path"),
    ("storage_path_not_s3", _storage_command("echo 'export RECKONING_STORAGE_PATH=/tmp/results' >> ~/.bashrc"), None,
     "use an S3 URI"),
    # The node software: installed without the constraints file, or not at all; the venv's Python.
    ("install_unconstrained", _pins_command('cd ~/reckoning-ray && pip install -e ".[cluster]"'), None,
     "setup_commands[3]: `pip install -e '.[cluster]'` runs without constraints.txt"),
    ("extra_package_unconstrained", _pins_command(INSTALL + ' && pip install "torch==2.13.0+cu126"'), None,
     "setup_commands[3]: `pip install torch==2.13.0+cu126` runs without constraints.txt"),
    ("project_missing", _pins_command(None), None, "setup_commands never install the project"),
    ("pins_unsplittable", _pins_command("pip install 'torch"), None, "cannot split shell command"),
    ("venv_python3", _venv_command("test -x ~/venv/bin/pip || python3 -m venv ~/venv"), None,
     "setup_commands[0]: `python3 -m venv` makes the nodes' environment"),
]


@pytest.mark.parametrize("name, mutate, ray_error, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_a100_copies_are_rejected(tmp_path: Path, name: str, mutate, ray_error, message: str):
    cfg = rc.load_cluster_yaml(A100_YAML)
    mutate(cfg)
    raised = _ray_error(cfg)
    if ray_error is None:
        assert raised is None, f"Ray was expected to accept {name} (the project check catches it): {raised!r}"
        problems = rc.project_problems(cfg)
        assert any(message in p for p in problems), problems
    else:
        assert isinstance(raised, ray_error), f"{name}: Ray raised {raised!r}, expected {ray_error.__name__}"
        assert message in str(raised)
    # Either way validate_cluster_file refuses the file.
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception) as info:
        rc.validate_cluster_file(broken)
    if ray_error is None:
        assert info.type is rc.ClusterConfigError and message in str(info.value)
        assert str(broken) in str(info.value)


def test_local_provider_rejects_node_types_so_local_yaml_uses_ray_start_resources():
    # Ray 2.60's local provider stops on available_node_types; the node types of local.yaml come
    # from `ray start --resources` with the GPU model resources instead.
    cfg = rc.load_cluster_yaml(LOCAL_YAML)
    cfg["available_node_types"] = copy.deepcopy(rc.load_cluster_yaml(A100_YAML)["available_node_types"])
    raised = _ray_error(cfg)
    assert isinstance(raised, click.ClickException)
    assert "available_node_types is not supported" in raised.message
    local = rc.load_cluster_yaml(LOCAL_YAML)
    assert '--resources="$(python -m reckoning_ray.cluster node-resources)"' in local["worker_start_ray_commands"][-1]
    assert "--num-gpus=0" in local["head_start_ray_commands"][-1]


def test_constrained_installs_of_other_packages_pass():
    cfg = rc.load_cluster_yaml(LOCAL_YAML)
    _pins_command(INSTALL + " && python3.11 -m pip install --constraint=/opt/x/constraints.txt boto3")(cfg)
    assert rc.project_problems(cfg) == []
    cfg["worker_setup_commands"] = ['pip install "transformers==5.0.0"']  # anywhere that installs
    [problem] = rc.project_problems(cfg)
    assert problem.startswith("worker_setup_commands[0]: `pip install transformers==5.0.0` runs without constraints.txt")


def test_yaml_setup_commands_end_with_the_install_line():
    for path in CLUSTER_YAMLS:
        cfg = rc.load_cluster_yaml(path)
        commands = cfg["setup_commands"]
        assert commands[-1] == INSTALL, path
        assert any(f"python{pins.NODE_PYTHON} -m venv" in c for c in commands), path
        assert "~/reckoning-ray" in cfg["file_mounts"]  # the install runs where the project is mounted


# -- what must not be in a cluster YAML: placeholders, W&B keys ----------------------------------

SECRET = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("line", [
    f"  - echo 'export WANDB_API_KEY={SECRET}' >> ~/.bashrc",
    f'  - export WANDB_API_KEY="{SECRET}" && ray stop',
    f"  - wandb login {SECRET}",
    f"  - wandb login --relogin {SECRET}",
    f"# WANDB_API_KEY: {SECRET}",
])
def test_wandb_key_in_a_cluster_yaml_fails_the_check(tmp_path: Path, line: str):
    text = _filled_copy(A100_YAML, tmp_path).read_text()
    # a command goes first under setup_commands, a comment at the top
    text = text.replace("setup_commands:\n", f"setup_commands:\n{line}\n", 1) if line.startswith("  - ") \
        else f"{line}\n{text}"
    broken = tmp_path / "with_key.yaml"
    broken.write_text(text)
    number = text.splitlines().index(line) + 1
    with pytest.raises(rc.ClusterConfigError) as info:
        rc.validate_cluster_file(broken)
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith(f"  - line {number}: "), problems
    assert "submit with `python cluster/submit_tune.py --address ...`" in problems[0]
    assert SECRET not in str(info.value)  # the check never repeats the key


def test_wandb_key_in_a_yaml_mapping():
    problems = rc.text_problems(f"runtime_env:\n  env_vars: {{WANDB_API_KEY: {SECRET}}}\n")
    assert len(problems) == 1 and problems[0].startswith("line 2: WANDB_API_KEY is given a value in this file")


@pytest.mark.parametrize("line", [
    "  - echo 'export WANDB_API_KEY=$WANDB_API_KEY' >> ~/.bashrc",  # a reference, no key
    "  - wandb login",  # asks for the key
    "# W&B keys never go in here",
    "  - export WANDB_API_KEY_FILE_HINT",
])
def test_no_wandb_key_no_problem(line: str):
    assert rc.text_problems(line) == []


def test_placeholders_are_found_anywhere_with_their_fix():
    problems = rc.text_problems("a: 1\n# bucket s3://YOUR-BUCKET/x\nb: arn:aws:iam::YOUR-ACCOUNT-ID:role\nc: YOUR-REGION\n")
    assert problems == [
        "line 2: placeholder YOUR-BUCKET: replace it with the name of an S3 bucket of yours (aws s3 mb s3://<name>) "
        "(cluster/README.md, 'Before the first start')",
        "line 3: placeholder YOUR-ACCOUNT-ID: replace it with your 12-digit AWS account id (aws sts "
        "get-caller-identity --query Account --output text) (cluster/README.md, 'Before the first start')",
        "line 4: placeholder YOUR-REGION: replace it with your own value (cluster/README.md, 'Before the first start')",
    ]


def test_docs_never_put_a_wandb_key_in_a_file():
    for doc in (REPO / "README.md", CLUSTER_DIR / "README.md"):
        for line in doc.read_text().splitlines():
            if "WANDB_API_KEY" in line:
                assert "setup_commands" not in line and not re.search(r">>?\s*[~/$\w]", line), (doc, line)
                assert "--runtime-env-json" not in line, (doc, line)  # a key on a command line


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["worker_start_ray_commands"].__setitem__(-1, "ray start --address=$RAY_HEAD_IP:6379"),
     "must declare the GPU model resources"),
    (lambda c: c["head_start_ray_commands"].__setitem__(-1, "ray start --head --port=6379"), "needs --num-gpus=0"),
    (lambda c: c.__setitem__("min_workers", 3), "min_workers=3 is above max_workers=2"),
    (lambda c: c["provider"].pop("worker_ips"), "provider.head_ip and provider.worker_ips are needed"),
    (_storage_command("export RECKONING_STORAGE_PATH=results"), "absolute path"),
], ids=["worker_without_resources", "head_with_gpus", "min_above_max", "no_worker_ips", "relative_storage"])
def test_broken_local_copies_fail_the_project_check(mutate, message: str):
    cfg = rc.load_cluster_yaml(LOCAL_YAML)
    mutate(cfg)
    problems = rc.project_problems(cfg)
    assert any(message in p for p in problems), problems


# -- per-machine GPU resources -------------------------------------------------------------------

def test_gpu_node_resources_from_nvidia_smi_names():
    assert jobs.gpu_node_resources(["NVIDIA A100-SXM4-40GB"] * 8) == {"a100": 8}
    assert jobs.gpu_node_resources(["NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"]) == {"a100": 2}
    assert jobs.gpu_node_resources(["NVIDIA GeForce RTX 3090"] * 4) == {"rtx3090": 4}
    assert jobs.gpu_node_resources(["NVIDIA GeForce RTX 3090 Ti", "NVIDIA A10G", "Tesla V100-SXM2-16GB"]) == {"rtx3090": 1}
    assert jobs.gpu_node_resources([]) == {}


def test_node_resources_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "reckoning_ray.cluster", "node-resources"],
                         capture_output=True, text=True, timeout=120, check=True)
    expected = jobs.gpu_node_resources(jobs.detect_gpu_names())
    assert json.loads(out.stdout) == expected


# -- the fake cluster config follows a100.yaml ---------------------------------------------------

def test_fake_cluster_config_is_derived_from_a100_yaml(tmp_path: Path):
    fake = fc.fake_cluster_config(A100_YAML, gcs_address="127.0.0.1:6390")
    rc.ray_validate(fake, prepare=False)  # the autoscaler reads it raw, so it must pass unprepared
    types = fake["available_node_types"]
    assert set(types) == {"ray.head.default", "ray.worker.a100", "ray.worker.rtx3090"}
    assert types["ray.head.default"]["resources"] == {"CPU": 1, "GPU": 0}
    assert types["ray.worker.a100"]["resources"] == {"a100": 8, "CPU": 1, "GPU": 0, "object_store_memory": 256 * 2**20}
    assert types["ray.worker.rtx3090"]["resources"]["rtx3090"] == 4
    assert [types[t]["max_workers"] for t in ("ray.worker.a100", "ray.worker.rtx3090")] == [1, 1]
    assert fake["provider"] == {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                                "disable_launch_config_check": True, "gcs_address": "127.0.0.1:6390"}
    # Change the source: the fake cluster follows (no second copy of the node types to drift).
    cfg = rc.load_cluster_yaml(A100_YAML)
    cfg["available_node_types"]["ray.worker.a100"]["resources"].update({"GPU": 4, "a100": 4})
    cfg["available_node_types"]["ray.worker.big"] = {"resources": {"CPU": 192, "GPU": 8, "rtx3090": 8},
                                                     "node_config": {}, "max_workers": 3}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    derived = fc.fake_cluster_config(changed, cpus_per_node=2, max_workers_per_type=2)["available_node_types"]
    assert derived["ray.worker.a100"]["resources"]["a100"] == 4
    assert (derived["ray.worker.big"]["resources"]["CPU"], derived["ray.worker.big"]["max_workers"]) == (2, 2)


def test_fake_cluster_config_needs_node_types():
    with pytest.raises(rc.ClusterConfigError, match="needs available_node_types"):
        fc.fake_cluster_config(LOCAL_YAML)


# -- commands in cluster/README.md ---------------------------------------------------------------

def _readme_commands(prefix: str) -> List[List[str]]:
    text = (CLUSTER_DIR / "README.md").read_text()
    blocks = text.split("```bash")[1:]
    lines = [line for block in blocks for line in _shell_lines(block.split("```")[0])]
    return [shlex.split(line) for line in lines if line.startswith(prefix)]


def test_readme_ray_submit_command_parses_and_targets_the_tune_entry_point(tmp_path: Path):
    from ray.scripts.scripts import submit

    commands = _readme_commands("ray submit ")
    assert len(commands) == 1
    ctx = submit.make_context("submit", commands[0][2:])
    params = ctx.params
    assert (REPO / params["cluster_config_file"]) == A100_YAML
    assert params["script"] == "cluster/submit_tune.py" and (REPO / params["script"]).is_file()
    args = list(params["script_args"])
    assert args[:2] == ["paper", "space=paper"] and args[0] in available_presets()
    # ray submit joins the arguments unquoted for the remote shell.
    assert all(not set(a) & set(" '\"$`;&|<>*?") for a in args), args
    # What the head then runs is valid for the tune entry point (data.path pointed at a real dir).
    final = jobs.tune_argv(args, {jobs.STORAGE_ENV: "s3://YOUR-BUCKET/reckoning-ray"})
    overrides = [f"tune.{a}" if a.startswith("space=") else a for a in final[1:]]
    overrides = [f"data.path={tmp_path}" if a.startswith("data.path=") else a for a in overrides]
    cfg = load_config(final[0], overrides)
    assert (cfg.tune.space, cfg.tune.storage_path, node_type_for(cfg)) == (
        "paper", "s3://YOUR-BUCKET/reckoning-ray", "a100")


def test_readme_job_commands_parse_and_target_the_tune_entry_point(tmp_path: Path):
    submit_tune = _load_submit_tune()
    commands = _readme_commands("python cluster/submit_tune.py ")
    assert len(commands) == 2  # the sweep, and the same with W&B online
    for command in commands:
        options, tune_args = submit_tune.parse_submit_args(command[2:])
        assert options.address == "http://127.0.0.1:8265" and not options.no_wait
        assert tune_args[:2] == ["paper", "space=paper"]
        # what the head then runs is valid for the tune entry point (data.path pointed at a real dir)
        final = jobs.tune_argv(tune_args, {jobs.STORAGE_ENV: "s3://b/reckoning-ray"})
        overrides = [f"tune.{a}" if a.startswith("space=") else a for a in final[1:]]
        overrides = [f"data.path={tmp_path}" if a.startswith("data.path=") else a for a in overrides]
        cfg = load_config(final[0], overrides)
        assert (cfg.tune.space, cfg.tune.storage_path, node_type_for(cfg)) == ("paper", "s3://b/reckoning-ray", "a100")
    assert "tracking.mode=online" in commands[1]


def _load_submit_tune():
    spec = importlib.util.spec_from_file_location("submit_tune", CLUSTER_DIR / "submit_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_tune_runs_the_tune_module_with_the_storage_path(monkeypatch):
    submit_tune = _load_submit_tune()
    calls: List[Any] = []
    monkeypatch.setattr(submit_tune.runpy, "run_module",
                        lambda name, **kw: calls.append(("run", name, list(sys.argv), kw)))
    monkeypatch.setattr(submit_tune.os, "chdir", lambda d: calls.append(("chdir", Path(d))))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv(jobs.STORAGE_ENV, "s3://b/r")
    submit_tune.main(["paper", "space=paper"])
    assert calls == [("chdir", REPO),
                     ("run", "reckoning_ray.tune", ["reckoning_ray.tune", "paper", "space=paper",
                                                    "tune.storage_path=s3://b/r"],
                      {"run_name": "__main__", "alter_sys": True})]
    # An explicit storage path wins over the cluster's.
    calls.clear()
    submit_tune.main(["paper", "tune.storage_path=/tmp/x"])
    assert calls[-1][2] == ["reckoning_ray.tune", "paper", "tune.storage_path=/tmp/x"]


class _FakeJobClient:
    """Stands in for ray.job_submission.JobSubmissionClient: records the submission, streams two lines."""

    submitted: List[Dict[str, Any]] = []

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append({"address": self.address, **kwargs})
        return "raysubmit_test"

    async def tail_job_logs(self, job_id: str):
        for lines in ("sweep paper-sweep: ...\n", "sweep took 1s\n"):
            yield lines

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        return JobStatus.SUCCEEDED


@pytest.fixture
def fake_job_client(monkeypatch):
    import ray.job_submission

    _FakeJobClient.submitted = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobClient)
    return _FakeJobClient


def test_submit_tune_job_carries_wandb_settings_in_the_runtime_env(fake_job_client, monkeypatch, capsys, tmp_path):
    submit_tune = _load_submit_tune()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_PROJECT", "reckoning")
    monkeypatch.setenv("WANDB_ENTITY", "")  # set but empty: not passed
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    code = submit_tune.main(["--address", "http://127.0.0.1:8265", "--", "paper", "space=paper",
                             "data.path=/data/my proofwriter", "tracking.mode=online", "--resume"])
    assert code == 0
    job, = fake_job_client.submitted
    assert job == {
        "address": "http://127.0.0.1:8265",
        "entrypoint": "python cluster/submit_tune.py paper space=paper 'data.path=/data/my proofwriter' "
                      "tracking.mode=online --resume",
        "runtime_env": {"working_dir": str(REPO), "env_vars": {"WANDB_API_KEY": SECRET, "WANDB_PROJECT": "reckoning"}},
    }
    out, err = capsys.readouterr()
    assert SECRET not in out + err  # never printed ...
    assert "environment from this shell: WANDB_API_KEY, WANDB_PROJECT" in out and "sweep took 1s" in out
    assert list(tmp_path.iterdir()) == []  # ... nor written here
    # the entrypoint, run on the head, is the head mode of the same file with the same arguments
    options, tune_args = submit_tune.parse_submit_args(shlex.split(job["entrypoint"])[2:])
    assert options is None and tune_args[-1] == "--resume" and tune_args[2] == "data.path=/data/my proofwriter"


def test_submit_tune_job_without_a_key(fake_job_client, monkeypatch, capsys):
    submit_tune = _load_submit_tune()
    for name in jobs.WANDB_JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    assert submit_tune.main(["--address", "http://h:8265", "--no-wait", "--", "paper", "tracking.mode=online"]) == 0
    job, = fake_job_client.submitted
    assert job["runtime_env"] == {"working_dir": str(REPO)}
    out, err = capsys.readouterr()
    assert "WANDB_API_KEY is not set in this shell" in err
    assert "follow: ray job logs --address http://h:8265 --follow raysubmit_test" in out
    assert "sweep took" not in out  # --no-wait: no log following


def test_submit_tune_options_need_the_separator():
    submit_tune = _load_submit_tune()
    with pytest.raises(SystemExit):
        submit_tune.parse_submit_args(["--address", "http://h:8265", "paper"])
    assert submit_tune.parse_submit_args(["paper", "--resume"]) == (None, ["paper", "--resume"])


def test_tune_argv_without_cluster_storage_keeps_arguments():
    assert jobs.tune_argv(["paper", "space=paper"], {}) == ["paper", "space=paper"]
    assert jobs.tune_argv(["paper"], {jobs.STORAGE_ENV: "  "}) == ["paper"]


# -- a fake autoscaling cluster with a100.yaml's node types (the suite-wide one, tests/conftest.py) --

@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_fake_cluster_places_work_on_the_node_type_it_asks_for(fake_a100_cluster, tmp_path: Path, monkeypatch):
    import ray
    from ray.util.state import list_tasks

    cluster = fake_a100_cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the fake cluster runs without token authentication
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        # the head has none of the GPU types (other tests of the suite may have added GPU nodes)
        nodes = [n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
        assert len(nodes) == 1 and not any(g in nodes[0]["Resources"] for g in rc.GPU_NODE_TYPES)
        head_id = nodes[0]["NodeID"]

        @ray.remote(num_cpus=0)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        placed = {}
        for gpu in rc.GPU_NODE_TYPES:
            t0 = time.time()
            ref = where.options(resources={gpu: 1}, name=f"on-{gpu}").remote()
            node_id = ray.get(ref, timeout=120)
            placed[gpu] = (node_id, time.time() - t0)
        print({g: f"{s:.1f}s" for g, (_, s) in placed.items()})

        resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(resources) == 3  # the head and one node of each type, added by the autoscaler
        for gpu, (node_id, seconds) in placed.items():
            assert node_id != head_id
            other = [g for g in rc.GPU_NODE_TYPES if g != gpu]
            assert resources[node_id][gpu] == cluster.config["available_node_types"][f"ray.worker.{gpu}"]["resources"][gpu]
            assert not any(g in resources[node_id] for g in other)
            assert resources[node_id].get("GPU", 0) == 0
        # Ray's own record of where each task ran (state API; task events arrive within seconds).
        for gpu, (node_id, _) in placed.items():
            deadline, recorded = time.time() + 30, []
            while not recorded and time.time() < deadline:
                tasks = list_tasks(address=cluster.address, filters=[("name", "=", f"on-{gpu}")], detail=True)
                recorded = [t.node_id for t in tasks if t.state == "FINISHED"]
                time.sleep(0 if recorded else 1)
            assert recorded == [node_id]
    finally:
        ray.shutdown()

    # A Ray job (what cluster/submit_tune.py --address submits) against this cluster's dashboard.
    probe = tmp_path / "job"
    probe.mkdir()
    (probe / "probe.py").write_text(
        "import json, ray\n"
        "ray.init()\n"
        "@ray.remote(num_cpus=0, resources={'rtx3090': 1})\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "node = ray.get(where.remote())\n"
        "res = [n['Resources'] for n in ray.nodes() if n['NodeID'] == node][0]\n"
        "print('PROBE', json.dumps({'node': node, 'rtx3090': res.get('rtx3090', 0)}))\n"
    )
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", cluster.dashboard_url,
         "--working-dir", str(probe), "--", "python", "probe.py"],
        capture_output=True, text=True, timeout=150)
    print(f"ray job submit took {time.time() - t0:.1f}s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, out.stdout[-3000:]
    probe_result = json.loads(line[0][len("PROBE "):])
    assert probe_result == {"node": placed["rtx3090"][0], "rtx3090": 4.0}
