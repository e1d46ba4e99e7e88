"""The probe pipeline: labelled cue events from rollouts (`build_data`), the probe (`model`) and its training
(`training`), split conformal thresholds (`conformal`, `calibration`) and probes on the Hub (`sharing`)."""

from lynx_exit.probe.model import (
    CONFORMAL_FILE,
    PROBE_META,
    PROBE_WEIGHTS,
    Probe,
    ProbeBundle,
    ProbeScorer,
    load_probe,
    save_probe,
    write_conformal,
)
from lynx_exit.probe.training import ProbeTrainConfig, auroc, brier, stratified_split, train_probe

__all__ = [
    "CONFORMAL_FILE",
    "PROBE_META",
    "PROBE_WEIGHTS",
    "Probe",
    "ProbeBundle",
    "ProbeScorer",
    "ProbeTrainConfig",
    "auroc",
    "brier",
    "load_probe",
    "save_probe",
    "stratified_split",
    "train_probe",
    "write_conformal",
]
