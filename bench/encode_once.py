"""Encode once, answer many: seconds to answer Q questions about the same knowledge with RECKONING
(inner loop once, then Q forward passes whose prompts hold no knowledge) versus in-context reasoning
(the knowledge in every prompt, Q forward passes), and the break-even Q.

RECKONING's inner loop is the user's API, ``ReckoningModel.encode`` (the project's fused engine in
evaluation mode: gradients without a graph, ``inner.steps`` AdamW steps with the learned rates at
their initial value); each question is then one forward pass of its prompt + answer with the fast
weights it returns (``EncodedKnowledge.weights``). In-context
reasoning is one forward pass per question of the knowledge + question + answer with the model's
own weights. Both answer one question per forward pass (the paper's comparison), on the same model.

Before timing, the script checks that encoding once gives the engine's own answers (the first
questions' logits with the shared fast weights against an inner loop on each question's own
knowledge, and their generated answers through ``ReckoningModel.answer_many`` with the encoded
knowledge against one inner loop per question) and that every in-context input holds every
knowledge sentence; otherwise it exits with status 2.

Break-even: the smallest Q with ``inner + Q * t_reckoning <= Q * t_in_context``, from the median
inner-loop time and the median per-question times; "never" when a RECKONING question is not
cheaper than an in-context one. The totals in the table are measured, not computed.

Examples::

    python bench/encode_once.py                                  # small model, a few minutes
    python bench/encode_once.py --model tiny --facts 8,32,128 --questions 1,4,16,64
    python bench/encode_once.py --model gpt2 --device cuda       # GPT-2 base shape
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from reckoning_ray.core.predict import ReckoningModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ATTRIBUTES,
    MODEL_SHAPES,
    NAMES,
    RELATIONS,
    argument_parser,
    build_setup,
    encode,
    format_table,
    positive_ints,
    print_header,
    reckoning_method,
)

EXIT_DISAGREE = 2  # the encode-once answers are not the engine's answers

# Reported in the RECKONING paper (Chen et al., NeurIPS 2023) for GPT-2 base; printed for context.
PAPER = "paper (GPT-2 base): 0.126 s per 1024-token in-context forward pass; 1.50 s for the inner loop + answer"


def shared_knowledge_records(num_facts: int, num_questions: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_questions`` tasks that share one knowledge set of ``num_facts`` sentences.

    Half of the questions ask about a sentence of the knowledge (answer "yes"), half about one
    that is absent (answer "no"), so prompts and targets vary as in a real question set.
    """
    rng = random.Random(seed)
    facts: list[str] = []
    while len(facts) < num_facts:
        a = rng.choice(NAMES)
        fact = (f"{a} is {rng.choice(ATTRIBUTES)} ." if rng.random() < 0.5
                else f"{a} {rng.choice(RELATIONS)} {rng.choice(NAMES)} .")
        if fact not in facts:
            facts.append(fact)
    records = []
    for q in range(num_questions):
        if q % 2 == 0:
            asked, answer = rng.choice(facts), "yes"
        else:
            asked, answer = f"{rng.choice(NAMES)} is {rng.choice(ATTRIBUTES)} .", "no"
        relevant = [asked] if answer == "yes" else []
        records.append({
            "id": f"shared-{num_facts}-{q}", "family": "proofwriter", "source": "generated",
            "knowledge": list(facts), "facts": relevant,
            "distractors": [f for f in facts if f not in relevant],
            "question": asked[:-2] + ".", "answer": answer, "hops": 0,
        })
    return records


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> tuple[Callable[[], float], str]:
    """This process's CPU time with one torch thread on the CPU (wall time on an idle core, and
    blind to other processes on a shared machine), wall time otherwise."""
    if not device.startswith("cuda") and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time, 1 thread"
    return time.perf_counter, f"wall time, {torch.get_num_threads()} threads"


def timed(fn: Callable[[], Any], device: str) -> float:
    timer, _ = clock(device)
    synchronize(device)
    start = timer()
    fn()
    synchronize(device)
    return timer() - start


def run_facts(num_facts: int, args: argparse.Namespace) -> dict[str, Any]:
    """Measured totals for every Q and the per-component medians, for one knowledge size."""
    from reckoning_ray.core.bilevel.lm import causal_lm_logits

    max_q = max(args.questions)
    records = shared_knowledge_records(num_facts, max_q, seed=args.seed)
    # Long enough for the in-context prompt with all the knowledge (+ the answer).
    icr_lengths = [len(r["knowledge"]) * 8 + 32 for r in records[:1]]
    max_length = max(64, icr_lengths[0])
    setup = build_setup(args.model, records, [
        "inner.optimizer=adamw", f"inner.steps={args.inner_steps}", f"inner.lr_init={args.inner_lr}",
        "inner.first_order=true",  # evaluation only: keep the model's default attention path
        "outer.multi_task=false",
    ], dtype=args.dtype, max_length=max_length)
    setup.model.to(args.device)
    reck = encode(setup, records, method="reckoning", multi_task=False).to(args.device)
    icr = encode(setup, records, method="icr", multi_task=False).to(args.device)
    method = reckoning_method(setup, "fused").eval()
    model = ReckoningModel(method, family="proofwriter")
    knowledge = records[0]["knowledge"]  # the same for every question

    def encode_knowledge() -> dict[str, torch.Tensor]:
        return model.encode(knowledge).weights

    def answer(params: Optional[dict[str, torch.Tensor]], seq: Any, q: int) -> torch.Tensor:
        # Only the real tokens: a question is never padded to the longest one of the set.
        n = int(seq.attention_mask[q].sum())
        return causal_lm_logits(setup.model, params, seq.input_ids[q : q + 1, :n], seq.attention_mask[q : q + 1, :n])

    def reckoning(num_questions: int) -> None:
        with torch.no_grad():
            fast = encode_knowledge()
            for q in range(num_questions):
                answer(fast, reck.sequence, q)

    def in_context(num_questions: int) -> None:
        with torch.no_grad():
            for q in range(num_questions):
                answer(None, icr.sequence, q)

    require_same_answers(model, reck, icr, records, setup.tokenizer, answer, encode_knowledge, args)
    reckoning(1), in_context(1)  # warm-up
    totals: dict[int, tuple[float, float]] = {}
    for q in args.questions:
        r = [timed(lambda: reckoning(q), args.device) for _ in range(args.repeats)]
        c = [timed(lambda: in_context(q), args.device) for _ in range(args.repeats)]
        totals[q] = (statistics.median(r), statistics.median(c))
    with torch.no_grad():
        n = args.component_repeats
        inner = statistics.median(timed(encode_knowledge, args.device) for _ in range(n))
        fast = encode_knowledge()
        per_q_reck = statistics.median(timed(lambda: answer(fast, reck.sequence, q % max_q), args.device) for q in range(n))
        per_q_icr = statistics.median(timed(lambda: answer(None, icr.sequence, q % max_q), args.device) for q in range(n))
    saving = per_q_icr - per_q_reck
    break_even = math.ceil(inner / saving) if saving > 0 else None
    return {
        "facts": num_facts, "totals": totals, "inner": inner, "per_q_reck": per_q_reck, "per_q_icr": per_q_icr,
        "break_even": break_even,
        "tokens_reck": int(reck.sequence.attention_mask[0].sum()), "tokens_icr": int(icr.sequence.attention_mask[0].sum()),
        "knowledge_tokens": int(reck.select([0]).knowledge.attention_mask.sum()),
    }


def require_same_answers(model: Any, reck: Any, icr: Any, records: Sequence[dict[str, Any]], tokenizer: Any,
                         answer: Callable, shared: Callable, args: argparse.Namespace) -> None:
    """Before timing: encode-once must answer what the engine answers, and in-context prompts must
    hold the knowledge; else print why and exit with status 2 (no time is printed).

    For the first ``--check-questions`` questions, the logits of the question with the ONE shared
    set of fast weights must equal (relative ``--tolerance``) the logits after an inner loop on that
    question's own knowledge batch (``ReckoningMethod.fast_weights``): the reuse is exact only if
    every question really carries the same knowledge. Their generated answers through the API
    (``answer_many`` with the encoded knowledge, then with one inner loop per question) must be the
    same. Each in-context input must hold every knowledge sentence of its record.
    """
    problems = []
    checked = min(args.check_questions, len(reck))
    with torch.no_grad():
        fast = shared()
        for q in range(checked):
            own = model.method.fast_weights(reck.select([q]), args.inner_steps)[0]
            a, b = answer(fast, reck.sequence, q), answer(own, reck.sequence, q)
            error = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
            if not error <= args.tolerance:
                problems.append(f"question {q}: encode-once logits differ from its own inner loop's by {error:.2e}")
    knowledge, questions = records[0]["knowledge"], [r["question"] for r in records[:checked]]
    once = model.answer_many(model.encode(knowledge), questions)
    each = model.answer_many([knowledge] * checked, questions)
    if [a.text for a in once] != [a.text for a in each]:
        problems.append("the answers generated with the knowledge encoded once differ from one inner loop per question")
    missing = []
    for q, record in enumerate(records):
        ids = icr.sequence.input_ids[q][icr.sequence.attention_mask[q].bool()]
        text = " ".join(tokenizer.decode(ids.tolist()).split())
        if not all(" ".join(fact.rstrip(" .").split()) in text for fact in record["knowledge"]):
            missing.append(q)
    if missing:
        problems.append(f"the in-context inputs of questions {missing[:5]} lack knowledge sentences")
    if problems:
        print("REFUSED: " + "; ".join(problems) + ". No time is printed: the two methods would not be answering "
              "the same questions about the same knowledge.", file=sys.stderr)
        raise SystemExit(EXIT_DISAGREE)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--model", choices=list(MODEL_SHAPES), default="small",
                   help="tiny (1 x 64), small (6 x 384) or gpt2 (12 x 768, vocabulary 50,257). Default: small")
    p.add_argument("--facts", type=positive_ints, default=[8, 32, 128], help="knowledge sizes. Default: 8,32,128")
    p.add_argument("--questions", type=positive_ints, default=[1, 4, 16, 64], help="Q values. Default: 1,4,16,64")
    p.add_argument("--inner-steps", type=int, default=4, help="inner AdamW steps (paper: 4). Default: 4")
    p.add_argument("--inner-lr", type=float, default=3e-5, help="inner learning rate (paper init 3e-5)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed repeats of each total (median). Default: 1")
    p.add_argument("--component-repeats", type=int, default=5,
                   help="timed repeats of the inner loop and of one question (median), for the break-even Q. "
                        "Default: 5")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 keeps torch's choice. Default: 1 (with OpenMP threads on "
                        "every core, any other process on the machine makes timings jump 10-100x)")
    p.add_argument("--check-questions", type=int, default=3,
                   help="questions whose encode-once answers are checked against their own inner loop. Default: 3")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest relative logit difference in that check. Default: 1e-5")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.inner_steps < 1 or args.repeats < 1 or args.component_repeats < 1:
        p.error("--inner-steps, --repeats and --component-repeats must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("Encode once, answer many: RECKONING vs in-context reasoning")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model {args.model} {MODEL_SHAPES[args.model]}, {args.inner_steps} inner AdamW steps, {args.dtype}, "
          f"{args.device}, one question per forward pass, {clock(args.device)[1]}")
    print(PAPER + "\n", flush=True)
    results = []
    for num_facts in args.facts:
        res = run_facts(num_facts, args)
        results.append(res)
        print(f"  {num_facts} facts: inner loop {res['inner']:.3f} s, question {res['per_q_reck'] * 1e3:.1f} ms "
              f"({res['tokens_reck']} tokens) vs in-context {res['per_q_icr'] * 1e3:.1f} ms ({res['tokens_icr']} tokens)",
              flush=True)
    rows = []
    for res in results:
        for q, (r, c) in res["totals"].items():
            rows.append([res["facts"], q, f"{r:.3f}", f"{c:.3f}", f"{c / r:.2f}x"])
    print("\n## total seconds to answer Q questions about the same knowledge")
    print(format_table(["facts", "Q", "RECKONING s", "in-context s", "in-context / RECKONING"], rows))
    rows = []
    for res in results:
        rows.append([
            res["facts"], res["knowledge_tokens"], f"{res['inner']:.3f}",
            f"{res['per_q_reck'] * 1e3:.1f} ({res['tokens_reck']})", f"{res['per_q_icr'] * 1e3:.1f} ({res['tokens_icr']})",
            "never" if res["break_even"] is None else str(res["break_even"]),
        ])
    print("\n## components and break-even Q")
    print(format_table(["facts", "knowledge tokens", "inner loop s", "RECKONING ms/question (tokens)",
                        "in-context ms/question (tokens)", "break-even Q"], rows))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
