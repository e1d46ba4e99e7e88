"""Probes shared like models: the model card, and `--probe OWNER/NAME` read through huggingface_hub's
cache."""

import hashlib
import json
import shutil

import huggingface_hub.constants
import pytest

# the module fixture: train and cal datasets, a calibrated probe
from test_pipeline import chain  # noqa: F401

from lynx_exit.artifacts import file_sha256
from lynx_exit.exits.registry import MethodContext
from lynx_exit.probe import ProbeTrainConfig, load_probe
from lynx_exit.probe.build_data import load_dataset
from lynx_exit.probe.calibration import calibrate_probe_folder, train_probe_folder
from lynx_exit.probe.sharing import PROBE_FILES, locate_probe

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache, repo_id, files, commit=COMMIT, ref="main"):
    """What `huggingface_hub` leaves after downloading `files`: blobs by hash, a ref, a snapshot of
    symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for source in files:
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(f"../../blobs/{blob.name}")
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_calibrate_writes_a_model_card_from_the_folder(chain):  # noqa: F811
    root, _, _ = chain
    card = (root / "probe" / "README.md").read_text()
    bundle = load_probe(root / "probe")
    assert card.startswith("---\nlibrary_name: lynx-exit\n") and "\n---\n" in card
    assert f"`{bundle.spec.model_id}`" in card and bundle.spec.tokenizer_hash in card
    assert "layers: " + ", ".join(str(layer) for layer in bundle.spec.layers) in card
    rows = [
        line
        for line in card.splitlines()
        if line.startswith(("| event |", "| trajectory |", "| harm |", "| give-up |"))
    ]
    assert [row.split(" | ")[:3] for row in rows] == [
        [f"| {mode}", "cue", str(d)]
        for mode in ("event", "trajectory", "harm", "give-up")
        for d in (0.3, 0.5)
    ]
    assert "Decision points it was trained on: cue" in card
    assert file_sha256(root / "probe" / "probe.safetensors") in card
    report = json.loads((root / "probe" / "conformal.json").read_text())
    events = report["calibration_dataset"]["events"]
    assert (
        f"{events} events ({report['calibration_dataset']['safe_events']} safe): {events} at cue points"
        in card
    )
    assert report["calibration_dataset"]["folder"] == str(root / "cal")
    assert "- train: `" in card and "- calibrate: `" in card
    assert f"{bundle.meta['training_dataset']['problems']} problems" in card


def test_retraining_removes_the_card_of_the_old_calibration(chain, tmp_path):  # noqa: F811
    root, _, _ = chain
    shutil.copytree(root / "probe", tmp_path / "probe")
    train_probe_folder(
        load_dataset(root / "train"), tmp_path / "probe", ProbeTrainConfig(max_epochs=2), "train"
    )
    assert (
        not (tmp_path / "probe" / "README.md").exists()
        and not (tmp_path / "probe" / "conformal.json").exists()
    )
    calibrate_probe_folder(tmp_path / "probe", load_dataset(root / "cal"), deltas=[0.4])
    assert "| event | cue | 0.4 |" in (tmp_path / "probe" / "README.md").read_text()


def test_a_hub_repo_id_is_read_from_the_hub_cache_offline(chain, tiny_lm, offline_cache):  # noqa: F811
    root, _, _ = chain
    files = [root / "probe" / name for name in PROBE_FILES]
    snapshot = lay_out_hub_cache(offline_cache, "acme/tiny-lynx-probe", files)
    assert locate_probe("acme/tiny-lynx-probe") == snapshot
    assert locate_probe(f"acme/tiny-lynx-probe@{COMMIT}") == snapshot
    bundle, _ = MethodContext(lm=tiny_lm, probe="acme/tiny-lynx-probe").loaded_probe()
    local = load_probe(root / "probe")
    assert bundle.event_thresholds == local.event_thresholds and bundle.spec == local.spec


def test_an_uncached_repo_offline_says_what_to_do(offline_cache):
    with pytest.raises(FileNotFoundError) as error:
        locate_probe("acme/not-cached")
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "hf download acme/not-cached --local-dir DIR" in message


def test_a_cached_repo_that_is_not_a_probe_is_refused(tmp_path, offline_cache):
    readme = tmp_path / "README.md"
    readme.write_text("# some model\n")
    lay_out_hub_cache(offline_cache, "acme/a-model", [readme])
    with pytest.raises(
        FileNotFoundError, match="'acme/a-model' has no probe.safetensors .* not a lynx-exit probe"
    ):
        locate_probe("acme/a-model")


def test_a_missing_folder_that_is_no_repo_id_is_a_missing_folder(tmp_path, offline_cache):
    with pytest.raises(FileNotFoundError, match="probe folder .* does not exist"):
        locate_probe(str(tmp_path / "runs" / "probe"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        locate_probe(tmp_path / "file")


def test_the_cli_reports_an_uncached_probe_repo_without_a_traceback(offline_cache, capsys):
    from lynx_exit.cli import main

    code = main(
        ["generate", "--model", "reference", "--probe", "acme/not-cached", "--max-new-tokens", "4", "2+2?"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        err.startswith("lynx-exit generate: error: no folder 'acme/not-cached' here") and "hf download" in err
    )
