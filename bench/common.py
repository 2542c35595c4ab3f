"""Shared pieces of the benchmarks: machine report, synthetic tasks, model shapes, peak memory.

Every benchmark prints :func:`machine_report` and the exact command first, so a table in
BENCHMARKS.md can always be traced to the machine and the invocation that produced it.

The tasks are ProofWriter-style and generated here (deterministic by seed) so that the knowledge
size (facts per task) and the number of tasks are free parameters of a benchmark, independent of
any data file. The texts go through the project's own encoder (``reckoning_ray.core.data.encode``), so
the tensors have exactly the shapes training uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import resource
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # The benchmarks run as scripts (python bench/<name>.py); make the package and this module
    # importable without an install and from any working directory.
    sys.path.insert(0, str(REPO))

from reckoning_ray.core.data.encode import (
    Encoder,
    TaskBatch,
    in_context_prompt,
    knowledge_line,
    reckoning_prompt,
    target_text,
)

# Model shapes (n_layer, n_embd, n_head). "tiny" is the embedded preset's model
# (reckoning_ray/conf/embedded.yaml); "gpt2" and "gpt2-*" are GPT-2 base's, medium's, large's and
# XL's shapes with the 50,257-token vocabulary (random init: speed and memory do not depend on the
# weights' values).
MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (1, 64, 2),
    "small": (6, 384, 6),
    "gpt2": (12, 768, 12),
    # GPT-2 medium, large and XL: the shapes of the models the LoRA inner loops are for
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
GPT2_VOCAB = 50257

NAMES = ("anne", "bob", "charlie", "dave", "erin", "fiona", "gary", "harry", "ivy", "jack",
         "kate", "liam", "mona", "nick", "olga", "pete")
ATTRIBUTES = ("big", "blue", "cold", "furry", "green", "kind", "nice", "quiet", "red", "rough",
              "round", "smart", "white", "young", "old", "tall")
RELATIONS = ("likes", "sees", "chases", "visits", "needs", "eats")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or the platform module."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_report() -> str:
    """Lines describing the machine and library versions (printed by every benchmark)."""
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{package_version('transformers')}, higher {package_version('higher')}, torchopt "
        f"{package_version('torchopt')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    else:
        lines.append("gpu: none (CPU run)")
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that is running, ready to paste."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def print_header(title: str) -> None:
    print(f"# {title}")
    print(machine_report())
    print(f"command: {command_line()}")
    print(flush=True)


# ------------------------------------------------------------------------------------------------
# Synthetic ProofWriter-style tasks
# ------------------------------------------------------------------------------------------------


def synthetic_records(num_tasks: int, num_facts: int, seed: int = 0, prefix: str = "bench") -> list[dict[str, Any]]:
    """``num_tasks`` ProofWriter-style tasks with ``num_facts`` knowledge sentences each.

    Facts are "<name> is <attribute> ." or "<name> <relation> <name> ."; the question asks about
    one of them (answer "yes") or about a pair absent from the knowledge (answer "no"). The answers
    are not meant to be learned here: these tasks only give the tensors realistic shapes.
    """
    rng = random.Random(seed)
    records = []
    for t in range(num_tasks):
        facts: list[str] = []
        while len(facts) < num_facts:
            a = rng.choice(NAMES)
            if rng.random() < 0.5:
                fact = f"{a} is {rng.choice(ATTRIBUTES)} ."
            else:
                fact = f"{a} {rng.choice(RELATIONS)} {rng.choice(NAMES)} ."
            if fact not in facts:
                facts.append(fact)
        if rng.random() < 0.5:
            asked = rng.choice(facts)
            answer, relevant = "yes", [asked]
        else:
            asked, answer, relevant = f"{rng.choice(NAMES)} is {rng.choice(ATTRIBUTES)} .", "no", []
        records.append({
            "id": f"{prefix}-{seed}-{t}",
            "family": "proofwriter",
            "source": "generated",
            "knowledge": facts,
            "facts": relevant if answer == "yes" else [],
            "distractors": [f for f in facts if f not in relevant],
            "question": asked[:-2] + ".",
            "answer": answer,
            "hops": 0,
        })
    return records


def corpus_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every text the encoders produce for ``records`` (RECKONING and in-context formats)."""
    texts: list[str] = []
    for r in records:
        texts.extend(knowledge_line(i, fact) for i, fact in enumerate(r["knowledge"]))
        texts.append(reckoning_prompt(r))
        texts.append(in_context_prompt(r, r["knowledge"]))
        texts.append(target_text(r, multi_task=True))
        texts.append(target_text(r, multi_task=False))
    return texts


@dataclass
class Setup:
    """A model, its tokenizer and the config it was built from."""

    cfg: Any
    model: torch.nn.Module
    tokenizer: Any


def build_setup(
    size: str,
    records: Sequence[dict[str, Any]],
    overrides: Sequence[str] = (),
    dtype: str = "float32",
    max_length: int = 128,
    seed: int = 0,
) -> Setup:
    """Config (embedded preset + ``overrides``), model of shape ``size`` and tokenizer.

    ``size``: a key of :data:`MODEL_SHAPES`. The tokenizer is the embedded word-level one built
    from ``records``; for "gpt2" the model gets GPT-2's 50,257-row vocabulary (the extra rows are
    never indexed but cost what they cost in GPT-2: the tied output layer spans all of them).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from reckoning_ray.core.config import load_config
    from reckoning_ray.core.modeling import DTYPES, build_tokenizer

    if size not in MODEL_SHAPES:
        raise SystemExit(f"--model {size!r} is not one of {sorted(MODEL_SHAPES)}")
    n_layer, n_embd, n_head = MODEL_SHAPES[size]
    n_positions = max(64, max_length)
    cfg = load_config("embedded", [
        f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
        f"model.n_positions={n_positions}", f"model.max_length={max_length}", f"model.dtype={dtype}",
        *overrides,
    ])
    tokenizer = build_tokenizer(corpus_of(records), model_max_length=n_positions)
    vocab = GPT2_VOCAB if size.startswith("gpt2") else len(tokenizer)
    config = GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model = model.to(DTYPES[dtype]).eval()
    return Setup(cfg, model, tokenizer)


def reckoning_method(setup: Setup, engine: Optional[str] = None) -> Any:
    """``ReckoningMethod`` on ``setup``'s model, with its config's inner / outer / eval groups;
    ``engine`` ("fused" or "reference") replaces ``inner.engine``."""
    from reckoning_ray.core.bilevel.method import ReckoningMethod
    from reckoning_ray.core.config import group

    inner = group(setup.cfg, "inner")
    if engine is not None:
        inner = dataclasses.replace(inner, engine=engine)
    encoder = Encoder(setup.tokenizer, method="reckoning", multi_task=bool(setup.cfg.outer.multi_task),
                      max_length=int(setup.cfg.model.max_length))
    return ReckoningMethod(setup.model, setup.tokenizer, encoder, inner, group(setup.cfg, "outer"),
                           group(setup.cfg, "eval"), float(setup.cfg.model.dropout))


def encode(setup: Setup, records: Sequence[dict[str, Any]], method: str = "reckoning",
           multi_task: bool = True) -> TaskBatch:
    encoder = Encoder(setup.tokenizer, method=method, multi_task=multi_task,
                      max_length=int(setup.cfg.model.max_length))
    return encoder.collate(list(records))


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Highest resident set size of this process image (Linux: ``VmHWM`` of /proc/self/status).

    Not ``getrusage(...).ru_maxrss``: Linux carries that maximum over from the parent through fork
    and exec, so a subprocess started by a 2 GB benchmark would report at least 2 GB. ``VmHWM``
    belongs to the address space, which exec replaces. Elsewhere falls back to ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def fmt_mib(n_bytes: Optional[float]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:,.0f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table with right-aligned columns (pasted as is into BENCHMARKS.md)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
           "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring's first paragraph as the description, the rest
    (what it measures, how, the examples) as the epilog of ``--help``."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc.split("\n\n")[1:]),
    )


def comma_list(kind: Callable[[str], Any], choices: Optional[Sequence[Any]] = None) -> Callable[[str], list]:
    """An argparse type: a non-empty comma-separated list of ``kind`` values, each in ``choices``."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {list(choices or [])}")
        return values
    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each >= 1."""
    values = comma_list(int)(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values
