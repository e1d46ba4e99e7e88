"""Probe training data from forced exits (how-it-works §3), built from the one decode loop.

Rollouts are sampled in batches with hidden states hooked at every decision point of the enabled kinds (cue
words by default; `lynx_exit.decision_points`); each event is labelled by a batched forced exit that reuses
the rollouts' KV caches (kept with `hold`). Output is a self-describing, resumable folder (features as
safetensors shards, events/rollouts JSONL)."""

from __future__ import annotations

import json
import logging
import platform
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lynx_exit.artifacts import (
    FolderLock,
    append_jsonl,
    command_line,
    read_appended_jsonl,
    save_tensors_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from lynx_exit.decision_points import DEFAULT_EXIT_PREFIX, DEFAULT_POINTS, exit_prefix_value, parse_points
from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.models import FeatureSpec, LoadedModel
from lynx_exit.probe.dataset import (
    EVENT_KEYS,
    ROLLOUT_KEYS,
    Dataset,
    load_dataset,
    missing_events,
    read_meta,
    summarize_dataset,
)
from lynx_exit.seeding import rollout_seed
from lynx_exit.tasks import Problem

__all__ = ["BuildConfig", "ChunkResult", "Dataset", "build_dataset", "compute_chunk", "load_dataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    rollouts_per_problem: int = 1
    max_events_per_rollout: int = 16
    skip_first_events: int = 0
    synthetic_event: bool = True  # one event at 70 % of a cue-less rollout, as the official builder
    batch_size: int = 16  # rollouts decoded together
    label_batch_size: int = 64  # forced exits decoded together
    decision_points: tuple[str, ...] = DEFAULT_POINTS  # the kinds of decision point labelled
    exit_prefix: str = DEFAULT_EXIT_PREFIX  # what a labelling exit keeps (`decision_points.EXIT_PREFIXES`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decision_points", parse_points(list(self.decision_points)))
        exit_prefix_value(self.exit_prefix)
        for name in ("rollouts_per_problem", "max_events_per_rollout", "batch_size", "label_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_first_events < 0:
            raise ValueError(f"skip_first_events must be >= 0, got {self.skip_first_events}")


def _select(indices: list[int], config: BuildConfig) -> list[int]:
    kept = indices[config.skip_first_events :]
    if len(kept) > config.max_events_per_rollout:
        picks = np.linspace(0, len(kept) - 1, config.max_events_per_rollout).round().astype(int)
        kept = [kept[i] for i in picks]
    return kept


def build_dataset(
    lm: LoadedModel | None,
    problems: Sequence[Problem],
    out_dir: Path,
    generation: GenerationConfig,
    config: BuildConfig,
    spec: FeatureSpec,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
    runner: ChunkRunner | None = None,
) -> dict[str, Any]:
    """Sample, hook, label and write; resumes a folder left by an interrupted run (locked meanwhile).

    Problems are built in chunks of `config.batch_size` rollouts. `runner` computes the chunks
    elsewhere (e.g. `lynx_exit.scale` on Ray workers) and yields their results in order; this
    process writes them, so the folder is the same however the chunks were computed.
    """
    if not problems:
        raise ValueError("build_dataset needs at least one problem")
    if lm is None and runner is None:
        raise ValueError("build_dataset needs the model, or a runner that has it")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "features").mkdir(exist_ok=True)
    meta = {
        "format": "lynx-exit-dataset-v1",
        "feature_spec": spec.to_dict(),
        "generation": asdict(generation),
        "build": asdict(config),
        "problem_ids": [p.problem_id for p in problems],
        "task": problems[0].task,
        **(extra_meta or {}),
    }
    with FolderLock(out_dir, "lynx-exit build-data"):
        meta_file = out_dir / "meta.json"
        if meta_file.exists():
            old = read_meta(meta_file)
            if isinstance(old.get("build"), dict):  # a folder from before decision point kinds labelled cues
                old["build"].setdefault("decision_points", list(DEFAULT_POINTS))
                old["build"].setdefault("exit_prefix", DEFAULT_EXIT_PREFIX)
            for key in ("feature_spec", "generation", "build", "problem_ids"):
                if old.get(key) != json.loads(json.dumps(meta[key])):
                    raise ValueError(
                        f"{out_dir} holds a dataset built with other {key}; use a new folder to change it"
                    )
        meta["versions"] = {"python": platform.python_version(), "torch": torch.__version__}
        meta["command"] = command_line()
        write_json_atomic(meta_file, meta)
        done = _resume(out_dir, config)
        todo = [(i, p) for i, p in enumerate(problems) if p.problem_id not in done]
        _build_all(lm, problems, todo, out_dir, generation, config, spec, progress, runner)
        return summarize_dataset(out_dir)


def _resume(out_dir: Path, config: BuildConfig) -> set[str]:
    """Ids of the problems whose records are complete; the rest are dropped, to be rebuilt.

    A problem is complete when each of its rollouts is recorded once and has as many events as
    its record says, all in shards that exist. Files are rewritten atomically, never truncated.
    """
    rollouts_file, events_file = out_dir / "rollouts.jsonl", out_dir / "events.jsonl"
    rollouts = read_appended_jsonl(rollouts_file, ROLLOUT_KEYS)
    events = read_appended_jsonl(events_file, EVENT_KEYS)
    features = out_dir / "features"
    missing_shards = {name for name in {e["shard"] for e in events} if not (features / name).is_file()}
    lost = {e["problem_id"] for e in events if e["shard"] in missing_shards}
    lost |= {problem_id for (problem_id, _), _, _ in missing_events(events, rollouts)}
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in rollouts:
        by_problem[record["problem_id"]].append(record)
    complete = {
        problem_id
        for problem_id, records in by_problem.items()
        if sorted(r["rollout"] for r in records) == list(range(config.rollouts_per_problem))
        and problem_id not in lost
    }
    incomplete = sorted(set(by_problem) - complete)
    if incomplete:
        logger.warning(
            "%s: %d problem(s) have incomplete records (missing events or feature shards, e.g. %s); "
            "rebuilding them",
            out_dir,
            len(incomplete),
            incomplete[:3],
        )
    kept_rollouts = [r for r in rollouts if r["problem_id"] in complete]
    # Events of a problem whose rollouts were never recorded belong to an interrupted chunk.
    kept_events = [e for e in events if e["problem_id"] in complete]
    if len(kept_rollouts) != len(rollouts):
        write_jsonl_atomic(rollouts_file, kept_rollouts)
    if len(kept_events) != len(events):
        write_jsonl_atomic(events_file, kept_events)
    referenced = {e["shard"] for e in kept_events}
    for orphan in features.glob("shard-*.safetensors"):
        if orphan.name not in referenced:
            orphan.unlink()
    return complete


Chunk = list[tuple[int, Problem]]  # (index among all problems, problem): the index seeds its rollouts


@dataclass
class ChunkResult:
    """One chunk's rollouts, labelled events (without their shard; event i is row i of `features`) and the
    features."""

    first_problem: int
    features: torch.Tensor  # [events, feature_dim] on the CPU (empty: [0])
    events: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]


# Computes chunks elsewhere: (chunks, generation, config, spec) -> each chunk's result, in order.
ChunkRunner = Callable[[list[Chunk], GenerationConfig, BuildConfig, FeatureSpec], Iterator[ChunkResult]]


def chunks_of(todo: Sequence[tuple[int, Problem]], config: BuildConfig) -> list[Chunk]:
    """The chunks a build is made of: `batch_size` rollouts each (whole problems)."""
    per_batch = max(1, config.batch_size // config.rollouts_per_problem)
    return [list(todo[start : start + per_batch]) for start in range(0, len(todo), per_batch)]


def _build_all(
    lm: LoadedModel | None,
    problems: Sequence[Problem],
    todo: Sequence[tuple[int, Problem]],
    out_dir: Path,
    generation: GenerationConfig,
    config: BuildConfig,
    spec: FeatureSpec,
    progress: bool,
    runner: ChunkRunner | None,
) -> None:
    from tqdm import tqdm

    chunks = chunks_of(todo, config)
    if runner is not None:
        results: Iterable[ChunkResult] = runner(chunks, generation, config, spec)
    else:
        assert lm is not None  # checked by build_dataset
        results = (compute_chunk(lm, chunk, generation, config, spec) for chunk in chunks)
    bar = tqdm(
        total=len(problems),
        initial=len(problems) - len(todo),
        desc="build-data",
        unit="problem",
        disable=not progress,
    )
    for chunk, result in zip(chunks, results, strict=True):
        write_chunk(out_dir, result)
        bar.update(len(chunk))
    bar.close()


def _kept(event: dict[str, Any], exit_prefix: str) -> int:
    """Generated tokens a labelling exit keeps: a cue point's prefix ends before the cue, other points' after
    their token (how-it-works §3); with the look-ahead prefix, after the token sampled next."""
    if exit_prefix == "lookahead":
        return int(event["token_index"]) + 2
    return int(event["token_index"]) + (event["point"] != "cue" and not event["synthetic"])


def _with_lookahead(
    pending: list[dict[str, Any]], vectors: list[torch.Tensor], results: list[Any], eos_ids: set[int]
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Events whose next token exists and is not an end of sequence (no look-ahead exit happens at the
    others)."""
    kept = [
        (event, vector)
        for event, vector in zip(pending, vectors, strict=True)
        if event["token_index"] + 1 < len(ids := results[event["row"]].token_ids)
        and ids[event["token_index"] + 1] not in eos_ids
    ]
    return [event for event, _ in kept], [vector for _, vector in kept]


def compute_chunk(
    lm: LoadedModel, chunk: Chunk, generation: GenerationConfig, config: BuildConfig, spec: FeatureSpec
) -> ChunkResult:
    """Sample a chunk's rollouts, hook the features of their decision points and label them by forced exits (a
    cue point's exit drops the cue token, how-it-works §3; an answer or paragraph point's keeps its token)."""
    exit_cue_ids = lm.exit_cue_ids(generation.exit_cue)
    rows = [(index, problem, r) for index, problem in chunk for r in range(config.rollouts_per_problem)]
    prompts = [lm.prompt_ids(problem.prompt) for _, problem, _ in rows]
    seeds = [rollout_seed(generation.seed, index, r, config.rollouts_per_problem) for index, _, r in rows]
    loop = DecodeLoop(
        lm,
        prompts,
        generation,
        layers=spec.layers,
        seeds=seeds,
        hold=True,
        decision_points=config.decision_points,
    )
    point_features: list[dict[int, tuple[str, str | None, torch.Tensor]]] = [{} for _ in rows]
    think_features: list[list[torch.Tensor]] = [[] for _ in rows]  # only while a row has no point yet
    synthetic = config.synthetic_event and "cue" in config.decision_points  # the official builder's, for cues
    for step in loop.steps():
        if step.phase != "think" or step.features is None:
            continue
        if step.point is not None:
            point_features[step.request_id][step.index] = (step.point, step.cue, step.features.clone())
            think_features[step.request_id] = []
        elif synthetic and not point_features[step.request_id]:
            think_features[step.request_id].append(step.features.clone())
    results = loop.results()
    pending: list[dict[str, Any]] = []
    vectors: list[torch.Tensor] = []
    for row in range(len(rows)):
        for token_index in _select(sorted(point_features[row]), config):
            point, cue, vector = point_features[row][token_index]
            pending.append(
                {"row": row, "token_index": token_index, "point": point, "cue": cue, "synthetic": False}
            )
            vectors.append(vector)
        if not point_features[row] and synthetic and think_features[row]:
            token_index = int(0.7 * len(think_features[row]))
            pending.append(
                {"row": row, "token_index": token_index, "point": "cue", "cue": None, "synthetic": True}
            )
            vectors.append(think_features[row][token_index])
    if (
        config.exit_prefix == "lookahead"
    ):  # an exit keeps the token after the point: none where that one ends the trace
        pending, vectors = _with_lookahead(pending, vectors, results, loop.engine.eos_ids)
    answers = []
    for start in range(0, len(pending), config.label_batch_size):
        part = pending[start : start + config.label_batch_size]
        kept = [_kept(e, config.exit_prefix) for e in part]
        answers += loop.engine.forced_answers(
            [(e["row"], keep) for e, keep in zip(part, kept, strict=True)],
            exit_cue_ids,
            generation.answer_max_tokens,
        )
    event_records, rollout_records = [], []
    per_row_events: dict[int, int] = {}
    for event, forced in zip(pending, answers, strict=True):
        _, problem, rollout = rows[event["row"]]
        per_row_events[event["row"]] = per_row_events.get(event["row"], 0) + 1
        event_records.append(
            {
                "problem_id": problem.problem_id,
                "rollout": rollout,
                "token_index": event["token_index"],
                "tokens_so_far": event["token_index"],
                "point": event["point"],
                "cue": event["cue"],
                "synthetic": event["synthetic"],
                "forced_answer": forced.answer,
                "forced_tokens": len(forced.token_ids),
                "label": int(problem.grade("\\boxed{" + forced.text)),
            }
        )
    for row, (_, problem, rollout) in enumerate(rows):
        result = results[row]
        rollout_records.append(
            {
                "problem_id": problem.problem_id,
                "rollout": rollout,
                "gold": problem.gold,
                "answer": result.answer,
                "correct": problem.grade(result.text),
                "generated_tokens": result.num_generated_tokens,
                "finish_reason": result.finish_reason,
                "num_cues": len(result.cue_indices),
                "num_points": len(point_features[row]),
                "num_events": per_row_events.get(row, 0),
            }
        )
    features = torch.stack(vectors).cpu().contiguous() if vectors else torch.zeros(0)
    return ChunkResult(chunk[0][0], features, event_records, rollout_records)


def write_chunk(out_dir: Path, result: ChunkResult) -> None:
    """Append a chunk: its features shard first, then its events, then its rollouts (the commit)."""
    shard = _new_shard_name(out_dir / "features", result.first_problem)
    if result.events:
        save_tensors_atomic(out_dir / "features" / shard, {"features": result.features})
    # Rollouts last: a problem counts as done only once its events and shard are on disk.
    append_jsonl(
        out_dir / "events.jsonl", [{**e, "shard": shard, "shard_row": i} for i, e in enumerate(result.events)]
    )
    append_jsonl(out_dir / "rollouts.jsonl", result.rollouts)


def _new_shard_name(features: Path, first_problem: int) -> str:
    """A shard name no kept event uses (a rebuilt problem must not overwrite its old chunk's shard)."""
    name, copy = f"shard-{first_problem:06d}.safetensors", 0
    while (features / name).exists():
        copy += 1
        name = f"shard-{first_problem:06d}-{copy}.safetensors"
    return name
