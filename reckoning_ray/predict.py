"""Answer questions with a trained checkpoint from the command line.

    python -m reckoning_ray.predict CHECKPOINT --knowledge FILE --question "Bob is red." [--question ...]
                                    [--questions FILE] [--recall] [--json]

The knowledge is encoded into the weights once (one inner loop) and every question is answered
with those weights (in-context checkpoints put it in every prompt instead).

One line per question, in order: the answer label, or ``no label in the generated text: '...'``
when the model generated none (``--json``: one JSON object per question with the question, the
label, the generated text and the recalled facts). Exit status 0 when every question got a
label, 3 when some did not, 2 for bad input.

``CHECKPOINT`` is a checkpoint directory (``<run dir>/checkpoints/step-*``), a run directory
(its best checkpoint) or a hub id (``ReckoningModel.push_to_hub``). The Python API is :class:`reckoning_ray.core.predict.ReckoningModel`,
importable from here too::

    from reckoning_ray.predict import ReckoningModel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from reckoning_ray.core.checkpoint import CheckpointError
from reckoning_ray.core.schema import FAMILIES
from reckoning_ray.core.predict import ReckoningModel


def read_knowledge(path: str) -> list[str]:
    """Sentences of a knowledge (or questions) file: one per line (blank lines and ``#`` comments
    skipped); ``-`` reads standard input."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.predict",
        description="Answer a question with a trained checkpoint: the knowledge is encoded into the weights "
                    "by the learned inner loop, then the answer is generated.",
        epilog="example:\n  python -m reckoning_ray.predict runs/embedded-20261201-120000 --knowledge facts.txt "
               "--question \"Bob is big.\" --recall\n\nCHECKPOINT: a run directory (its best checkpoint), "
               "a <run dir>/checkpoints/step-* directory, or a hub id (user/name) uploaded with "
               "ReckoningModel.push_to_hub (HF_HUB_OFFLINE=1 reads the local cache only).\n\nexit status: 0 every question got a label, "
               f"{UNLABELLED} some got none (the line says so), 2 bad input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run directory, or a hub id")
    parser.add_argument("--knowledge", required=True, metavar="FILE",
                        help="knowledge sentences, one per line ('-': standard input)")
    parser.add_argument("--question", action="append", default=[],
                        help="a question sentence, e.g. \"Bob is big.\"; repeat it for several questions "
                             "about the same knowledge (one output line each)")
    parser.add_argument("--questions", metavar="FILE", default=None,
                        help="a file of questions about the same knowledge, one per line (after any --question); "
                             "the knowledge is encoded once for all of them")
    parser.add_argument("--hops", type=int, default=None,
                        help="reasoning depth: sets the inner steps as in training (default: the most steps "
                             "the model was trained with)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="question wording (default: the training data's)")
    parser.add_argument("--recall", action="store_true", help="also print the facts the model recalls")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per question: question, label, text (the whole generation), facts")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the answer is the output: no "Loading weights" bar around it
    if not args.question and not args.questions:
        parser.error("give the questions: --question \"...\" (repeatable) or --questions FILE")
    try:
        knowledge = read_knowledge(args.knowledge)
        questions = list(args.question) + (read_knowledge(args.questions) if args.questions else [])
        if not questions:
            raise ValueError(f"--questions {args.questions}: the file holds no question (one per line)")
        model = ReckoningModel.from_pretrained(args.checkpoint, device=args.device, family=args.family)
        if model.encodes:  # one inner loop for every question
            answers = model.answer_many(model.encode(knowledge, hops=args.hops), questions, hops=args.hops)
        else:
            answers = model.answer_many([knowledge] * len(questions), questions, hops=args.hops)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for question, answer in zip(questions, answers):
        if args.json:
            print(json.dumps({"question": question, "label": answer.label or None, "text": answer.text,
                              "facts": answer.facts}))
            continue
        print(answer.label if answer.label else f"no label in the generated text: {answer.text.strip()!r}")
        if args.recall:
            for fact in answer.facts:
                print(f"  recalled: {fact}")
    return 0 if all(answer.label for answer in answers) else UNLABELLED


# Exit status when some question got no label (the model generated none).
UNLABELLED = 3


if __name__ == "__main__":
    sys.exit(main())
