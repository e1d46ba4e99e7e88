"""Print the README's results section from benchmarks/results/*.json (paste its output into README.md)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def main() -> None:
    out = []
    ref = load("reference_model.json")
    out.append("### The shipped reference model (`benchmarks/reference_model.py`)\n")
    out.append(
        f"{ref['problems']} held-out problems at T={ref['temperature']}: full chain-of-thought accuracy "
        f"**{100 * ref['full_cot_accuracy']:.1f} %**, mean **{ref['mean_generated_tokens']}** generated tokens, "
        f"**{ref['mean_cue_events_per_rollout']}** cue events per rollout. Forced-exit accuracy along the trace:\n"
    )
    out.append("| position in trace | cue events | forced-exit accuracy |\n|---|---|---|")
    for row in ref["forced_exit_accuracy_by_position"]:
        acc = "—" if row["forced_exit_accuracy"] is None else f"{100 * row['forced_exit_accuracy']:.1f} %"
        out.append(f"| {row['trace_fraction']} | {row['events']} | {acc} |")
    for name, title in (("demo", "`lynx-exit demo`"), ("eval_reference", "`benchmarks/eval_reference.sh`")):
        path = RESULTS / name / "summary.md"
        if path.exists():
            out.append(f"\n### {title} (from `benchmarks/results/{name}/summary.json`)\n")
            out.append(path.read_text().strip())
            out.append(f"\n![Pareto plot](benchmarks/results/{name}/pareto.png)")
    dec = load("decode_overhead.json")
    out.append("\n### Speed\n")
    out.append("| benchmark | measured | target |\n|---|---|---|")
    for row in dec["results"]:
        out.append(
            f"| decode loop vs `model.generate` ({row['model']}, greedy, batch 1) | {row['ours_tokens_per_s']} vs "
            f"{row['generate_tokens_per_s']} tokens/s = **{row['ratio']}×** | ≥ 0.9× |"
        )
    lab = load("labelling_speed.json")
    out.append(
        f"| forced-exit labelling, {lab['events']} events | batched from KV cache {lab['batched_s']} s vs one "
        f"`generate` per event {lab['one_by_one_generate_s']} s = **{lab['speedup']}×** (answers agree "
        f"{lab['answers_agree']}) | ≥ 5× |"
    )
    probe = load("probe_overhead.json")
    out.append(
        f"| probe + cue check in the online loop | **{100 * probe['policy_plus_cue_check_fraction']:.2f} %** of decode time "
        f"({probe['probe_ms_per_cue']} ms per cue, {probe['mean_step_ms']} ms per step) | < 1 % |"
    )
    thr = load("eval_throughput.json")
    cells = ", ".join(f"{r['method']} batch {r['batch_size']}: {r['problems_per_s']}/s" for r in thr["results"])
    out.append(f"| eval throughput, continuous batching ({thr['problems']} problems) | {cells} | batch 8+ ≫ batch 1 |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
