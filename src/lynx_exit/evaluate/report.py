"""The eval's report: the markdown table, the Pareto plot and the folder's summary files (from
`summarize`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lynx_exit.artifacts import FolderLock, write_atomic, write_json_atomic


def _label(row: dict[str, Any]) -> str:
    """The setting, with the assistant's share of the tokens for Speculative Thinking."""
    share = row.get("assistant_share")
    return row["setting"] if share is None else f"{row['setting']} (assistant wrote {100 * share:.0f} %)"


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| method | accuracy (95% CI) | mean tokens (+trial) | tokens saved | exit rate | help/harm | "
        "give-ups (right in full) "
        "| wall s/problem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["settings"]:
        low, high = row["accuracy_ci95"]
        saved = "—" if row["tokens_saved_pct"] is None else f"{row['tokens_saved_pct']:.1f} %"
        trial = f" (+{row['mean_trial_tokens']:.1f})" if row["mean_trial_tokens"] else ""
        lines.append(
            f"| {_label(row)} | {100 * row['accuracy']:.1f} % ({100 * low:.1f}–{100 * high:.1f}) | "
            f"{row['mean_generated_tokens']:.1f}{trial} | {saved} | {100 * row['exit_rate']:.0f} % | "
            f"{row['help']}/{row['harm']} | {_give_up_cell(row)} | "
            f"{_seconds(row['wall_time_per_problem_s'])} |"
        )
    return "\n".join(lines) + "\n"


def _give_up_cell(row: dict[str, Any]) -> str:
    return f"{row['give_ups']} ({row['give_ups_right_in_full']})" if row.get("give_ups") else "—"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# What each LYNX method guarantees at its δ (how-it-works §5); the plot names it in the legend.
GUARANTEES = {
    "event": "P(exit | unsafe point) ≤ δ per kind",
    "trajectory": "P(premature exit) ≤ δ",
    "harm": "P(exit turns right into wrong) ≤ δ",
}
LYNX_MODES = {"lynx-event": "event", "lynx-trajectory": "trajectory", "lynx-harm": "harm"}


def pareto_plot(
    summary: dict[str, Any], path: Path, title: str = "Accuracy vs tokens", lynx_mode: str = "event"
) -> None:
    """Accuracy (with its 95 % interval as error bars) against mean tokens, one curve per method;
    the LYNX curves are drawn solid with the guarantee of their mode in the legend, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float, float, float, str]]] = defaultdict(list)
    methods: dict[str, str] = {}
    for row in summary["settings"]:
        low, high = row["accuracy_ci95"]
        curve = row["setting"].rsplit("@", 1)[0] if row["knob"] is not None else row["setting"]
        methods[curve] = row["method"]
        curves[curve].append(
            (row["mean_total_tokens"], 100 * row["accuracy"], 100 * low, 100 * high, row["setting"])
        )
    fig, ax = plt.subplots(figsize=(8, 5))
    colormap = plt.get_cmap("tab20")  # more methods than the default cycle's ten colours
    colors = [colormap(i) for i in range(20)]
    for index, (curve, points) in enumerate(curves.items()):
        method = methods[curve]
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        # (clamped: at 0 % or 100 % the interval's end equals the point up to rounding)
        errors = [
            [max(0.0, y - p[2]) for y, p in zip(ys, points, strict=True)],
            [max(0.0, p[3] - y) for y, p in zip(ys, points, strict=True)],
        ]
        mode = lynx_mode if method == "lynx" else LYNX_MODES.get(method)
        label = f"{curve} ({GUARANTEES[mode]})" if mode else curve
        ax.errorbar(
            xs,
            ys,
            yerr=errors,
            capsize=2,
            markersize=4,
            label=label,
            color=colors[index % len(colors)],
            linestyle="-" if mode else "--",
            linewidth=2.2 if mode else 1.0,
            marker="D" if mode else "o",
        )
        for x, y, _, _, label_text in points:
            if "@" in label_text:
                ax.annotate(
                    label_text.split("@")[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    ax.set_xlabel("mean tokens per problem (incl. trial decodes)")
    ax.set_ylabel("accuracy (%), 95 % interval")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict[str, Any], out_dir: Path, meta: dict[str, Any], title: str) -> None:
    with FolderLock(out_dir, "lynx-exit eval"):
        write_json_atomic(out_dir / "summary.json", {**meta, **summary})
        write_atomic(out_dir / "summary.md", markdown_table(summary))
        pareto_plot(summary, out_dir / "pareto.png", title, lynx_mode=str(meta.get("mode", "event")))
