"""Overlap (issue 35): the next decode launched before the host reads this step's tokens gives what the
synchronous loop gives, token for token: exits (both exit prefixes), cue indices, features and scores, trial
decodes, DeepConf, Speculative Thinking beside it, requests joining, ending and held (the compiled step with
overlap: `test_kv_store.py::test_compiled_decode_steps_match_eager`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lynx_exit.engine import Engine, GenerationConfig
from lynx_exit.engine.assist import AssistConfig
from lynx_exit.exits import MethodContext, make_policy
from lynx_exit.reference import as_task_problems, make_problems

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MAX_NEW = 320
PROBE, DEEPCONF = str(RESULTS / "probe_reference"), str(RESULTS / "deepconf_reference")


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    from lynx_exit.models import load_model

    return load_model("reference", dtype="float64"), load_model("reference-large", dtype="float64")


def _run(thinker: Any, assistant: Any, overlap: bool) -> tuple[list[Any], list[Any], Engine]:
    context = MethodContext(lm=thinker, probe=PROBE, deepconf=DEEPCONF)
    plans: list[tuple[Any, Any, dict[str, Any]]] = [
        (make_policy("lynx", context, delta=0.2), None, {}),
        (make_policy("deer", threshold=0.5), None, {}),
        (make_policy("lynx", context, delta=0.2, exit_prefix="lookahead"), None, {}),
        (make_policy("deepconf", context, keep=50), None, {}),
        (make_policy("dynasor", context, interval=16, window="2"), None, {}),
        (None, None, {"hold": True}),
        (None, AssistConfig(lookahead=6, takeover=8, verify_extension=4, trigger="\n"), {}),
    ]
    problems = as_task_problems(make_problems("test", len(plans)), "test")
    engine = Engine(thinker, max_batch_size=4, assistant=assistant, overlap=overlap)
    ids, steps = [], []
    for i, ((policy, assist, extra), problem) in enumerate(zip(plans, problems, strict=True)):
        config = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0 if i % 2 else 0.6)
        ids.append(
            engine.add_request(
                thinker.prompt_ids(problem.prompt), config, policy=policy, seed=i, assist=assist, **extra
            )
        )
        for _ in range(5 if assist is None else 0):  # requests join while others decode
            steps += engine.step()
        if i == len(plans) - 2:  # the assisted request joins late: the others run with overlap before it
            for _ in range(170):
                steps += engine.step()
    steps += list(engine.stream())
    seen = [
        (s.request_id, s.index, s.token_id, s.phase, s.cue, s.point, s.exit, s.score, s.confidence)
        + (None if s.features is None else float(s.features.double().sum()),)
        for s in steps
    ]
    results = [engine.result(i) for i in ids]
    kept = [
        (r.token_ids, r.finish_reason, r.exit_index, r.cue_indices, r.exit_point, r.assist) for r in results
    ]
    return kept, sorted(seen, key=lambda row: (row[0], row[1])), engine


def test_overlap_gives_the_synchronous_loops_tokens_on_the_reference_pair(pair: tuple[Any, Any]) -> None:
    thinker, assistant = pair
    synchronous, sync_steps, plain = _run(thinker, assistant, overlap=False)
    overlapped, steps, engine = _run(thinker, assistant, overlap=True)
    assert overlapped == synchronous
    assert steps == sync_steps
    assert plain.launched_ahead == 0
    assert (
        engine.launched_ahead > 50 and 0 < engine.ahead_held < engine.launched_ahead
    )  # guesses held and voided
    exits = [row for row in synchronous if row[2] is not None]
    assert len(exits) >= 3 and any(
        row[5] is not None for row in synchronous
    )  # exits, and an assisted request
    held = engine.backend.length(5)  # a held request keeps what it read, no token past it
    assert held == plain.backend.length(5)
