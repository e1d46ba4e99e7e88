"""`build-data` and `eval` on a local Ray instance with 2 CPU workers: the same output as one process, also
when a worker dies mid-run."""

import json
import sys

import pytest
import torch

from lynx_exit.cli import main
from lynx_exit.engine import GenerationConfig
from lynx_exit.evaluate import run_eval
from lynx_exit.exits import parse_methods
from lynx_exit.models import ModelSource
from lynx_exit.probe.build_data import BuildConfig, build_dataset, load_dataset
from lynx_exit.scale import RayOptions, RayPool
from lynx_exit.scale.ray_runner import EXIT_AFTER_ENV, EXIT_MARKER_ENV
from lynx_exit.tasks import Problem

ray = pytest.importorskip("ray")  # an optional extra; the test extra installs it, so CI runs this module

GEN = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=4, cue_regex="[ae]", answer_max_tokens=4)
BUILD = BuildConfig(
    max_events_per_rollout=3,
    batch_size=4,
    label_batch_size=5,
    rollouts_per_problem=2,
    decision_points=("cue", "paragraph"),
)  # the kinds travel to the workers
OPTIONS = RayOptions(address="local", workers=2, cpus_per_worker=1)
PROBLEMS = [Problem("gsm8k", f"p{i}", f"What is {i} plus 3?", str(i + 3)) for i in range(7)]


@pytest.fixture(scope="module")
def source(tiny_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    return ModelSource(str(folder), dtype="float64")


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: the module pool, a second pool and the CLI's workers (1 torch thread each) coexist.
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(source, local_ray):
    with RayPool(source, OPTIONS) as running:
        yield running


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_dataset(got, want):
    assert lines(got / "rollouts.jsonl") == lines(want / "rollouts.jsonl")
    assert lines(got / "events.jsonl") == lines(want / "events.jsonl")
    torch.testing.assert_close(load_dataset(got).features, load_dataset(want).features)


def test_build_data_on_ray_equals_one_process(source, pool, tmp_path):
    lm = source.load()
    build_dataset(lm, PROBLEMS, tmp_path / "local", GEN, BUILD, lm.feature_spec(), progress=False)
    assert pool.feature_spec() == lm.feature_spec()
    build_dataset(
        None,
        PROBLEMS,
        tmp_path / "ray",
        GEN,
        BUILD,
        pool.feature_spec(),
        progress=False,
        runner=pool.build_runner,
    )
    same_dataset(tmp_path / "ray", tmp_path / "local")


def sorted_records(folder):
    return sorted(
        ({k: v for k, v in r.items() if k != "latency_s"} for r in lines(folder / "records.jsonl")),
        key=lambda r: (r["setting"], r["problem_id"], r["rollout"]),
    )


def test_eval_on_ray_equals_one_process(source, pool, tmp_path):
    settings = parse_methods(
        ["never", "token-budget", "deer", "first-answer"], {"budget": "6", "threshold": "0.5"}
    )
    local = run_eval(
        source.load(), PROBLEMS, settings, GEN, tmp_path / "local", rollouts=2, batch_size=3, progress=False
    )
    pool.check_settings(settings)
    on_ray = run_eval(
        None,
        PROBLEMS,
        settings,
        GEN,
        tmp_path / "ray",
        rollouts=2,
        batch_size=3,
        progress=False,
        runner=pool.eval_runner,
    )
    assert sorted_records(tmp_path / "ray") == sorted_records(tmp_path / "local")
    assert len(sorted_records(tmp_path / "ray")) == 4 * 7 * 2
    strip = [
        {k: v for k, v in row.items() if not k.startswith(("mean_latency", "wall_time"))}
        for row in on_ray["settings"]
    ]
    assert strip == [
        {k: v for k, v in row.items() if not k.startswith(("mean_latency", "wall_time"))}
        for row in local["settings"]
    ]


def test_a_bad_setting_is_reported_from_the_worker_as_itself(pool):
    with pytest.raises(ValueError, match="needs a warm-up"):
        pool.check_settings(parse_methods(["deepconf"], {"keep": "50"}))


def test_a_worker_that_dies_mid_run_loses_nothing_and_writes_nothing_twice(
    source, local_ray, tmp_path, monkeypatch
):
    lm = source.load()
    build_dataset(lm, PROBLEMS, tmp_path / "local", GEN, BUILD, lm.feature_spec(), progress=False)
    monkeypatch.setenv(EXIT_AFTER_ENV, "1")  # the first worker to finish a chunk exits before its next one
    monkeypatch.setenv(EXIT_MARKER_ENV, str(tmp_path / "died"))
    with RayPool(source, OPTIONS) as pool:
        build_dataset(
            None,
            PROBLEMS,
            tmp_path / "ray",
            GEN,
            BUILD,
            pool.feature_spec(),
            progress=False,
            runner=pool.build_runner,
        )
    assert (tmp_path / "died").exists()  # a worker did die, and was restarted
    same_dataset(tmp_path / "ray", tmp_path / "local")
    keys = [(r["problem_id"], r["rollout"]) for r in lines(tmp_path / "ray" / "rollouts.jsonl")]
    assert len(keys) == len(set(keys)) == len(PROBLEMS) * 2


def test_cli_eval_with_ray_and_without_it_installed(source, local_ray, tmp_path, monkeypatch, capsys):
    flags = [
        "eval",
        "--model",
        source.name,
        "--dtype",
        "float64",
        "--task",
        "gsm8k",
        "--data",
        str(tmp_path / "p.jsonl"),
        "--methods",
        "never,token-budget",
        "--budgets",
        "5",
        "--max-new-tokens",
        "12",
        "--seed",
        "1",
    ]
    (tmp_path / "p.jsonl").write_text(
        "".join(
            json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(4)
        )
    )
    assert main([*flags, "--out", str(tmp_path / "local")]) == 0
    assert (
        main([*flags, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2", "--cpus-per-worker", "1"])
        == 0
    )
    assert sorted_records(tmp_path / "ray") == sorted_records(tmp_path / "local")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "none"), "--ray"]) == 2
    assert "pip install 'lynx-exit[ray]'" in capsys.readouterr().err


def test_an_interrupted_ray_eval_resumes_to_the_single_process_output(source, pool, tmp_path):
    settings = parse_methods(["never", "token-budget"], {"budget": "6"})
    run_eval(source.load(), PROBLEMS, settings, GEN, tmp_path / "local", batch_size=3, progress=False)
    seen = []

    def stop_after_four():
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(
            None,
            PROBLEMS,
            settings,
            GEN,
            tmp_path / "ray",
            batch_size=3,
            progress=False,
            runner=pool.eval_runner,
            on_record=stop_after_four,
        )
    assert len(lines(tmp_path / "ray" / "records.jsonl")) == 4
    run_eval(
        None, PROBLEMS, settings, GEN, tmp_path / "ray", batch_size=3, progress=False, runner=pool.eval_runner
    )
    assert sorted_records(tmp_path / "ray") == sorted_records(tmp_path / "local")
