"""Smoke tests of the benchmarks: every script answers --help, and the outer-step benchmark's
meta-gradient agreement check passes for the real implementations and refuses a wrong one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import BENCH, load_bench

SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.stem not in ("common", "references"))


def _bench_extra_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("higher", "torchopt"))


needs_bench_extra = pytest.mark.skipif(
    not _bench_extra_installed(), reason="higher / torchopt missing: pip install -e .[bench]"
)


def test_every_benchmark_answers_help(capsys):
    assert {"bilevel_step", "encode_once"} <= {p.stem for p in SCRIPTS}
    # In this process, through each script's own main(): a subprocess per script paid the torch
    # import ten times over on two cores; the scripts' import-time code runs here the same.
    for path in SCRIPTS:
        module = load_bench(path.stem)
        with pytest.raises(SystemExit) as exited:
            module.main(["--help"])
        out = capsys.readouterr().out
        assert exited.value.code == 0, f"{path.stem} --help failed"
        assert out.startswith("usage:"), f"{path.stem} --help printed {out[:200]!r}"
        assert "--" in out


def gpu_script_commands() -> list[tuple[str, list[str]]]:
    """(benchmark, arguments) of every ``bench/<name>.py`` call in bench/gpu.sh, with the
    script's defaults (MODEL=gpt2, DEVICE=cuda, the scale shapes) substituted."""
    import shlex

    text = (BENCH / "gpu.sh").read_text().replace("\\\n", " ")
    values = {"$model": "gpt2", "$device": "cuda", "$scale": "gpt2-medium,gpt2-large,gpt2-xl"}
    calls = []
    for line in text.splitlines():
        words = shlex.split(line.split("2>&1")[0], comments=True)
        for i, word in enumerate(words):
            if word.startswith("bench/") and word.endswith(".py"):
                calls.append((Path(word).stem, [values.get(w, w) for w in words[i + 1:]]))
    return calls


def test_gpu_script_calls_only_flags_and_implementations_that_exist():
    # The GPU script runs where nothing can be fixed on the spot: every benchmark call in it must
    # parse with that benchmark's own argument parser (implementation names, modes, flags).
    calls = gpu_script_commands()
    assert {name for name, _ in calls} == {"bilevel_step", "memory_modes"}
    for name, argv in calls:
        args = load_bench(name).parse_args(argv)
        assert args.device == "cuda" and all(m.startswith("gpt2") for m in args.models)
        if name == "bilevel_step":
            cases = load_bench(name).cases(args)
            assert {c.tasks for c in cases} == {1, 2, 8} and {c.inner_steps for c in cases} == {4}
            assert set(args.impls) == {"fused", "higher"}


@pytest.fixture(scope="module")
def bilevel_step():
    return load_bench("bilevel_step")


@needs_bench_extra
@pytest.mark.parametrize("optimizer,order,steps", [("adamw", "second", 2), ("sgd", "first", 1)])
def test_meta_gradients_agree(bilevel_step, optimizer, order, steps):
    rows = bilevel_step.check_gradients(optimizer, order, steps, bilevel_step.IMPLS, tolerance=1e-6)
    assert [r[3] for r in rows] == ["fused", "higher", "torchopt"]
    for row in rows:
        weight_err, lr_err = float(row[4]), float(row[5])
        assert weight_err <= 1e-6 and lr_err <= 1e-6, row


@needs_bench_extra
def test_check_refuses_a_different_meta_gradient(bilevel_step, capsys):
    from references import TorchOptReference

    def wrong_rates(setup, lrs):
        # The learned rates applied to the wrong tensors: every update still looks plausible.
        return TorchOptReference(setup.model, setup.cfg, lrs.flip(-1))

    argv = ["--check-only", "--models", "tiny", "--orders", "second", "--optimizers", "adamw",
            "--inner-steps", "1", "--impls", "reference,torchopt"]
    with pytest.raises(SystemExit) as exc:
        bilevel_step.main(argv, factories={"torchopt": wrong_rates})
    assert exc.value.code == bilevel_step.EXIT_DISAGREE
    captured = capsys.readouterr()
    assert "REFUSED" in captured.err and "torchopt" in captured.err
    assert "## speed" not in captured.out and "tasks/s" not in captured.out


def test_relative_error_flags_non_finite(bilevel_step):
    b = torch.ones(3, dtype=torch.float64)
    assert bilevel_step.relative_error(b.clone(), b) == 0.0
    assert bilevel_step.relative_error(b * (1 + 1e-3), b) == pytest.approx(1e-3)
    assert bilevel_step.relative_error(torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), b) == float("inf")


def test_memory_modes_refuse_an_option_that_changes_the_meta_gradient(capsys):
    memory_modes = load_bench("memory_modes")
    # A mode that claims the default's gradient but computes the first-order one.
    memory_modes.MODES["wrong"] = ("fused", ["inner.first_order=true"], "same")
    try:
        with pytest.raises(SystemExit) as info:
            memory_modes.main(["--models", "tiny", "--modes", "checkpoint,per-task,wrong", "--inner-steps", "2"])
    finally:
        del memory_modes.MODES["wrong"]
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "REFUSED" in captured.err and "wrong" in captured.err
    assert "peak MiB" not in captured.out  # nothing measured, no ratio printed
    # the honest options passed the same check
    rows = [line for line in captured.out.splitlines() if "| second |" in line]
    assert any("checkpoint" in r for r in rows) and any("per-task" in r for r in rows)


def test_encode_once_refuses_when_a_question_carries_other_knowledge(monkeypatch, capsys):
    encode_once = load_bench("encode_once")
    original = encode_once.shared_knowledge_records

    def one_differs(num_facts, num_questions, seed=0):
        records = original(num_facts, num_questions, seed=seed)
        records[1] = dict(records[1], knowledge=records[1]["knowledge"][1:])  # one fact fewer
        return records

    monkeypatch.setattr(encode_once, "shared_knowledge_records", one_differs)
    with pytest.raises(SystemExit) as info:
        encode_once.main(["--model", "tiny", "--facts", "4", "--questions", "2", "--inner-lr", "1e-2"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "REFUSED: question 1" in captured.err
    assert "break-even" not in captured.out


def test_scaling_refuses_worker_counts_that_trained_different_models(capsys):
    scaling = load_bench("scaling")
    one = [{"step": 16, "val/answer_loss": 1.2237, "train/loss": 1.8783},
           {"step": 32, "val/answer_loss": 0.9127, "train/loss": 1.0281}]
    same = [dict(r, **{"val/answer_loss": r["val/answer_loss"] * (1 + 1e-7)}) for r in one]
    scaling.require_agreement({1: one, 2: same}, 1e-4)
    assert "trained the same model" in capsys.readouterr().out
    other = [one[0], dict(one[1], **{"val/answer_loss": 0.95})]
    with pytest.raises(SystemExit) as info:
        scaling.require_agreement({1: one, 2: other}, 1e-4)
    assert info.value.code == 2
    assert "step 32: val/answer_loss 0.95 with 2 workers" in capsys.readouterr().err


def test_flop_count_is_the_same_work_for_the_batched_and_the_plain_engine(bilevel_step):
    # --flops counts matrix products: stacking tasks into bmm must not change how many there are
    args = bilevel_step.parse_args(["--models", "tiny", "--batch", "3", "--inner-steps", "2", "--orders", "second",
                                    "--impls", "fused,reference", "--memory", "none"])
    [case] = bilevel_step.cases(args)
    flops = bilevel_step.count_flops(case, args)
    assert flops["fused"] == flops["reference"] > 0


def test_elastic_replay_fills_the_tail_and_the_agreement_refuses_another_asha_decision():
    elastic_sweep = load_bench("elastic_sweep")
    # 8 trials two at a time; the last to start runs alone to round 12 (the embedded sweep's shape)
    rounds = [2, 6, 2, 2, 6, 2, 2, 12]
    fixed = elastic_sweep.replay(rounds, 2, 2, 1, 1, 1800.0, 90.0, 0.9)
    grown = elastic_sweep.replay(rounds, 2, 2, 1, 2, 1800.0, 90.0, 0.9)
    assert fixed["resizes"] == 0 and grown["resizes"] == 1
    assert grown["idle"] < 0.1 < fixed["idle"] and grown["wall_s"] < fixed["wall_s"]

    def run(rounds, status, metric, workers):
        groups = [{"workers": k, "rounds": 1} for k in workers]
        return {"trials": {"t": {"config": {"outer.lr": 0.01}, "rounds": rounds, "status": status, "metric": metric,
                                 "groups": groups, "best": min(metric), "workers": None}},
                "best_config": {"outer.lr": 0.01}}

    base = run(3, "completed", [1.0, 0.5, 0.4], [1, 1, 1])
    # the round trained on 2 workers within the tolerance, the later ones only shown
    ok, rows = elastic_sweep.agreement(base, run(3, "completed", [1.0, 0.5 * (1 + 1e-6), 0.3], [1, 2, 2]), 1e-3)
    assert ok == [] and rows[0][2] == 2
    problems, _ = elastic_sweep.agreement(base, run(2, "ASHA stop", [1.0, 0.5], [1, 1]), 1e-3)
    assert problems and "ASHA decided 3 rounds (completed) fixed, 2 (ASHA stop) elastic" in problems[0]
    problems, _ = elastic_sweep.agreement(base, run(3, "completed", [1.0, 0.6, 0.4], [1, 2, 2]), 1e-3)
    assert problems and "round 2" in problems[0]
