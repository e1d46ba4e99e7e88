"""The CLI chain and the demo at tiny scale on the shipped reference model."""

import json

from lynx_exit.cli import main
from lynx_exit.reference.demo import DemoConfig, run_demo

COMMON = ["--model", "reference", "--max-new-tokens", "400", "--batch-size", "12"]


def test_cli_chain_build_train_calibrate_generate_eval(tmp_path, capsys):
    # Non-default layers (the reference model's default is 1,2,3,4): generate and eval must use the
    # probe's own.
    layers = ["--layers", "2,4"]
    for split, folder in (("train", "tr"), ("calib", "ca")):
        assert (
            main(
                [
                    "build-data",
                    "--task",
                    "arith",
                    "--split",
                    split,
                    "--num-problems",
                    "18",
                    "--out",
                    str(tmp_path / folder),
                    "--decision-points",
                    "cue,answer",
                    *COMMON,
                    *layers,
                ]
            )
            == 0
        )
    assert (
        main(["train", "--data", str(tmp_path / "tr"), "--out", str(tmp_path / "probe"), "--epochs", "30"])
        == 0
    )
    probe_meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe_meta["feature_spec"]["layers"] == [2, 4] and probe_meta["decision_points"] == [
        "cue",
        "answer",
    ]
    assert (
        main(
            [
                "calibrate",
                "--probe",
                str(tmp_path / "probe"),
                "--data",
                str(tmp_path / "ca"),
                "--deltas",
                "0.3,0.5",
                "--give-up-after",
                "50",
            ]
        )
        == 0
    )
    conformal = json.loads((tmp_path / "probe" / "conformal.json").read_text())
    assert [(row["point"], row["delta"]) for row in conformal["event"]] == [
        ("cue", 0.3),
        ("cue", 0.5),
        ("answer", 0.3),
        ("answer", 0.5),
    ]
    assert {row["points"] for row in conformal["trajectory"]} == {"cue", "answer", "cue+answer"}
    assert {row["min_tokens"] for row in conformal["give_up"]} == {50}
    assert (
        main(
            [
                "risk",
                "--probe",
                str(tmp_path / "probe"),
                "--data",
                str(tmp_path / "ca"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    risk = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {row["mode"] for row in risk} == {"event", "trajectory", "harm", "give_up"} and all(
        "margin95" in r for r in risk
    )
    capsys.readouterr()
    # calibrating on the training data is refused
    assert main(["calibrate", "--probe", str(tmp_path / "probe"), "--data", str(tmp_path / "tr")]) == 2
    assert "shares 18 problems" in capsys.readouterr().err
    question = (
        "Ana has 3 coins. Then Ana doubles the pile. Then Ana buys 4 more. How many coins does Ana have now?"
    )
    assert (
        main(
            [
                "generate",
                "--exit",
                "lynx",
                "--probe",
                str(tmp_path / "probe"),
                "--delta",
                "0.5",
                "--json",
                question,
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["finish_reason"] in ("eos", "exit", "length")
    assert (
        main(
            [
                "generate",
                "--exit",
                "lynx",
                "--probe",
                str(tmp_path / "probe"),
                "--delta",
                "0.5",
                "--mode",
                "trajectory",
                "--decision-points",
                "cue,answer",
                "--give-up-delta",
                "0.3",
                "--json",
                question,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--exit",
                "lynx",
                "--probe",
                str(tmp_path / "probe"),
                "--delta",
                "0.5",
                "--decision-points",
                "cue,paragraph",
                question,
            ]
        )
        == 2
    )
    assert "never saw paragraph" in capsys.readouterr().err
    assert (
        main(["generate", "--exit", "token-budget", "--budget", "5", "--decision-points", "answer", question])
        == 2
    )
    assert "read only by the LYNX methods" in capsys.readouterr().err
    assert (
        main(["generate", "--exit", "lynx", "--probe", str(tmp_path / "probe"), "--delta", "0.07", question])
        == 2
    )
    assert "no event-level calibration at delta=0.07" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--task",
                "arith",
                "--num-problems",
                "4",
                "--probe",
                str(tmp_path / "probe"),
                "--out",
                str(out),
                "--methods",
                "never,token-budget,lynx,lynx-harm,deer,dynasor,nowait",
                "--budgets",
                "100",
                "--deltas",
                "0.5",
                "--deer-thresholds",
                "0.9",
                "--dynasor",
                "48:2",
                "--decision-points",
                "cue,answer",
                "--give-up-deltas",
                "0.5",
                *COMMON,
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    lynx = [f"{name}[cue+answer, give-up 0.5]@0.5" for name in ("lynx", "lynx-harm")]
    assert {row["setting"] for row in summary["settings"]} == {
        "never",
        "token-budget@100",
        "deer@0.9",
        "dynasor@48",
        "nowait",
        *lynx,
    }
    assert all("give_ups" in row and "exits_by_point" in row for row in summary["settings"])
    assert summary["probe_training_task"] == "arith" and (out / "pareto.png").exists()
    assert main(["generate", "--exit", "deer", question]) == 2
    assert "--exit deer needs --threshold" in capsys.readouterr().err

    # Every setting and artifact is checked before the first rollout; a busy folder is refused at once.
    for flags, message in (
        (["--probe", str(tmp_path / "nowhere"), "--methods", "never"], "nowhere' does not exist"),
        (
            ["--probe", str(tmp_path / "probe"), "--methods", "never,lynx", "--deltas", "0.5,0.15"],
            "delta=0.15",
        ),
    ):
        assert (
            main(
                [
                    "eval",
                    "--task",
                    "arith",
                    "--num-problems",
                    "2",
                    "--out",
                    str(tmp_path / "e2"),
                    *flags,
                    *COMMON,
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err and not (tmp_path / "e2").exists()
    from lynx_exit.artifacts import FolderLock

    with FolderLock(out, "lynx-exit eval"):
        assert (
            main(
                [
                    "eval",
                    "--task",
                    "arith",
                    "--num-problems",
                    "4",
                    "--out",
                    str(out),
                    "--methods",
                    "never",
                    *COMMON,
                ]
            )
            == 2
        )
    assert "is in use by another lynx-exit eval run" in capsys.readouterr().err
    # Retraining drops the old calibration: LYNX asks for a new one instead of using stale thresholds.
    assert (
        main(["train", "--data", str(tmp_path / "tr"), "--out", str(tmp_path / "probe"), "--epochs", "3"])
        == 0
    )
    assert (
        main(["generate", "--exit", "lynx", "--probe", str(tmp_path / "probe"), "--delta", "0.5", question])
        == 2
    )
    assert "run lynx-exit calibrate" in capsys.readouterr().err


def test_demo_smoke(tmp_path):
    config = DemoConfig(
        train_problems=12, calib_problems=12, test_problems=6, deltas=(0.3,), budgets=(100,), batch_size=8
    )
    result = run_demo(config, tmp_path, progress=False)
    assert [row["setting"] for row in result["settings"]] == [
        "never",
        "token-budget@100",
        "lynx@0.3",
        "lynx-harm@0.3",
    ]
    assert (tmp_path / "eval" / "pareto.png").exists() and (tmp_path / "demo.json").exists()
    assert "| lynx@0.3 |" in result["table"]


def test_every_command_prints_its_help(capsys):
    """argparse formats help strings with %: a stray one makes `--help` a traceback."""
    import pytest

    from lynx_exit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)).choices
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage: lynx-exit " + name in capsys.readouterr().out
