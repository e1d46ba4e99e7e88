"""`lynx-exit train`, `calibrate` and `risk`: a probe from build-data folders, its conformal thresholds, and
the risk they realize on held-out data."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import write_json_atomic


def cmd_train(args: argparse.Namespace) -> int:
    from lynx_exit.models import FeatureSpec
    from lynx_exit.probe import ProbeTrainConfig
    from lynx_exit.probe.calibration import train_probe_folder
    from lynx_exit.probe.dataset import load_dataset

    dataset = load_dataset(args.data)
    if args.expect_spec:
        FeatureSpec.from_dict(json.loads(Path(args.expect_spec).read_text())).check_compatible(
            dataset.spec, "dataset"
        )
    config = ProbeTrainConfig(
        max_epochs=args.epochs,
        patience=args.patience,
        learning_rate=args.lr,
        seed=args.seed,
        allow_one_class=args.allow_one_class,
    )
    metrics = train_probe_folder(dataset, Path(args.out), config, args.data)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lynx_exit.probe.calibration import calibrate_probe_folder
    from lynx_exit.probe.dataset import load_dataset

    deltas = [float(x) for x in args.deltas.split(",")]
    report = calibrate_probe_folder(
        Path(args.probe),
        load_dataset(args.data),
        deltas,
        epsilon=args.epsilon,
        give_up_after=args.give_up_after,
    )
    for row in report["event"]:
        note = "  (never exits: too few unsafe calibration events for this δ)" if row["never_exit"] else ""
        print(
            f"event      {row['point']:<9} δ={row['delta']:<5} q_pos={row['q_pos']} "
            f"q_neg={row['q_neg']}{note}"
        )
    for mode in ("trajectory", "harm", "give_up"):
        for row in report[mode]:
            note = "  (never)" if row.get("never_exit", row.get("never")) else ""
            print(
                f"{mode:<10} {row['points']:<9} δ={row['delta']:<5} threshold={row['threshold']} "
                f"calib risk={row['empirical_risk']:.3f}{note}"
            )
    print(f"wrote {Path(args.probe) / 'conformal.json'} and the model card {Path(args.probe) / 'README.md'}")
    return 0


def sampling_margin(row: dict[str, Any]) -> float | None:
    """The 95 % sampling margin of a realized rate against its δ. A rollout-level rule (trajectory, harm,
    give-up) holds with probability 1 − ε over the calibration set, so only the test rollouts' binomial
    sampling enters. The per-event rule holds on average over calibration sets, so the calibration set's own
    sampling enters too (its unsafe events of that kind), and a rollout's events are not independent: both
    terms carry the design effect the test set shows (the rollout-clustered variance over the binomial one, at
    least 1)."""
    n, delta = row["n"], row["delta"]
    if not n:
        return None
    binomial = delta * (1 - delta) / n
    if row["mode"] != "event":
        return 1.96 * math.sqrt(binomial)
    clustered = (row.get("cluster_se") or 0.0) ** 2
    design = max(1.0, clustered / (row["rate"] * (1 - row["rate"]) / n)) if 0 < row["rate"] < 1 else 1.0
    calibration = delta * (1 - delta) / max(1, row.get("n_calibration") or n)
    return 1.96 * math.sqrt(design * (binomial + calibration))


def cmd_risk(args: argparse.Namespace) -> int:
    """The realized risk of every calibrated rule on held-out labelled data, with its 95 % sampling margin."""
    from lynx_exit.probe import load_probe
    from lynx_exit.probe.calibration import empirical_rates
    from lynx_exit.probe.dataset import load_dataset

    bundle = load_probe(args.probe)
    dataset = load_dataset(args.data)
    bundle.spec.check_compatible(dataset.spec, what=f"probe {args.probe!r}")
    overlap = set(bundle.meta.get("training_problem_ids", [])) & dataset.problem_ids
    if overlap:
        raise ValueError(
            f"--data shares {len(overlap)} problems with the probe's training data (e.g. "
            f"{sorted(overlap)[:3]}); "
            "measure the risk on held-out problems"
        )
    rows = []
    for row in empirical_rates(bundle, dataset):
        margin = sampling_margin(row)
        rows.append(
            {**row, "margin95": margin, "within": margin is not None and row["rate"] <= row["delta"] + margin}
        )
    for row in rows:
        shown = "—" if row["margin95"] is None else f"{row['margin95']:.3f}"
        print(
            f"{row['mode']:<10} {row['points']:<24} δ={row['delta']:<5} realized {row['rate']:.3f} on "
            f"{row['n']:<5} "
            f"margin {shown}  {'ok' if row['within'] else 'OVER'}"
        )
    if args.out:
        write_json_atomic(Path(args.out), {"probe": args.probe, "data": args.data, "rows": rows})
        print(f"wrote {args.out}")
    return 0


def add_commands(sub: Any) -> None:
    """`train`, `calibrate` and `risk`."""
    train = sub.add_parser("train", help="train the probe on a build-data folder")
    train.add_argument("--data", required=True, help="dataset folder from build-data")
    train.add_argument("--out", required=True, help="probe folder to write")
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--patience", type=int, default=15)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--expect-spec", default=None, help="JSON FeatureSpec the dataset must match")
    train.add_argument(
        "--allow-one-class", action="store_true", help="train even if every event has the same label"
    )
    train.set_defaults(func=cmd_train)

    cal = sub.add_parser("calibrate", help="conformal thresholds from a disjoint calibration dataset")
    cal.add_argument("--probe", required=True, help="probe folder from train")
    cal.add_argument(
        "--data", required=True, help="calibration dataset folder (problems disjoint from training)"
    )
    cal.add_argument("--deltas", default="0.01,0.02,0.03,0.05,0.1,0.2,0.3")
    cal.add_argument(
        "--epsilon", type=float, default=0.1, help="Learn-then-Test failure probability (trajectory mode)"
    )
    cal.add_argument(
        "--give-up-after", type=int, default=200, help="generated tokens before a give-up may happen"
    )
    cal.set_defaults(func=cmd_calibrate)

    risk = sub.add_parser("risk", help="the realized risk of every calibrated rule on held-out labelled data")
    risk.add_argument("--probe", required=True, help="calibrated probe folder")
    risk.add_argument(
        "--data", required=True, help="a build-data folder of held-out problems (e.g. the test split)"
    )
    risk.add_argument("--out", default=None, help="write the rows as JSON here")
    risk.set_defaults(func=cmd_risk)
