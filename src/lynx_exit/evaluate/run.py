"""Running the eval: tasks × exit methods × settings on paired seeds, resumable, here or on Ray workers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import FolderLock, append_jsonl, read_appended_jsonl
from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.evaluate.records import RECORD_KEYS, load_records, load_timing, summarize
from lynx_exit.exits import MethodContext, MethodSetting, make_policy
from lynx_exit.exits.registry import get_method
from lynx_exit.models import LoadedModel
from lynx_exit.seeding import rollout_seed
from lynx_exit.tasks import Problem


def run_eval(
    lm: LoadedModel | None,
    problems: Sequence[Problem],
    settings: Sequence[MethodSetting],
    generation: GenerationConfig,
    out_dir: Path,
    rollouts: int = 1,
    batch_size: int = 16,
    progress: bool = True,
    on_record: Callable[[], None] | None = None,
    probe: str | None = None,
    deepconf: str | None = None,
    runner: ShardRunner | None = None,
    assistant: LoadedModel | None = None,
    assist: Any = None,
) -> dict[str, Any]:
    """Run every setting on the same problems and seeds; append records to `records.jsonl` (resumable).

    Every setting and the probe are loaded once before the first rollout, so a bad setting or
    artifact (an uncalibrated δ, a missing probe, a probe of another model) fails at once.
    `probe` is the LYNX probe folder, `deepconf` deepconf's warm-up folder. `out_dir` is locked while the
    run lasts. `runner` runs shards of `batch_size` rollouts elsewhere (e.g. `lynx_exit.scale` on Ray
    workers); this process writes their records, so the folder is the same however they were computed."""
    if not problems:
        raise ValueError("eval needs at least one problem")
    if batch_size < 1 or rollouts < 1:
        raise ValueError(f"batch_size and rollouts must be >= 1, got {batch_size}, {rollouts}")
    if lm is None and runner is None:
        raise ValueError("run_eval needs the model, or a runner that has it")
    context = MethodContext(lm=lm, probe=probe, deepconf=deepconf, assistant=assistant, assist=assist)
    if runner is not None and any(get_method(s.method).assisted for s in settings):
        raise ValueError(
            "speculative-thinking methods run in this process only (not on Ray workers yet): drop --ray"
        )
    if lm is not None:  # validate every setting and artifact up front (a runner's workers check their own)
        check_settings(context, settings)
    with FolderLock(out_dir, "lynx-exit eval"):
        return _run_locked(
            lm,
            problems,
            settings,
            generation,
            out_dir,
            rollouts,
            batch_size,
            progress,
            on_record,
            context,
            runner,
        )


Job = tuple[int, Problem, int]  # (index among all problems, problem, rollout): the index and rollout seed it
# Runs (setting, jobs) shards elsewhere and yields each shard's records and compute seconds, in any order.
ShardRunner = Callable[
    [list[tuple[MethodSetting, list[Job]]], GenerationConfig, int, int],
    Iterator[tuple[MethodSetting, list[dict[str, Any]], float]],
]


def check_settings(context: MethodContext, settings: Sequence[MethodSetting]) -> None:
    """Load the probe and build every setting once: a bad setting or artifact fails before any rollout."""
    if context.probe is not None:
        context.loaded_probe()
    for setting in settings:
        make_policy(setting.method, context, **dict(setting.options))


def _run_locked(
    lm: LoadedModel | None,
    problems: Sequence[Problem],
    settings: Sequence[MethodSetting],
    generation: GenerationConfig,
    out_dir: Path,
    rollouts: int,
    batch_size: int,
    progress: bool,
    on_record: Callable[[], None] | None,
    context: MethodContext,
    runner: ShardRunner | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    records_file = out_dir / "records.jsonl"
    done = {
        (r["setting"], r["problem_id"], r["rollout"]) for r in read_appended_jsonl(records_file, RECORD_KEYS)
    }
    todo = [
        (
            setting,
            [
                (i, p, r)
                for i, p in enumerate(problems)
                for r in range(rollouts)
                if (setting.label, p.problem_id, r) not in done
            ],
        )
        for setting in settings
    ]
    todo = [(setting, jobs) for setting, jobs in todo if jobs]
    bar = tqdm(total=sum(len(jobs) for _, jobs in todo), desc="eval", unit="rollout", disable=not progress)
    timing_file = out_dir / "timing.jsonl"

    def write(records: Iterable[dict[str, Any]]) -> int:
        count = 0
        with records_file.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                count += 1
                bar.update(1)
                if on_record is not None:
                    on_record()
        return count

    def timed(setting: MethodSetting, rollouts_done: int, seconds: float) -> None:
        append_jsonl(timing_file, [{"setting": setting.label, "rollouts": rollouts_done, "seconds": seconds}])

    if runner is None:
        assert lm is not None  # checked by run_eval
        for setting, jobs in todo:
            began = time.perf_counter()
            count = write(eval_jobs(lm, context, setting, jobs, generation, rollouts, batch_size))
            timed(setting, count, time.perf_counter() - began)
    else:  # the seconds are the worker's compute time for the shard
        shards = [
            (setting, jobs[start : start + batch_size])
            for setting, jobs in todo
            for start in range(0, len(jobs), batch_size)
        ]
        for setting, records, seconds in runner(shards, generation, rollouts, batch_size):
            timed(setting, write(records), seconds)
    bar.close()
    records = load_records(records_file)
    labels = [
        s.label for s in settings
    ]  # this run's settings first, then those earlier runs left in the folder
    labels += [label for label in dict.fromkeys(r["setting"] for r in records) if label not in labels]
    return summarize(records, labels, load_timing(timing_file))


def eval_jobs(
    lm: LoadedModel,
    context: MethodContext,
    setting: MethodSetting,
    jobs: Sequence[Job],
    generation: GenerationConfig,
    rollouts: int,
    batch_size: int,
) -> Iterator[dict[str, Any]]:
    """Run one setting's rollouts with continuous batching; yield each record as its rollout ends."""
    policies = [make_policy(setting.method, context, **dict(setting.options)) for _ in jobs]
    assist = assistant = None
    if get_method(setting.method).assisted:  # Speculative Thinking: the engine holds both models
        from lynx_exit.engine.assist import AssistConfig

        assist, assistant = context.assist or AssistConfig(), context.assistant
    prompt_cache: dict[str, list[int]] = {}
    prompts = [prompt_cache.setdefault(p.problem_id, lm.prompt_ids(p.prompt)) for _, p, _ in jobs]
    seeds = [rollout_seed(generation.seed, i, r, rollouts) for i, _, r in jobs]
    # Continuous batching: finished rows are refilled, so early exits become throughput.
    loop = DecodeLoop(
        lm,
        prompts,
        generation,
        policies=policies,
        seeds=seeds,
        max_batch_size=batch_size,
        assist=assist,
        assistant=assistant,
    )
    for step in loop.steps():
        if step.finish_reason is None:
            continue
        _, problem, r = jobs[step.request_id]
        result, policy = loop.result(step.request_id), policies[step.request_id]
        yield {
            "method": setting.method,
            "setting": setting.label,
            "knob": setting.knob,
            "problem_id": problem.problem_id,
            "rollout": r,
            "answer": result.answer,
            "gold": problem.gold,
            "correct": problem.grade(result.text),
            "generated_tokens": result.num_generated_tokens,
            "trial_tokens": int(policy.trial_tokens),
            "exit_index": result.exit_index,
            "exit_point": result.exit_point,
            "gave_up": result.gave_up,
            "finish_reason": result.finish_reason,
            "latency_s": result.wall_time_s,
            **(
                {
                    "assistant_tokens": result.assist["assistant_tokens"],
                    "takeovers": result.assist["takeovers"],
                }
                if result.assist is not None
                else {}
            ),
        }
