"""Probes shared like models: the model card `calibrate` writes, and `--probe` as a Hub repo id.

A probe folder (weights, `probe.json`, `conformal.json`, `README.md`) can be uploaded to the
Hugging Face Hub as it is (`hf upload OWNER/NAME runs/probe`); `--probe OWNER/NAME[@REVISION]`
then fetches it through `huggingface_hub`, which keeps it in the usual Hub cache, so later runs,
offline ones included, read it from there."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import file_sha256, write_atomic
from lynx_exit.probe import CONFORMAL_FILE, PROBE_META, PROBE_WEIGHTS, load_probe

CARD_FILE = "README.md"
PROBE_FILES = (PROBE_WEIGHTS, PROBE_META, CONFORMAL_FILE, CARD_FILE)
PAPER_URL = "https://arxiv.org/abs/2512.05325"


def _is_repo_id(text: str) -> bool:
    """`OWNER/NAME` as the Hub spells repo ids (no local path, no GGUF file)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1 or text.endswith(".gguf") or Path(text).expanduser().exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def locate_probe(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder of probe `ref`: a local folder, or a Hub repo id `OWNER/NAME[@REVISION]`.

    A repo id is fetched with `huggingface_hub.snapshot_download` (only the probe's files) into
    the Hub cache, or read from that cache when offline. Every failure says what to do.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if path.exists():
        raise FileNotFoundError(
            f"--probe {text!r} is a file; give the probe folder (the one holding {PROBE_WEIGHTS})"
        )
    repo_id, _, revision = text.partition("@")
    if not _is_repo_id(repo_id):
        raise FileNotFoundError(
            f"probe folder {text!r} does not exist (nor is it a Hub repo id OWNER/NAME[@REVISION])"
        )
    folder = Path(_download(repo_id, revision or None, cache_dir))
    if not (folder / PROBE_WEIGHTS).is_file() or not (folder / PROBE_META).is_file():
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} has no {PROBE_WEIGHTS} and {PROBE_META} at its top level: "
            "it is not a lynx-exit probe (upload the folder that lynx-exit train wrote)"
        )
    return folder


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> str:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from lynx_exit import __version__

    where = f"no folder {repo_id!r} here, so it was looked up as a Hub repository"
    try:
        return str(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=list(PROBE_FILES),
                library_name="lynx-exit",
                library_version=__version__,
            )
        )
    except GatedRepoError:
        raise FileNotFoundError(
            f"{where}: {repo_id!r} is gated; accept its terms on the Hub, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{where}, and the Hub has no repository {repo_id!r} you can read "
            "(a typo? a private repository needs `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{where}: repository {repo_id!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError, OfflineModeIsEnabled) as exc:
        cached = _cached_snapshot(repo_id, revision, cache_dir)
        if cached is not None:  # huggingface_hub 1.x asks the Hub about a commit hash even offline
            return cached
        reason = (
            "HF_HUB_OFFLINE is set"
            if huggingface_hub.constants.is_offline_mode()
            else f"the Hub could not be reached ({exc.__class__.__name__})"
        )
        raise FileNotFoundError(
            f"{where}, but {reason} and the Hugging Face cache holds no complete copy of it. "
            f"Run once with network access to cache it (unset HF_HUB_OFFLINE), or download it where you have "
            f"network, `hf download {repo_id} --local-dir DIR`, and pass --probe DIR"
        ) from None


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> str | None:
    """The cached snapshot folder that holds the probe's weights and metadata at `revision`, else None."""
    import huggingface_hub

    found = [
        huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        for name in (PROBE_WEIGHTS, PROBE_META)
    ]
    if not all(isinstance(path, str) for path in found):
        return None
    return str(Path(str(found[0])).parent)


def _number(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _calibration_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for row in report.get("event", []):
        low, high = 1 - float(row["q_pos"]), float(row["q_neg"])  # exit iff P(safe) ≥ low and > high
        if row.get("never_exit"):
            rule = "never exits (too few unsafe calibration events for this δ)"
        else:
            rule = f"P(safe) > {_number(high)}" if high >= low else f"P(safe) ≥ {_number(low)}"
        rows.append(
            f"| event | {row.get('point', 'cue')} | {row['delta']} | {rule} | "
            f"{row['n_pos']} safe / {row['n_neg']} unsafe events |"
        )
    for mode in ("trajectory", "harm", "give_up"):
        for row in report.get(mode, []):
            if mode == "give_up":
                rule = (
                    "never gives up"
                    if row.get("never")
                    else (
                        f"give up at P(safe) ≤ {_number(row['threshold'])} from token {row['min_tokens']} on"
                    )
                )
            else:
                rule = "never exits" if row.get("never_exit") else f"P(safe) ≥ {_number(row['threshold'])}"
            stat = (
                f"risk {_number(row['empirical_risk'])} on {row['n_rollouts']} rollouts, ε = {row['epsilon']}"
            )
            rows.append(
                f"| {mode.replace('_', '-')} | {row.get('points', 'cue')} | {row['delta']} | {rule} | "
                f"{stat} |"
            )
    return rows


def _data_lines(summary: dict[str, Any] | None, folder: Any, task: Any) -> list[str]:
    if not summary:
        return [f"- data: `{folder}` (task {task})"]
    lines = [f"- data: `{summary.get('folder') or folder}`, task `{summary.get('task') or task}`"]
    lines.append(
        f"- {summary['problems']} problems, {summary['rollouts']} rollouts, {summary['events']} events "
        f"({summary['safe_events']} safe)"
        + (
            ": " + ", ".join(f"{n} at {kind} points" for kind, n in summary["events_by_point"].items())
            if summary.get("events_by_point")
            else " at cue words"
        )
    )
    generation = summary.get("generation")
    if generation:
        keys = ("temperature", "top_p", "max_new_tokens", "max_reasoning_tokens")
        lines.append("- sampling: " + ", ".join(f"{k} {generation[k]}" for k in keys if k in generation))
    return lines


def model_card(folder: str | Path) -> str:
    """The Markdown model card of a calibrated probe folder, built from its files."""
    folder = Path(folder)
    bundle = load_probe(folder)
    report = json.loads((folder / CONFORMAL_FILE).read_text(encoding="utf-8"))
    spec, meta = bundle.spec, bundle.meta
    profile = json.loads(spec.profile) if spec.profile else None
    front = ["---", "library_name: lynx-exit"]
    if _is_repo_id(spec.model_id):
        front.append(f"base_model: {spec.model_id}")
    front += ["tags:", "- lynx-exit", "- early-exit", "- conformal-prediction", "- reasoning", "---", ""]
    usable = [r["delta"] for r in report.get("event", []) if not r.get("never_exit")]
    delta = 0.1 if 0.1 in usable or not usable else min(usable)
    out = front + [
        f"# LYNX early-exit probe for `{spec.model_id}`",
        "",
        f"A lynx-exit ([LYNX]({PAPER_URL})) probe: at each decision point in `{spec.model_id}`'s reasoning "
        "it reads",
        "the hidden states below and scores whether the answer would be right if thinking stopped there;",
        "the conformal thresholds turn your δ into the exit rule. Use this folder, or this repository, as "
        "`--probe`:",
        "",
        "```bash",
        f"lynx-exit generate --model {spec.model_id} --probe PROBE --delta {delta} --mode event "
        '"your question"',
        "```",
        "",
        "It is refused with any other model, tokenizer, layers or thinking profile.",
        "",
        f"Decision points it was trained on: {', '.join(bundle.kinds)} (`--decision-points`; any other kind "
        "is refused).",
        "",
        "## Features",
        "",
        f"- base model: `{spec.model_id}`",
        f"- layers: {', '.join(str(layer) for layer in spec.layers)} (hidden size {spec.hidden_size}, "
        f"{spec.feature_dim} features per decision point)",
        f"- tokenizer sha256: `{spec.tokenizer_hash}`",
    ]
    if profile:
        out.append(
            "- profile: "
            + ", ".join(f"{key} `{json.dumps(value)}`" for key, value in sorted(profile.items()))
        )
    metrics = meta.get("metrics", {})
    out += ["", "## Training", ""]
    out += _data_lines(meta.get("training_dataset"), meta.get("training_data"), meta.get("training_task"))
    quality = ", ".join(
        f"{key} {_number(metrics[key])}" for key in ("val_auroc", "val_brier", "epochs") if key in metrics
    )
    if quality:
        out.append(f"- held-out events: {quality}")
    out += ["", "## Calibration", ""]
    out += _data_lines(
        report.get("calibration_dataset"), report.get("calibration_data"), report.get("calibration_data")
    )
    out += [
        "",
        "| mode | decision points | δ | rule | calibration |",
        "|---|---|---|---|---|",
        *_calibration_rows(report),
        "",
        "`event`: each decision point of that kind with an unsafe answer exits with probability ≤ δ "
        "(calibrated per",
        "kind). `trajectory`: a rollout's first exit over the enabled kinds is premature with probability ≤ "
        "δ (with",
        "confidence 1 − ε). `harm`: as trajectory, counting only exits that turn a rollout the model would "
        "have got",
        "right into a wrong one. `give-up` (`give_up_delta`): a rollout that would have ended right is "
        "given up on",
        "with probability ≤ δ (with confidence 1 − ε); a give-up only stops traces, so every exit guarantee "
        "holds",
        "whatever it does.",
        "",
        "## How it was made",
        "",
    ]
    for step, command in (("train", meta.get("command")), ("calibrate", report.get("command"))):
        if command:
            out.append(f"- {step}: `{command}`")
    out += [
        "",
        f"Files: `{PROBE_WEIGHTS}` (sha256 `{file_sha256(folder / PROBE_WEIGHTS)}`), `{PROBE_META}`, "
        f"`{CONFORMAL_FILE}`.",
        "",
    ]
    return "\n".join(out)


def write_model_card(folder: str | Path) -> Path:
    """Write the folder's `README.md` model card (atomically) and return its path."""
    path = Path(folder) / CARD_FILE
    write_atomic(path, model_card(folder))
    return path
