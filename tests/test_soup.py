"""Model soups of a sweep (reckoning_ray.core.soup): the mechanics on real checkpoints of one training
run. The sweep directory holds copies of that run as trials: two identical ones, one whose weights
were spoiled with noise, and one whose config starts elsewhere (another train.seed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ONE_FACT
from reckoning_ray.core.checkpoint import checkpoint_path, load_pretrained
from reckoning_ray.core.soup import average, greedy, load_tensors
from reckoning_ray.tune import main as tune_main
from reckoning_ray.train import main as train_main


def test_average_of_identical_tensors_is_the_tensor_and_of_two_their_mean():
    a = ({"w": torch.randn(3, 4), "step": torch.tensor(7)}, {"inner_lrs": torch.rand(5)})
    soup = average([a, a, a])
    assert torch.equal(soup[0]["w"], a[0]["w"]) and torch.equal(soup[1]["inner_lrs"], a[1]["inner_lrs"])
    assert soup[0]["step"].item() == 7
    b = ({"w": torch.zeros(3, 4), "step": torch.tensor(9)}, {"inner_lrs": torch.zeros(5)})
    assert torch.allclose(average([a, b])[0]["w"], a[0]["w"] / 2)


def test_greedy_keeps_what_does_not_hurt_and_skips_what_does():
    good = ({"w": torch.ones(2)}, {})
    same = ({"w": torch.ones(2)}, {})
    bad = ({"w": torch.full((2,), 9.0)}, {})
    # a loss that grows with the distance of w from 1
    kept, soup, value = greedy([("a", good), ("b", same), ("c", bad)],
                               lambda s: float((s[0]["w"] - 1).abs().sum()), "min", log=lambda m: None)
    assert kept == ["a", "b"] and value == 0.0 and torch.equal(soup[0]["w"], torch.ones(2))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    assert train_main(["embedded", "resources.num_workers=0", "train.max_steps=4", "train.validations_per_epoch=2",
                       "data.num_train=64", "data.num_validation=32", "data.num_test=32", "tracking.mode=disabled",
                       "train.patience=0", *ONE_FACT, f"train.output_dir={root}", "train.run_name=run"]) == 0
    sweep = root / "sweep"
    trials = sweep / "trials"
    for trial in ("a", "b", "c", "d"):
        shutil.copytree(root / "run", trials / trial)
    # c: its best checkpoint's weights spoiled
    best_c = checkpoint_path(trials / "c", "best")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(best_c / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 3.0 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
              str(best_c / "model.safetensors"))
    # d: trained from other starting weights
    cfg_d = OmegaConf.load(trials / "d" / "config.yaml")
    cfg_d.train.seed = 12345
    OmegaConf.save(cfg_d, trials / "d" / "config.yaml")
    cfg = OmegaConf.load(root / "run" / "config.yaml")
    cfg.tune.metric, cfg.tune.mode = "val/answer_loss", "min"
    OmegaConf.save(cfg, sweep / "sweep_config.yaml")
    rows = [{"trial": t, "best": b} for t, b in (("a", 1.0), ("b", 1.1), ("c", 1.2), ("d", 1.3))]
    (sweep / "sweep_summary.json").write_text(json.dumps({"trials": rows, "best_trial": "a"}))
    return sweep


def test_soups_of_a_sweep(sweep_dir: Path, capsys):
    assert tune_main(["soup", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    record = json.loads((sweep_dir / "soups" / "soups.json").read_text())
    # d started elsewhere: named, with the key that differs
    assert list(record["excluded"]) == ["d"] and "train.seed" in record["excluded"]["d"]
    assert "not an ingredient: trial d" in out
    soups = record["soups"]
    assert soups["uniform"]["ingredients"] == ["a", "b", "c"]
    # b equals a (kept: validation is not worse); the spoiled c makes it worse (left out)
    assert soups["greedy"]["ingredients"] == ["a", "b"]
    assert "+ c:" in out and "left out" in out
    best, greedy_soup, uniform = soups["best trial"], soups["greedy"], soups["uniform"]
    # the soup of identical checkpoints is that checkpoint: the same weights, the same metrics
    assert greedy_soup["validation"] == best["validation"] and greedy_soup["test"] == best["test"]
    a = load_tensors(checkpoint_path(sweep_dir / "trials" / "a", "best"))
    g = load_tensors(Path(greedy_soup["checkpoint"]))
    assert all(torch.equal(a[0][k], g[0][k]) for k in a[0]) and torch.equal(a[1]["inner_lrs"], g[1]["inner_lrs"])
    assert uniform["validation"]["val/answer_loss"] > best["validation"]["val/answer_loss"]
    # a soup is a normal checkpoint, and the sweep's summary lists the soups beside the best trial
    method = load_pretrained(uniform["checkpoint"])
    u = load_tensors(Path(uniform["checkpoint"]))
    c = load_tensors(checkpoint_path(sweep_dir / "trials" / "c", "best"))
    name = next(iter(a[0]))
    assert torch.allclose(u[0][name], (2 * a[0][name] + c[0][name]) / 3, atol=1e-6)
    assert method.meta_parameters()
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert set(summary["soups"]) == {"best trial", "uniform", "greedy"}
    assert "greedy" in out and "uniform" in out


def test_soup_of_a_sweep_that_has_not_ended_says_so(tmp_path, capsys):
    assert tune_main(["soup", str(tmp_path)]) == 2
    assert "no sweep_summary.json" in capsys.readouterr().err
