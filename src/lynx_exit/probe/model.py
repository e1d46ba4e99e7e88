"""The LYNX probe (how-it-works §4): standardisation → MLP(256, 64, ReLU) → P(safe to exit), in torch.

A probe trained on several kinds of decision point sees the kind as an input (a one-hot after the hidden
states) and refuses a kind it never saw. Saved as safetensors (weights + scaler) and JSON metadata; no pickle
anywhere."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lynx_exit.artifacts import file_sha256, save_tensors_atomic, write_json_atomic
from lynx_exit.decision_points import DEFAULT_EXIT_PREFIX, DEFAULT_POINTS, parse_points, points_key
from lynx_exit.models import FeatureSpec
from lynx_exit.probe.conformal import EventThreshold, GiveUpThreshold, TrajectoryThreshold

logger = logging.getLogger(__name__)

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
CONFORMAL_FILE = "conformal.json"


class Probe(nn.Module):
    mean: torch.Tensor  # [feature_dim] standardisation, saved with the weights
    std: torch.Tensor

    def __init__(
        self, feature_dim: int, hidden: tuple[int, int] = (256, 64), kinds: tuple[str, ...] = DEFAULT_POINTS
    ) -> None:
        super().__init__()
        self.kinds = parse_points(list(kinds))  # the decision point kinds it was trained on
        input_dim = feature_dim + (len(self.kinds) if len(self.kinds) > 1 else 0)
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    def inputs(self, features: torch.Tensor, points: list[str] | None = None) -> torch.Tensor:
        """The probe's input rows: the hidden states, and each row's decision point kind (one-hot) when it
        knows several. A kind it was not trained on is refused."""
        features = features.float()
        if points is not None:
            unseen = sorted(set(points) - set(self.kinds))
            if unseen:
                raise ValueError(
                    f"the probe was trained on {points_key(self.kinds)} decision points, not {unseen}"
                )
        if len(self.kinds) == 1:
            return features
        if points is None or len(points) != len(features):
            raise ValueError(
                f"a probe of several decision point kinds ({points_key(self.kinds)}) needs each row's kind"
            )
        index = torch.tensor([self.kinds.index(p) for p in points], device=features.device)
        return torch.cat([features, nn.functional.one_hot(index, len(self.kinds)).to(features.dtype)], dim=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [n] of P(safe) for input rows [n, input_dim] (`inputs`)."""
        return self.net((inputs - self.mean) / self.std).squeeze(-1)

    @torch.inference_mode()
    def prob_safe(self, features: torch.Tensor, points: list[str] | None = None) -> torch.Tensor:
        return torch.sigmoid(self(self.inputs(features, points)))


@dataclass(eq=False)
class ProbeScorer:
    """P(safe) of many feature rows in one call (the engine's `Scorer`); one per loaded probe, shared by its
    policies."""

    probe: Probe

    def __call__(self, features: torch.Tensor, points: list[str] | None = None) -> torch.Tensor:
        return self.probe.prob_safe(features, points)


class AllKindsScorer:
    """P(safe) of feature rows as each decision point kind the probe knows, in one pass ([n, feature_dim] ->
    [n, kinds], equal to `Probe.prob_safe` per kind): the standardisation is folded into the first layer,
    whose share of the features is computed once, and each kind's one-hot input becomes a bias of that layer.
    For an engine that scores a token before it knows which kind of point the token is (the vLLM plug-in)."""

    def __init__(self, probe: Probe) -> None:
        first, self.second, self.third = probe.net[0], probe.net[2], probe.net[4]
        assert isinstance(first, nn.Linear)
        kinds = len(probe.kinds)
        with torch.no_grad():
            weight = first.weight / probe.std  # [hidden, inputs]
            bias = first.bias - weight @ probe.mean
            features = weight.shape[1] - (kinds if kinds > 1 else 0)
            self.weight = weight[:, :features].T.contiguous()  # [feature_dim, hidden]
            self.kind_bias = (
                bias + weight[:, features:].T if kinds > 1 else bias[None]
            ).contiguous()  # [kinds, hidden]

    def to(self, device: torch.device) -> AllKindsScorer:
        self.weight, self.kind_bias = self.weight.to(device), self.kind_bias.to(device)
        self.second.to(device)
        self.third.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(
            (features.float() @ self.weight)[None] + self.kind_bias[:, None]
        )  # [kinds, n, hidden]
        return torch.sigmoid(self.third(torch.relu(self.second(hidden)))).squeeze(-1).T


@dataclass
class ProbeBundle:
    """A probe with its feature spec, metadata and (once calibrated) conformal thresholds."""

    probe: Probe
    spec: FeatureSpec
    meta: dict[str, Any]
    event_thresholds: list[EventThreshold] = field(default_factory=list)
    trajectory_thresholds: list[TrajectoryThreshold] = field(default_factory=list)
    harm_thresholds: list[TrajectoryThreshold] = field(default_factory=list)
    give_up_thresholds: list[GiveUpThreshold] = field(default_factory=list)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The decision point kinds the probe was trained on."""
        return self.probe.kinds

    @property
    def exit_prefix(self) -> str:
        """The exit prefix its labels were made with (`lynx_exit.decision_points.EXIT_PREFIXES`)."""
        return str(self.meta.get("exit_prefix", DEFAULT_EXIT_PREFIX))

    def check_points(self, points: tuple[str, ...]) -> None:
        """Refuse decision point kinds the probe never saw, naming the ones it did."""
        unseen = [kind for kind in points if kind not in self.kinds]
        if unseen:
            raise ValueError(
                f"the probe was trained on {points_key(self.kinds)} decision points only; it never saw "
                f"{', '.join(unseen)} points (build its data with --decision-points {points_key(points)})"
            )

    def harm_threshold(self, delta: float, points: tuple[str, ...] = DEFAULT_POINTS) -> TrajectoryThreshold:
        return _pick(self.harm_thresholds, delta, "harm", points_key(points))

    def event_threshold(self, delta: float, point: str = "cue") -> EventThreshold:
        return _pick(self.event_thresholds, delta, "event", point, attribute="point")

    def trajectory_threshold(
        self, delta: float, points: tuple[str, ...] = DEFAULT_POINTS
    ) -> TrajectoryThreshold:
        return _pick(self.trajectory_thresholds, delta, "trajectory", points_key(points))

    def give_up_threshold(self, delta: float, points: tuple[str, ...] = DEFAULT_POINTS) -> GiveUpThreshold:
        return _pick(self.give_up_thresholds, delta, "give-up", points_key(points))


def _pick(thresholds: list[Any], delta: float, mode: str, points: str, attribute: str = "points") -> Any:
    of_points = [item for item in thresholds if getattr(item, attribute) == points]
    for item in of_points:
        if math.isclose(item.delta, delta, rel_tol=0, abs_tol=1e-9):
            return item
    if not of_points:
        calibrated = sorted({getattr(item, attribute) for item in thresholds})
        raise ValueError(
            f"probe has no {mode}-level calibration for {points} decision points; calibrated: "
            f"{calibrated or 'none (run lynx-exit calibrate)'}"
        )
    available = [t.delta for t in of_points]
    raise ValueError(
        f"probe has no {mode}-level calibration at delta={delta} ({points} points); calibrated deltas: "
        f"{available}"
    )


def save_probe(folder: Path, probe: Probe, spec: FeatureSpec, meta: dict[str, Any]) -> None:
    """Write the weights and metadata; a calibration of the weights this replaces is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / CONFORMAL_FILE
    if stale.exists():
        logger.warning(
            "%s belonged to the probe being replaced: removed (run lynx-exit calibrate again)", stale
        )
        stale.unlink()
    card = folder / "README.md"  # the model card calibrate wrote describes the old calibration
    if card.is_file() and card.read_text(encoding="utf-8").startswith("---\nlibrary_name: lynx-exit\n"):
        card.unlink()
    tensors = {name: value.detach().contiguous() for name, value in probe.state_dict().items()}
    save_tensors_atomic(folder / PROBE_WEIGHTS, tensors, metadata={"format": "lynx-exit-probe-v1"})
    write_json_atomic(
        folder / PROBE_META, {"feature_spec": spec.to_dict(), "decision_points": list(probe.kinds), **meta}
    )


def write_conformal(folder: Path, report: dict[str, Any]) -> None:
    """Write `conformal.json` bound to the probe weights it was computed for (their sha256)."""
    write_json_atomic(
        folder / CONFORMAL_FILE, {"probe_weights_sha256": file_sha256(folder / PROBE_WEIGHTS), **report}
    )


def _read_conformal(path: Path, weights_sha256: str) -> dict[str, list[Any]]:
    """The thresholds of `conformal.json`; a malformed file or one from other weights raises naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of calibrations, got {type(data).__name__}")
    recorded = data.get("probe_weights_sha256")
    if recorded != weights_sha256:
        found = f"weights {recorded[:12]}" if isinstance(recorded, str) else "no weights hash"
        raise ValueError(
            f"{path} does not belong to the probe weights beside it ({found}, the weights are "
            f"{weights_sha256[:12]}): the probe was retrained or copied after calibration; run lynx-exit "
            "calibrate again"
        )
    sections: dict[str, list[Any]] = {}
    for mode, parse in (
        ("event", EventThreshold.from_dict),
        ("trajectory", TrajectoryThreshold.from_dict),
        ("harm", TrajectoryThreshold.from_dict),
        ("give_up", GiveUpThreshold.from_dict),
    ):
        rows = data.get(mode, [])
        if not isinstance(rows, list):
            raise ValueError(f"{path}: {mode!r} must be a list of thresholds, got {type(rows).__name__}")
        sections[mode] = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: {mode}[{index}] must be an object, got {type(row).__name__}")
            try:
                sections[mode].append(parse(row))
            except KeyError as exc:
                raise ValueError(f"{path}: {mode}[{index}] has no {exc.args[0]!r}") from None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: {mode}[{index}]: {exc}") from None
    return sections


def load_probe(
    folder: str | Path, expected: FeatureSpec | None = None, calibration: bool = True
) -> ProbeBundle:
    """Load a probe folder; with `expected`, refuse a probe from another feature space.

    With `calibration`, also read `conformal.json` if present (refused if it belongs to other weights).
    """
    folder = Path(folder)
    weights, meta_file = folder / PROBE_WEIGHTS, folder / PROBE_META
    for path in (weights, meta_file):
        if not path.is_file():
            raise FileNotFoundError(f"probe folder {str(folder)!r} has no {path.name}")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise TypeError(f"expected a JSON object, got {type(meta).__name__}")
        spec = FeatureSpec.from_dict(meta["feature_spec"])
    except KeyError as exc:
        raise ValueError(f"{meta_file} is not a valid probe metadata file: no {exc.args[0]!r}") from None
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{meta_file} is not a valid probe metadata file: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights} is corrupted or not a safetensors file: {exc}") from exc
    try:
        probe = Probe(spec.feature_dim, kinds=tuple(meta.get("decision_points", DEFAULT_POINTS)))
    except ValueError as exc:
        raise ValueError(f"{meta_file}: decision_points: {exc}") from None
    try:
        probe.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not match the feature spec in {meta_file}: {exc}") from exc
    probe.eval()
    if expected is not None:
        spec.check_compatible(expected, what=f"probe {str(folder)!r}")
    bundle = ProbeBundle(probe=probe, spec=spec, meta=meta)
    conformal_file = folder / CONFORMAL_FILE
    if calibration and conformal_file.is_file():
        sections = _read_conformal(conformal_file, file_sha256(weights))
        bundle.event_thresholds, bundle.trajectory_thresholds = sections["event"], sections["trajectory"]
        bundle.harm_thresholds, bundle.give_up_thresholds = sections["harm"], sections["give_up"]
    return bundle
