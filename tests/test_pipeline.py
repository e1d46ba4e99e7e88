"""build-data → train → calibrate → online LYNX on the tiny model."""

import hashlib
import json
from dataclasses import dataclass

import pytest
import torch

from lynx_exit.engine import DecodeLoop, GenerationConfig
from lynx_exit.exits import LynxPolicy, first_exit
from lynx_exit.probe import ProbeTrainConfig, load_probe
from lynx_exit.probe.build_data import BuildConfig, build_dataset, load_dataset
from lynx_exit.probe.calibration import calibrate_probe_folder, empirical_rates, train_probe_folder
from lynx_exit.tasks import Problem


@dataclass(frozen=True)
class ParityProblem(Problem):
    """A random tiny model never answers right; grade by a hash of the answer to get both labels."""

    def grade(self, response: str) -> bool:
        return hashlib.sha256(response.encode()).digest()[0] % 2 == 0


GEN = GenerationConfig(
    max_new_tokens=40, min_new_tokens=40, temperature=1.0, seed=11, cue_regex=r"[ae]", answer_max_tokens=4
)
BUILD = BuildConfig(max_events_per_rollout=6, batch_size=4, label_batch_size=5, rollouts_per_problem=2)


def problems(prefix, n):
    return [
        ParityProblem("toy", f"{prefix}-{i}", f"Problem {prefix} {i}: add {i} and 3.", "0") for i in range(n)
    ]


@pytest.fixture(scope="module")
def chain(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    spec = tiny_lm.feature_spec()
    train_summary = build_dataset(
        tiny_lm, problems("train", 10), root / "train", GEN, BUILD, spec, progress=False
    )
    build_dataset(tiny_lm, problems("cal", 10), root / "cal", GEN, BUILD, spec, progress=False)
    metrics = train_probe_folder(
        load_dataset(root / "train"), root / "probe", ProbeTrainConfig(max_epochs=20), "train"
    )
    calibrate_probe_folder(root / "probe", load_dataset(root / "cal"), deltas=[0.3, 0.5])
    return root, train_summary, metrics


def test_dataset_is_self_describing(chain, tiny_lm):
    root, summary, _ = chain
    data = load_dataset(root / "train")
    assert summary["rollouts"] == 20 and len(data.events) == summary["events"] > 20
    assert data.features.shape == (len(data.events), tiny_lm.feature_spec().feature_dim)
    assert {e["label"] for e in data.events} == {0, 1}
    meta = json.loads((root / "train" / "meta.json").read_text())
    assert meta["feature_spec"]["layers"] == list(tiny_lm.feature_spec().layers)
    assert meta["generation"]["seed"] == 11 and "command" in meta
    assert all(e["tokens_so_far"] == e["token_index"] for e in data.events)


def test_resume_loses_nothing(chain, tiny_lm, tmp_path):
    root, _, _ = chain
    spec = tiny_lm.feature_spec()
    first = problems("train", 10)
    build_dataset(tiny_lm, first[:4], tmp_path / "d", GEN, BUILD, spec, progress=False)
    # simulate a crash that left half-written events of an unfinished problem
    with (tmp_path / "d" / "events.jsonl").open("a") as handle:
        handle.write(json.dumps({"problem_id": "train-9", "rollout": 0, "label": 1}) + "\n")
    with pytest.raises(ValueError, match="other problem_ids"):
        build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)


def test_resume_continues_same_problem_list(chain, tiny_lm, tmp_path):
    root, _, _ = chain
    spec = tiny_lm.feature_spec()
    full = load_dataset(root / "train")
    first = problems("train", 10)
    build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)
    # drop the last problems' records and leave a stray event line, as an interrupted run would
    rollouts = (tmp_path / "d" / "rollouts.jsonl").read_text().splitlines()
    (tmp_path / "d" / "rollouts.jsonl").write_text("\n".join(rollouts[:8]) + "\n")
    resumed = build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)
    again = load_dataset(tmp_path / "d")
    assert resumed["events"] == len(full.events)
    key = lambda e: (e["problem_id"], e["rollout"], e["token_index"])  # noqa: E731
    assert sorted(map(key, again.events)) == sorted(map(key, full.events))


def test_lost_events_are_detected_and_rebuilt_on_resume(chain, tiny_lm, tmp_path, caplog):
    """Reproduction: with events.jsonl emptied and rollouts.jsonl intact, a rerun exited 0 with 0 events."""
    root, _, _ = chain
    full = load_dataset(root / "train")
    spec, first = tiny_lm.feature_spec(), problems("train", 10)
    build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)
    (tmp_path / "d" / "events.jsonl").write_text("")
    with pytest.raises(
        ValueError, match=r"incomplete: rollout 'train-0'/0 records \d+ events but events.jsonl has 0"
    ):
        load_dataset(tmp_path / "d")
    with caplog.at_level("WARNING"):
        resumed = build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)
    assert "10 problem(s) have incomplete records" in caplog.text
    again = load_dataset(tmp_path / "d")
    assert resumed["events"] == len(full.events) and resumed["rollouts"] == 20
    assert torch.equal(again.features, full.features)
    # A lost feature shard is rebuilt too, without overwriting the shards other problems still use.
    shards = sorted((tmp_path / "d" / "features").glob("shard-*.safetensors"))
    shards[0].unlink()
    build_dataset(tiny_lm, first, tmp_path / "d", GEN, BUILD, spec, progress=False)
    assert torch.equal(
        load_dataset(tmp_path / "d").features.sort(dim=0).values, full.features.sort(dim=0).values
    )
    assert not list((tmp_path / "d").rglob("*.tmp"))


def test_an_event_line_without_shard_names_file_line_and_key(chain, tmp_path):
    """Reproduction: an event line without `shard` gave a KeyError traceback."""
    import shutil

    root, _, _ = chain
    shutil.copytree(root / "train", tmp_path / "d")
    lines = (tmp_path / "d" / "events.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["shard"]
    lines[2] = json.dumps(broken)
    (tmp_path / "d" / "events.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"events.jsonl:3: record has no 'shard'"):
        load_dataset(tmp_path / "d")


def test_a_second_build_on_the_same_folder_is_refused(tiny_lm, tmp_path):
    from lynx_exit.artifacts import FolderBusyError, FolderLock

    busy = pytest.raises(FolderBusyError, match="in use by another lynx-exit build-data run")
    with FolderLock(tmp_path / "d", "lynx-exit build-data"), busy:
        build_dataset(
            tiny_lm, problems("x", 1), tmp_path / "d", GEN, BUILD, tiny_lm.feature_spec(), progress=False
        )


def test_calibration_refuses_overlap(chain):
    root, _, _ = chain
    with pytest.raises(ValueError, match="shares 10 problems"):
        calibrate_probe_folder(root / "probe", load_dataset(root / "train"))


def test_online_lynx_equals_offline_replay(chain, tiny_lm):
    root, _, metrics = chain
    assert {"train_auroc", "val_auroc", "val_brier", "positive_rate"} <= set(metrics)
    bundle = load_probe(root / "probe", expected=tiny_lm.feature_spec())
    assert bundle.event_thresholds and bundle.trajectory_thresholds
    exits = 0
    for i in range(4):
        prompt = tiny_lm.prompt_ids(problems("test", 4)[i].prompt)
        recorded = list(DecodeLoop(tiny_lm, [prompt], GEN, layers=bundle.spec.layers).steps())
        for mode in ("event", "trajectory", "harm"):
            offline = first_exit(LynxPolicy(bundle, 0.5, mode=mode), recorded)
            online = DecodeLoop(tiny_lm, [prompt], GEN, policies=[LynxPolicy(bundle, 0.5, mode=mode)]).run()[
                0
            ]
            assert online.exit_index == offline
            exits += offline is not None
    assert exits > 0
    rates = empirical_rates(bundle, load_dataset(root / "cal"))
    assert {r["mode"] for r in rates} == {"event", "trajectory", "harm", "give_up"}
