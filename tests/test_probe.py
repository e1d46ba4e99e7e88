import json

import numpy as np
import pytest
import torch

from lynx_exit.models import FeatureSpec
from lynx_exit.probe import ProbeTrainConfig, auroc, load_probe, save_probe, train_probe

SPEC = FeatureSpec(model_id="m", layers=(1, 3), tokenizer_hash="abc", hidden_size=5)


def _data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SPEC.feature_dim, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    return x, y


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s, y = rng.random(50).round(1), rng.random(50) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))


def test_probe_learns_and_round_trips_bit_exactly(tmp_path):
    x, y = _data()
    probe, metrics = train_probe(x, y, ProbeTrainConfig(max_epochs=60, seed=1))
    assert metrics["val_auroc"] > 0.8 and 0 < metrics["positive_rate"] < 1
    save_probe(tmp_path, probe, SPEC, {"metrics": metrics})
    loaded = load_probe(tmp_path, expected=SPEC)
    for (name, a), (_, b) in zip(probe.state_dict().items(), loaded.probe.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(probe.prob_safe(x), loaded.probe.prob_safe(x))
    assert not list(tmp_path.glob("*.pkl"))


def test_probe_is_seeded():
    x, y = _data()
    a, _ = train_probe(x, y, ProbeTrainConfig(max_epochs=5, seed=3))
    b, _ = train_probe(x, y, ProbeTrainConfig(max_epochs=5, seed=3))
    assert torch.equal(a.prob_safe(x), b.prob_safe(x))


def test_mismatched_and_corrupted_probe_folders(tmp_path):
    x, y = _data()
    probe, _ = train_probe(x, y, ProbeTrainConfig(max_epochs=2))
    save_probe(tmp_path, probe, SPEC, {})
    other = FeatureSpec(model_id="other", layers=(1, 2), tokenizer_hash="abc", hidden_size=5)
    with pytest.raises(ValueError, match=r"built for model 'm'.*used with model 'other'.*layers"):
        load_probe(tmp_path, expected=other)
    (tmp_path / "probe.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        load_probe(tmp_path)
    (tmp_path / "probe.json").write_text("{not json")
    with pytest.raises(ValueError, match="probe.json"):
        load_probe(tmp_path)
    with pytest.raises(FileNotFoundError, match="no probe.safetensors"):
        load_probe(tmp_path / "missing")


def test_probe_needs_both_classes():
    x, _ = _data(20)
    with pytest.raises(ValueError, match="both safe and unsafe"):
        train_probe(x, torch.ones(20, dtype=torch.long), ProbeTrainConfig())
    probe, metrics = train_probe(
        x, torch.zeros(20, dtype=torch.long), ProbeTrainConfig(max_epochs=30, allow_one_class=True)
    )
    assert metrics["val_auroc"] is None and float(probe.prob_safe(x).max()) < 0.5


def test_no_calibration_gives_clear_error(tmp_path):
    x, y = _data()
    probe, _ = train_probe(x, y, ProbeTrainConfig(max_epochs=2))
    save_probe(tmp_path, probe, SPEC, {})
    with pytest.raises(ValueError, match="run lynx-exit calibrate"):
        load_probe(tmp_path).event_threshold(0.05)
    assert json.loads((tmp_path / "probe.json").read_text())["feature_spec"]["feature_dim"] == 10


EVENT = {"delta": 0.1, "q_pos": 0.4, "q_neg": 0.6, "n_pos": 10, "n_neg": 10}


def _saved_probe(folder, seed=0):
    torch.manual_seed(seed)
    from lynx_exit.probe import Probe

    save_probe(folder, Probe(SPEC.feature_dim), SPEC, {})
    return folder


def test_calibration_is_bound_to_the_weights_it_was_computed_for(tmp_path, caplog):
    """Reproduction: retraining into a calibrated folder kept the old conformal.json, and generate used it."""
    from lynx_exit.probe import write_conformal

    folder = _saved_probe(tmp_path / "p")
    write_conformal(folder, {"event": [EVENT]})
    assert load_probe(folder).event_threshold(0.1).q_pos == 0.4
    stale = (folder / "conformal.json").read_text()
    with caplog.at_level("WARNING"):
        _saved_probe(folder, seed=1)  # retrain into the same folder
    assert not (folder / "conformal.json").exists() and "run lynx-exit calibrate again" in caplog.text
    (folder / "conformal.json").write_text(stale)  # copied back by hand
    with pytest.raises(ValueError, match=r"conformal.json does not belong to the probe weights beside it"):
        load_probe(folder)
    assert load_probe(folder, calibration=False).event_thresholds == []


@pytest.mark.parametrize(
    "content,message",
    [
        ("[1, 2]", "expected a JSON object of calibrations, got list"),
        ('{"event": [{"delta": 0.1}]', "invalid JSON"),
        ('{"event": [{"delta": 0.1}]}', "no weights hash"),
    ],
)
def test_malformed_conformal_files_name_the_file_and_the_fault(tmp_path, content, message):
    folder = _saved_probe(tmp_path / "p")
    (folder / "conformal.json").write_text(content)
    with pytest.raises(ValueError, match=rf"conformal.json.*{message}"):
        load_probe(folder)


@pytest.mark.parametrize(
    "report,message",
    [
        ({"event": [{"delta": 0.1}]}, r"event\[0\] has no 'q_pos'"),
        ({"event": [{**EVENT, "q_neg": 1.5}]}, r"event\[0\]: q_neg must be in \[0, 1\] or inf, got 1.5"),
        ({"event": [{**EVENT, "q_pos": "nan"}]}, r"event\[0\]: q_pos must be in \[0, 1\]"),
        ({"event": [{**EVENT, "delta": 0}]}, r"event\[0\]: delta must be in \(0, 1\)"),
        (
            {
                "trajectory": [
                    {"delta": 0.1, "epsilon": 0.1, "threshold": -0.2, "n_rollouts": 3, "empirical_risk": 0}
                ]
            },
            r"trajectory\[0\]: threshold must be in \[0, 1\]",
        ),
        ({"harm": {"delta": 0.1}}, "'harm' must be a list"),
        ({"event": ["x"]}, r"event\[0\] must be an object"),
    ],
)
def test_thresholds_outside_their_range_are_refused(tmp_path, report, message):
    from lynx_exit.probe import write_conformal

    folder = _saved_probe(tmp_path / "p")
    write_conformal(folder, report)
    with pytest.raises(ValueError, match=rf"conformal.json: {message}"):
        load_probe(folder)


def test_malformed_probe_metadata_names_the_file(tmp_path):
    folder = _saved_probe(tmp_path / "p")
    (folder / "probe.json").write_text("[]")
    with pytest.raises(
        ValueError, match=r"probe.json is not a valid probe metadata file: expected a JSON object"
    ):
        load_probe(folder)
    (folder / "probe.json").write_text("{}")
    with pytest.raises(ValueError, match=r"probe.json is not a valid probe metadata file: no 'feature_spec'"):
        load_probe(folder)
