"""How reference models behave when sampled, beside what real reasoning models do (issue: reference pair).

For each model, N held-out problems at T=0.6, top-p 0.95, 500 new tokens: full chain-of-thought
accuracy, thinking length by difficulty, where the first stated answer ("So the answer is N.") sits
in the thinking tokens, how often the final answer differs from the first (and in which direction),
runaways (no end of thinking within the budget; with or without a candidate before the loop), cue
words before and after the first stated answer, and the accuracy of exiting at the first stated
answer (the answer it states). Targets from the literature (the papers named in the table) are written beside.
Writes benchmarks/results/reference_model.json.

Usage: python benchmarks/reference_model.py [--models reference,reference-large] [--problems 300]
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import Counter, defaultdict
from typing import Any

from _common import write_result

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.models import load_model
from lynx_exit.reference import make_problems

ANSWER = re.compile(r"So the answer is (-?\d+)\.")
REDERIVATION = re.compile(r"work it out again from the start: [^\n]*?= (-?\d+)\.")
TARGETS = {
    "small": {
        "accuracy": [0.60, 0.85],
        "first_answer_position": [0.45, 0.80],
        "final_differs_from_first": [0.03, 0.12],
        "runaway": [0.08, 0.25],
        "cues_before_first_answer": [0.20, 1.0],
    },
    "large": "accuracy >= small + 10 points; runaway <= half the small model's",
}


def behaviour(model: str, problems: int, seed: int) -> dict[str, Any]:
    lm = load_model(model)
    tasks = make_problems("test", problems)
    config = GenerationConfig(max_new_tokens=500, temperature=0.6, top_p=0.95, seed=seed)
    prompts = [
        lm.prompt_ids(
            p.question() + "\nPlease reason step by step, and put your final answer within \\boxed{}."
        )
        for p in tasks
    ]
    results = DecodeLoop(lm, prompts, config, max_batch_size=32).run()
    tokenizer = lm.tokenizer
    lengths: dict[int, list[int]] = defaultdict(list)
    positions, cues_before, cues_after = [], 0, 0
    finished = changed = runaway = runaway_with_candidate = right = first_right = 0
    wrong_first = wrong_first_rederived = rederived_to_first = rederived_to_gold = 0
    directions: Counter[str] = Counter()
    for problem, result in zip(tasks, results, strict=True):
        gold = problem.answer
        thinking_ids = result.token_ids[: result.reasoning_tokens]
        lengths[len(problem.ops)].append(result.reasoning_tokens)
        text = tokenizer.decode(thinking_ids, skip_special_tokens=True)
        stated = ANSWER.search(text)
        first = int(stated.group(1)) if stated else None
        first_index = None
        if stated is not None:  # the token where the first stated answer ends
            for index in range(1, len(thinking_ids) + 1):
                if len(tokenizer.decode(thinking_ids[:index], skip_special_tokens=True)) >= stated.end():
                    first_index = index
                    break
            positions.append(first_index / max(1, len(thinking_ids)))
        if first_index is not None:
            cues_before += sum(1 for i in result.cue_indices if i < first_index)
            cues_after += sum(1 for i in result.cue_indices if i >= first_index)
        else:
            cues_before += len(result.cue_indices)
        final = result.answer
        correct = problem_correct(final, gold)
        right += correct
        first_right += first is not None and first == gold
        ended = result.finish_reason == "eos" and "</think>" in tokenizer.decode(
            result.token_ids, skip_special_tokens=False
        )
        if not ended:
            runaway += 1
            runaway_with_candidate += first is not None
            continue
        finished += 1
        if (
            first is not None and first != gold
        ):  # why a wrong first answer stays: is it re-derived, and to what?
            wrong_first += 1
            redo = REDERIVATION.search(text, stated.end()) if stated else None
            if redo:
                wrong_first_rederived += 1
                rederived_to_first += int(redo.group(1)) == first
                rederived_to_gold += int(redo.group(1)) == gold
        if first is not None and final is not None and final.strip() != str(first):
            changed += 1
            directions[
                "wrong->right" if correct else "right->wrong" if first == gold else "wrong->other wrong"
            ] += 1
    n = len(tasks)
    return {
        "model": model,
        "problems": n,
        "accuracy": round(right / n, 3),
        "mean_thinking_tokens": round(statistics.mean(r.reasoning_tokens for r in results), 1),
        "thinking_tokens_by_steps": {
            str(k): round(statistics.mean(v), 1) for k, v in sorted(lengths.items())
        },
        "first_answer_position": round(statistics.mean(positions), 3) if positions else None,
        "finished": finished,
        "final_differs_from_first": round(changed / finished, 3) if finished else None,
        "final_differs_by_direction": dict(directions),
        "finished_with_wrong_first_answer": wrong_first,
        "of_which_rederived": wrong_first_rederived,
        "rederivation_repeats_the_wrong_answer": rederived_to_first,
        "rederivation_reaches_the_right_answer": rederived_to_gold,
        "runaway": round(runaway / n, 3),
        "runaway_with_candidate_before_loop": round(runaway_with_candidate / runaway, 3) if runaway else None,
        "cues_before_first_answer": round(cues_before / max(1, cues_before + cues_after), 3),
        "accuracy_of_exiting_at_first_stated_answer": round(first_right / n, 3),
    }


def problem_correct(answer: str | None, gold: int) -> bool:
    return answer is not None and answer.strip() == str(gold)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models", default="reference,reference-large", help="comma-separated: aliases or folders"
    )
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [
        behaviour(model.strip(), args.problems, args.seed)
        for model in args.models.split(",")
        if model.strip()
    ]
    write_result(
        "reference_model",
        {
            "temperature": 0.6,
            "top_p": 0.95,
            "max_new_tokens": 500,
            "models": rows,
            "targets": TARGETS,
            "targets_met": targets_met(rows),
        },
    )


def targets_met(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The issue's bars: the first model against the small band, the second (if any) against the first."""
    small = rows[0]
    met = {
        key: small[key] is not None and low <= small[key] <= high
        for key, (low, high) in TARGETS["small"].items()
    }
    directions = small["final_differs_by_direction"]
    met["wrong->right the largest change, right->wrong present"] = bool(directions) and (
        max(directions, key=directions.get) == "wrong->right" and directions.get("right->wrong", 0) > 0
    )
    if len(rows) > 1:
        large = rows[1]
        met["large accuracy >= small + 10 points"] = large["accuracy"] >= small["accuracy"] + 0.10 - 1e-9
        met["large runaway <= half the small one's"] = large["runaway"] <= small["runaway"] / 2 + 1e-9
    return met


if __name__ == "__main__":
    main()
