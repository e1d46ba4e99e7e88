"""Print the README's results section from benchmarks/results/*.json (paste its output into README.md)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


ROOT = Path(__file__).resolve().parents[1]
TARGETS = {  # file -> (start marker, end marker, what goes between)
    "docs/results.md": ("<!-- tables:start -->", "<!-- tables:end -->", lambda: results_tables()),
    "README.md": ("<!-- headline:start -->", "<!-- headline:end -->", lambda: headline_table()),
    "README.md#speed": ("<!-- speed:start -->", "<!-- speed:end -->", lambda: speed_table()),
}
HEADLINE = (
    "never",
    "token-budget@200",
    "deer@0.99",
    "nowait",
    "first-answer",
    "lynx@0.1",
    "lynx-trajectory@0.05",
    "lynx-harm@0.02",
    "lynx-harm[cue+answer, give-up 0.05]@0.02",
)


def main() -> None:
    """Write every generated table into its file (between its markers); `--check`: exit 1 where a file is
    stale."""
    import sys

    check = "--check" in sys.argv[1:]
    stale = []
    for name, (start, end, make) in TARGETS.items():
        path = ROOT / name.split("#")[0]
        text = path.read_text(encoding="utf-8")
        head, rest = text.split(start + "\n", 1)
        _, tail = rest.split(end, 1)
        new = f"{head}{start}\n{make().strip()}\n{end}{tail}"
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new, encoding="utf-8")
    if check and stale:
        print(f"stale: {', '.join(stale)}; run python benchmarks/readme_tables.py")
        raise SystemExit(1)


def headline_table() -> str:
    """The README's one table: a few settings of the three-slice reference evaluation."""
    summary = json.loads((RESULTS / "eval_reference" / "summary.json").read_text())
    rows = {row["setting"]: row for row in summary["settings"]}
    out = [
        f"{summary['n_records'] // len(summary['settings'])} rollouts per setting (three slices of the "
        "held-out "
        "split, paired seeds) on the shipped reference model; every setting and the plot: "
        "[docs/results.md](docs/results.md).\n",
        "| setting | accuracy (95 % CI) | tokens saved | on the Pareto front |",
        "|---|---|---|---|",
    ]
    for name in HEADLINE:
        row = rows[name]
        low, high = row["accuracy_ci95"]
        beaten = row.get("dominated_by") or []
        front = "**yes**" if not beaten else f"no (beaten by {len(beaten)}, e.g. `{beaten[0]}`)"
        out.append(
            f"| `{name}` | {100 * row['accuracy']:.1f} % ({100 * low:.1f}–{100 * high:.1f}) | "
            f"{row['tokens_saved_pct']:.1f} % | {front} |"
        )
    return "\n".join(out)


def results_tables() -> str:
    out = []
    out += behaviour_table()
    for name, title in (("demo", "`lynx-exit demo`"), ("eval_reference", "`benchmarks/eval_reference.sh`")):
        path = RESULTS / name / "summary.md"
        if path.exists():
            out.append(f"\n### {title} (from `benchmarks/results/{name}/summary.json`)\n")
            slices = json.loads((RESULTS / name / "summary.json").read_text()).get("slices")
            if slices:
                parts = ", ".join(
                    f"problems {s['offset']}–{s['offset'] + s['problems'] - 1} with seed {s['seed']}"
                    for s in slices
                )
                out.append(
                    f"{len(slices)} disjoint slices of the held-out split ({parts}), pooled; the per-slice "
                    "accuracy and the spread of tokens saved show how much one draw moves.\n"
                )
            out.append(path.read_text().strip())
            out += front_lines(json.loads((RESULTS / name / "summary.json").read_text()))
            large = RESULTS / f"{name}_large" / "summary.json"
            if large.exists():
                row = json.loads(large.read_text())["settings"][0]
                low, high = row["accuracy_ci95"]
                out.append(
                    f"\nThe large model alone (`reference-large`, same problems and seeds, "
                    f"`benchmarks/results/{name}_large/summary.json`): {100 * row['accuracy']:.1f} % "
                    f"({100 * low:.1f}–{100 * high:.1f}), {row['mean_generated_tokens']:.1f} tokens."
                )
            out.append(f"\n![Pareto plot](benchmarks/results/{name}/pareto.png)")
    out += risk_table()
    out += risk_table(
        "risk_reference_lookahead.json",
        ", the look-ahead exit prefix (`benchmarks/probe_lookahead.sh`: how the vLLM plug-in exits)",
    )
    eng = load("engine_throughput.json")
    out.append("\n### Speed\n")
    out.append(
        f"`benchmarks/engine_throughput.py` ({eng['device']}; greedy, fixed length, left-padded prompts, "
        "median of "
        "interleaved runs, ratios paired within each repeat; LYNX scores every cue with a probe calibrated "
        "never to "
        "exit, so lengths stay equal). Targets: engine ≥ 1.0× `generate`, LYNX ≥ 0.97× no policy.\n"
    )
    out.append(
        "| model | batch | `generate` tokens/s | engine tokens/s | engine ÷ generate | engine + LYNX "
        "tokens/s | LYNX ÷ no policy | cues scored per run |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for row in eng["results"]:
        out.append(
            f"| {row['model']} | {row['batch']} | {row['generate_tokens_per_s']} | "
            f"{row['engine_tokens_per_s']} | "
            f"**{row['engine_vs_generate_ratio']}×** | {row['engine_lynx_tokens_per_s']} | "
            f"**{row['lynx_vs_no_policy_ratio']}×** | "
            f"{row['cues_scored_per_run']:g} |"
        )
    out.append("\n| benchmark | measured | target |\n|---|---|---|")
    lab = load("labelling_speed.json")
    out.append(
        f"| forced-exit labelling, {lab['events']} events | batched from KV cache {lab['batched_s']} s vs "
        "one "
        f"`generate` per event {lab['one_by_one_generate_s']} s = **{lab['speedup']}×** (answers agree "
        f"{lab['answers_agree']}) | ≥ 5× |"
    )
    for name in ("probe_overhead.json", "probe_overhead_smollm2.json"):
        probe = load(name)
        cues = f", cues = {probe['cue_regex']!r}" if probe.get("cue_regex") else ""
        out.append(
            f"| probe + cue check in the online engine ({probe['model']}{cues}, {probe['cue_events']} cues "
            "in "
            f"{probe['steps']} steps) | **{100 * probe['policy_plus_cue_check_fraction']:.2f} %** of decode "
            "time "
            f"({probe['probe_ms_per_cue']} ms per cue, {probe['mean_step_ms']} ms per step) | < 1 % |"
        )
    thr = load("eval_throughput.json")
    cells = ", ".join(
        f"{r['method']} batch {r['batch_size']}: {r['problems_per_s']}/s" for r in thr["results"]
    )
    out.append(
        f"| eval throughput, continuous batching ({thr['problems']} problems) | {cells} | batch 8+ ≫ batch "
        "1 |"
    )
    out += step_overhead_table()
    out += compile_once_table()
    out += speculative_table()
    out += context_table()
    out += serve_table()
    out += faults_table()
    out += ray_table()
    out += vllm_table()
    out += gpu_table()
    return "\n".join(out).replace("](benchmarks/", "](../benchmarks/")


def vllm_table() -> list[str]:
    path = RESULTS / "vs_vllm.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    work, engine = data["workload"], data["vllm"]
    out = [
        "\n### Inside vLLM (`benchmarks/vs_vllm.py`, from `benchmarks/results/vs_vllm.json`)\n",
        f"vLLM {engine['version']} on the {engine['device']} ({engine['model_runner']}; "
        f"{'eager' if engine['enforce_eager'] else 'torch.compile'}), the `{work['model']}` model, greedy, "
        f"{work['new_tokens_per_row']} new tokens per row, {work['statistic']} ({work['reps']} reps). The "
        "plug-in "
        "scores every row at every step with a probe calibrated never to exit. Target: plug-in ≥ 0.95× "
        "plain vLLM.\n",
        "| batch | vLLM tokens/s | vLLM + plug-in | ÷ vLLM | lynx-exit engine | ÷ vLLM | engine + LYNX | ÷ "
        "vLLM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["side"], r["batch"]): r for r in data["rows"]}
    for batch in sorted({r["batch"] for r in data["rows"]}):
        cells = [f"{rows[('vllm', batch)]['tokens_per_s']}"]
        for side in ("vllm+lynx-plugin", "lynx-exit", "lynx-exit+lynx"):
            row = rows[(side, batch)]
            cells += [f"{row['tokens_per_s']}", f"**{row['vs_vllm']}×**"]
        out.append(f"| {batch} | " + " | ".join(cells) + " |")
    return out


def front_lines(summary: dict) -> list[str]:
    """Which LYNX settings are on the Pareto front (no row at least as accurate and as frugal, one strictly),
    and what the give-up rows cost."""
    rows = summary["settings"]
    if not any("dominated_by" in row for row in rows):
        return []
    front = [row["setting"] for row in rows if row["method"].startswith("lynx") and not row["dominated_by"]]
    lines = [
        "",
        "On the Pareto front of all rows (pooled accuracy against tokens saved): "
        + (", ".join(f"`{name}`" for name in front) if front else "no LYNX setting")
        + ".",
    ]
    for row in rows:
        if row.get("give_ups"):
            lines.append(
                f"`{row['setting']}` gave up on {row['give_ups']} traces: {row['give_ups_right_in_full']} "
                "ended right in "
                f"full, {row['give_ups_lost']} of them wrong after the give-up (its cost); "
                f"{row['give_ups_on_runaways']} ran "
                f"to the budget in full (runaways), {row['give_up_tokens_saved_on_runaways']} tokens saved "
                "on those, "
                f"{row['give_up_tokens_saved']} on all."
            )
    return lines


def risk_table(name: str = "risk_reference.json", what: str = "") -> list[str]:
    """The realized risk of the calibrated rules the evaluation uses, on the labelled test split."""
    path = RESULTS / name
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rollouts = next((row["n"] for row in data["rows"] if row["mode"] == "trajectory"), 0)
    kept = {("event", "cue"), ("event", "answer"), ("event", "paragraph"), ("give_up", "cue+answer")}
    kept |= {
        (mode, points)
        for mode in ("trajectory", "harm")
        for points in ("cue", "cue+answer", "cue+answer+paragraph")
    }
    cells: dict[tuple[str, str], dict[float, str]] = {}
    deltas: list[float] = []
    for row in data["rows"]:
        key = (row["mode"], row["points"])
        if key not in kept:
            continue
        deltas += [row["delta"]] if row["delta"] not in deltas else []
        mark = "" if row["within"] else " **over**"
        cells.setdefault(key, {})[row["delta"]] = (
            "—" if row["n"] == 0 else f"{row['rate']:.3f} ≤ {row['delta'] + row['margin95']:.3f}{mark}"
        )
    out = [
        f"\n### Realized risk on held-out problems{what} "
        f"(`lynx-exit risk`, from `benchmarks/results/{name}`)\n",
        f"Every decision point of the {rollouts} test problems labelled by a forced exit (build-data on the "
        "test split). Each cell: the realized rate ≤ δ plus its 95 % sampling margin. For the rollout-level "
        "rules (`trajectory`: P(first exit premature); `harm`: P(first exit turns a right chain wrong); "
        "`give_up`: P(give up on a rollout that ends right)), which hold with probability 1 − ε over the "
        f"calibration set, the margin is the test rollouts' binomial one, 1.96·√(δ(1−δ)/{rollouts}). "
        "`event` (P(exit | unsafe point of that kind)) holds on average over calibration sets, so "
        "its margin adds the "
        "calibration set's sampling (its unsafe events of that kind) and carries the design effect of events "
        "clustered in rollouts (`lynx-exit risk` prints both parts).\n",
        "| mode | decision points | " + " | ".join(f"δ = {d:g}" for d in deltas) + " |",
        "|---|---|" + "---|" * len(deltas),
    ]
    for (mode, points), by_delta in cells.items():
        out.append(f"| {mode} | {points} | " + " | ".join(by_delta.get(d, "—") for d in deltas) + " |")
    return out


def step_overhead_table() -> list[str]:
    path = RESULTS / "step_overhead.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = [
        "\n### The host around the compiled step (`benchmarks/step_overhead.py`, from "
        "`benchmarks/results/step_overhead.json`)\n",
        f"`Engine(compile=True)` on the reference model, greedy, {data['workload']['statistic']}; "
        f"the compiled call timed inside the same steps. Target: {data['target']}.\n",
        "| batch | LYNX scoring | step ms | compiled forward ms | host ms (median a step) | step ÷ forward |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        out.append(
            f"| {row['batch']} | {'yes' if row['lynx'] else 'no'} | {row['step_ms']} | "
            f"{row['compiled_forward_ms']} | {row.get('host_ms', '—')} | **{row['step_vs_forward']}×** |"
        )
    return out


def compile_once_table() -> list[str]:
    path = RESULTS / "compile_once.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    walk, warm = data["walk"], data["warm_up"]
    out = [
        "\n### Compile once (`benchmarks/compile_once.py`, from `benchmarks/results/compile_once.json`)\n",
        f"The {data['model']} model's compiled decode step over decode steps whose batch and attended width "
        f"go through {len(walk['steps'])} shapes (batch 1-64, width 64-8,192 and back): "
        f"**{walk['graphs']} graphs compiled** (target ≤ 3). `serve`'s warm-up of every batch size up to "
        f"{warm['max_batch_size']} in a fresh process: {warm['cold']['warm_up_s']} s cold, "
        f"{warm['cached']['warm_up_s']} s with the compile cache the cold run left (targets on an H200: "
        "≤ 60 s and ≤ 15 s).\n",
        "| batch | width | first step s | graphs so far |",
        "|---|---|---|---|",
    ]
    for row in walk["steps"]:
        out.append(f"| {row['batch']} | {row['width']} | {row['first_step_s']} | {row['graphs_so_far']} |")
    return out


def speed_table() -> str:
    """The README's speed lines: the host around the compiled step and compile once (this CPU), the GPU
    run's overlap rows when one has been measured."""
    step = load("step_overhead.json")
    lines = [
        "Speed of the engine's own decode step (`--compile`, the reference model on this 2-core CPU: "
        "dispatch-bound, so host work shows); [docs/results.md](docs/results.md) has the rest.\n",
        "| batch | LYNX scoring | step ms | compiled forward alone ms | host ms | step ÷ forward "
        "(target ≤ 1.25) |",
        "|---|---|---|---|---|---|",
    ]
    for row in step["rows"]:
        lines.append(
            f"| {row['batch']} | {'yes' if row['lynx'] else 'no'} | {row['step_ms']} | "
            f"{row['compiled_forward_ms']} | {row.get('host_ms', '—')} | {row['step_vs_forward']}× |"
        )
    once = RESULTS / "compile_once.json"
    if once.exists():
        data = json.loads(once.read_text())
        warm = data["warm_up"]
        lines.append(
            f"\nCompiled once: {data['walk']['graphs']} graphs for batches 1-64 × widths 64-8,192; warming "
            "every "
            f"batch size up to {warm['max_batch_size']} takes {warm['cold']['warm_up_s']} s cold, "
            f"{warm['cached']['warm_up_s']} s from torch's compile cache."
        )
    gpu = load("gpu_check.json")
    overlap = [r for r in gpu["rows"] if "tokens_per_s" in r.get("compiled_overlap", {})]
    if overlap:
        lines.append(
            f"\nOn {gpu['device']} ({gpu['model']}), compiled with overlap, tokens/s (share of the bandwidth "
            "roofline): "
            + "; ".join(
                f"batch {r['batch']}: {r['compiled_overlap']['tokens_per_s']} "
                f"({100 * r['compiled_overlap']['roofline_share']:.0f} %)"
                for r in overlap
                if r["prompt"] <= 1024
            )
            + "."
        )
    else:
        lines.append(
            f"\nOn a GPU: the last run ({gpu['device']}) predates overlap and compile-once; "
            "`python benchmarks/gpu_check.py` measures them."
        )
    return "\n".join(lines)


def speculative_table() -> list[str]:
    path = RESULTS / "speculative_reference.json"
    if not path.exists():
        return []
    spec = json.loads(path.read_text())
    out = [
        "\n### Speculative Thinking on the reference pair (`benchmarks/speculative_reference.py`, from "
        "`benchmarks/results/speculative_reference.json`)\n",
        f"{spec['problems']} test problems, the same seeds for every row; {spec['sampling']}; trigger a "
        "line break "
        f"(a step per line in these traces), look-ahead {spec['assist']['lookahead']}, takeover "
        f"{spec['assist']['takeover']}, verify extension {spec['assist']['verify_extension']}. Differences "
        "are paired by "
        "problem against the small model alone (95 % bootstrap interval). Target from the paper: above the "
        "small model "
        "alone with the assistant writing ≤ 25 % of the thinking.\n",
        "| method | accuracy | vs small alone | revised answers (right→wrong / wrong→right) | tokens | "
        "assistant share | takeovers | problems/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in spec["methods"].items():
        versus = row.get("vs_small_alone")
        cell = (
            f"{100 * versus['difference']:+.1f} [{100 * versus['ci95'][0]:+.1f}, "
            f"{100 * versus['ci95'][1]:+.1f}]"
            if versus
            else "–"
        )
        rev = row["revised_answers"]
        share = f"{100 * row['assistant_share']:.1f} %" if "assistant_share" in row else "–"
        out.append(
            f"| {name} | {100 * row['accuracy']:.1f} % | {cell} | {rev['right->wrong']} / "
            f"{rev['wrong->right']} | "
            f"{row['mean_tokens']} | {share} | {row.get('mean_takeovers', '–')} | {row['problems_per_s']} |"
        )
    thr = spec["throughput"]
    out.append(
        f"\nThroughput ({thr['problems']} problems): batch 16 {thr['batch_16']['problems_per_s']} "
        "problems/s against "
        f"the official schedule emulated at batch 1 {thr['batch_1_official_schedule']['problems_per_s']} "
        "problems/s: "
        f"**{thr['speedup_batch16_vs_official_batch1']}×**."
    )
    return out


def context_table() -> list[str]:
    ctx = load("context_scaling.json")
    rates = ", ".join(f"{m} {b}" for m, b in ctx["copy_bandwidth_gb_s"].items())
    out = [
        "\n### Decode step against context (`benchmarks/context_scaling.py`, from "
        "`benchmarks/results/context_scaling.json`)\n",
        f"{ctx['environment']['threads']} threads; each backend holds `batch` requests of `context` tokens "
        "(keys and values "
        "filled at random) and decodes; median step after a warm-up. Floor = (weight bytes + live KV bytes) "
        "÷ this "
        f"machine's copy bandwidth, measured right before each model's rows ({rates} GB/s; a step that only "
        "reads can "
        "beat it, hence ratios below 1; this VM's copy rate drifts between measurements: "
        f"{', '.join(map(str, ctx['copy_bandwidth_measured_gb_s']))} GB/s in this run, the last after all "
        "rows). Goal: the KV store ≤ 1.3× the floor at every context, the ratio flat from 128 to 4,096.\n",
        "| model | batch | context | floor ms | first backend ms (× floor) | KV store ms (× floor) | store "
        "speed-up "
        "| store `--compile` ms (× floor) | compiled ÷ eager store |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ctx["rows"]:
        compiled = (
            f"{r['store_compiled_step_ms']} (**{r['store_compiled_vs_floor']}×**) | {r['compiled_speedup']}×"
            if "store_compiled_step_ms" in r
            else "— | —"
        )
        out.append(
            f"| {r['model']} | {r['batch']} | {r['context']} | {r['floor_ms']} | {r['legacy_step_ms']} "
            f"({r['legacy_vs_floor']}×) | "
            f"{r['store_step_ms']} (**{r['store_vs_floor']}×**) | {r['store_speedup']}× | {compiled} |"
        )
    path = RESULTS / "compile_speed.json"
    if path.exists():
        comp = json.loads(path.read_text())
        out += [
            "\n`benchmarks/compile_speed.py` (`--compile` vs eager through the engine; greedy, fixed "
            "length, median of "
            "alternating runs after the compile warm-up). Goal on this CPU: the reference model ≥ 1.5× at "
            "batch 1 and 8 "
            "with identical tokens, SmolLM2 not slower.\n",
            "| model | batch | eager tokens/s | compiled tokens/s | compiled ÷ eager | identical tokens | "
            "compile warm-up s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in comp["rows"]:
            out.append(
                f"| {r['model']} | {r['batch']} | {r['eager_tokens_per_s']} | {r['compiled_tokens_per_s']} | "
                f"**{r['compiled_vs_eager']}×** | {r['identical_tokens']} | {r['compile_warmup_s']} |"
            )
    return out


def ray_table() -> list[str]:
    path = RESULTS / "ray_scaling.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = [
        "\n### Ray (`benchmarks/ray_scaling.py`, from `benchmarks/results/ray_scaling.json`)\n",
        f"The same `eval` ({data['rollouts']} rollouts: {', '.join(data['settings'])}; {data['model']}) in "
        "one process and "
        f"on a local Ray instance; {data['note']}. {data['environment']['cpus']} CPU cores.\n",
        "| run | torch threads per process | worker start-up s | eval s | rollouts/s | ÷ 1 worker |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        out.append(
            f"| {r['run']} | {r['threads']} | {r.get('startup_s', '—')} | {r['seconds']} | "
            f"{r['problems_per_s']} | "
            f"**{r['speedup_vs_1_worker']}×** |"
        )
    return out


def behaviour_table() -> list[str]:
    path = RESULTS / "reference_model.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    targets = data["targets"]["small"]
    out = [
        "### The reference pair beside real reasoners (`benchmarks/reference_model.py`, from "
        "`benchmarks/results/reference_model.json`)\n",
        f"{data['models'][0]['problems']} held-out problems, T={data['temperature']}, top-p {data['top_p']}, "
        f"{data['max_new_tokens']} new tokens. The last column gives the band the literature puts a 1.5B "
        "distilled "
        "reasoner in (FTM = arXiv 2510.08308, DEER = arXiv 2504.15895).\n",
    ]
    rows = [
        ("accuracy (full chain of thought)", "accuracy", "{:.1%}"),
        ("first stated answer, fraction of thinking tokens", "first_answer_position", "{:.2f}"),
        ("finished traces whose final answer differs from the first", "final_differs_from_first", "{:.1%}"),
        ("runaway (no end of thinking within the budget)", "runaway", "{:.1%}"),
        ("cue words before the first stated answer", "cues_before_first_answer", "{:.1%}"),
        (
            "accuracy of exiting at the first stated answer",
            "accuracy_of_exiting_at_first_stated_answer",
            "{:.1%}",
        ),
    ]
    out.append("| measure | " + " | ".join(m["model"] for m in data["models"]) + " | literature band |")
    out.append("|---|" + "---|" * (len(data["models"]) + 1))
    for label, key, fmt in rows:
        band = targets.get(key)
        cells = " | ".join("—" if m[key] is None else fmt.format(m[key]) for m in data["models"])
        out.append(
            f"| {label} | {cells} | "
            f"{'—' if band is None else f'{fmt.format(band[0])}–{fmt.format(band[1])}'} |"
        )
    extra = [
        (
            "mean thinking tokens (2 / 4 / 6 steps)",
            lambda m: " / ".join(
                str(round(m["thinking_tokens_by_steps"].get(k, 0))) for k in ("2", "4", "6")
            ),
        ),
        (
            "changed answers: wrong→right / wrong→other / right→wrong",
            lambda m: " / ".join(
                str(m["final_differs_by_direction"].get(k, 0))
                for k in ("wrong->right", "wrong->other wrong", "right->wrong")
            ),
        ),
        (
            "wrong first answers (finished): count / re-derived / re-derivation repeats it / reaches the "
            "right one",
            lambda m: " / ".join(
                str(m[k])
                for k in (
                    "finished_with_wrong_first_answer",
                    "of_which_rederived",
                    "rederivation_repeats_the_wrong_answer",
                    "rederivation_reaches_the_right_answer",
                )
            ),
        ),
        (
            "runaways with a candidate answer before the loop",
            lambda m: (
                "—"
                if m["runaway_with_candidate_before_loop"] is None
                else f"{m['runaway_with_candidate_before_loop']:.0%}"
            ),
        ),
    ]
    for label, cell in extra:
        out.append(f"| {label} | " + " | ".join(cell(m) for m in data["models"]) + " | — |")
    met = data.get("targets_met", {})
    if met:
        out.append(
            "\nTargets of the reference-pair issue: "
            + "; ".join(f"{name}: {'met' if ok else '**missed**'}" for name, ok in met.items())
            + "."
        )
    return out


def faults_table() -> list[str]:
    path = RESULTS / "serve_faults.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    setup, summary = data["setup"], data["summary"]
    out = [
        "\n### Hostile clients (`benchmarks/serve_faults.py`, from `benchmarks/results/serve_faults.json`)\n",
        f"`lynx-exit serve --model reference` on 127.0.0.1 (batch {setup['max_batch_size']}, queue "
        f"{setup['max_queue']}). "
        f"{setup['victims']} seeded victim streams (max_tokens {setup['victim_max_tokens']}) run round "
        "after round while "
        f"{setup['hostile_per_repeat']} hostile requests (huge `top_k`, malformed exit options, wrongly "
        "typed fields, "
        "tiny temperatures, template switches and 5,000-message chats, 800,000-prompt completions, fields "
        "named like type "
        f"tags, developer messages, mutated and random bodies) and {setup['big_bodies_per_repeat']} large "
        "bodies (10 MB with and "
        f"without `Content-Length`, 3.9 MB under the limit) arrive; {setup['repeats']} repeats. Victims are "
        "compared "
        "token for token with the same streams on a quiet server.\n",
        "| repeat | hostile requests | answers by status | 5xx | victim streams | failed | identical to "
        "quiet | "
        "`/health` p50 / p99 / max s during large bodies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(data["repeats"]):
        statuses = ", ".join(f"{k}: {v}" for k, v in r["hostile_by_status"].items())
        big = ", ".join(f"{k}: {v}" for k, v in r["big_bodies_by_status"].items())
        out.append(
            f"| {i + 1} | {r['hostile_requests']} | {statuses}; large bodies {big} | {r['responses_5xx']} | "
            f"{r['victim_streams']} | {r['victims_failed']} | {r['victims_identical_to_quiet']} | "
            f"{r['health_p50_s']} / {r['health_p99_s']} / {r['health_max_s']} "
            f"({r['health_samples_during_large_bodies']} samples) |"
        )
    met = ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in data["targets"].items())
    out.append(
        f"\nServer RSS {summary['rss_before_mb']} MB before the hostile runs, {summary['rss_after_mb']} MB "
        "after "
        f"({summary['rss_growth_mb']:+} MB); `/health` afterwards: {summary['health_after']['status']} with "
        f"{summary['health_after']['in_flight']} in flight. Targets: {met}."
    )
    return out


def serve_table() -> list[str]:
    path = RESULTS / "serve_load.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = [
        "\n### Serving (`benchmarks/serve_load.py`, from `benchmarks/results/serve_load.json`)\n",
        f"{data['requests']} streamed chat requests per row from `AsyncOpenAI` to `lynx-exit serve --model "
        "reference` on "
        f"127.0.0.1 (T={data['temperature']}, max_tokens {data['max_new_tokens']}; the load generator runs "
        "on the same "
        f"{data['cpus']} cores), against the same prompts, seeds and exit settings through the engine in "
        "one process. "
        f"Served rollouts have the same token counts as offline ones: "
        f"{'yes, every row' if all(r['same_tokens_as_offline'] for r in data['served']) else 'NO'}. "
        f"Targets: {data['targets']}.\n",
        "| method | clients | completed | 503 | lost | latency p50 / p95 / p99 s | TTFT p50 / p95 / p99 s "
        "| tokens/s | "
        f"÷ offline, {data['offline_torch_threads']} threads | ÷ offline, {data['server_torch_threads']} "
        "thread(s) as served |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def triple(r: dict, key: str) -> str:
        return " / ".join(f"{r[f'{key}_p{q}_s']:.2f}" for q in (50, 95, 99))

    for r in data["served"]:
        ratios = [
            f"**{r[k]}×**" if k in r else "—" for k in ("served_vs_offline", "served_vs_offline_same_threads")
        ]
        out.append(
            f"| {r['method']} | {r['concurrency']} | {r['completed']} | {r['failed']} | {r['lost']} | "
            f"{triple(r, 'latency')} | {triple(r, 'ttft')} | {r['completion_tokens_per_s']} | {ratios[0]} | "
            f"{ratios[1]} |"
        )
    offline = ", ".join(
        f"{r['method']} batch {r['batch']} × {r['torch_threads']} thread(s): {r['completion_tokens_per_s']}"
        for r in data["offline"]
    )
    out.append(f"\nOffline engine tokens/s: {offline}.")
    fault = data["fault"]
    cut, burst = fault["disconnect_pass"], fault["burst_pass"]
    out.append(
        f"Fault pass: with a fifth of the streams cut mid-way, {cut['completed']} completed, "
        f"{cut['disconnected']} "
        f"disconnected, {cut['lost']} lost; a burst of {fault['burst_size']} requests at once into a "
        "capacity of "
        f"{fault['capacity']}: {burst['completed']} completed, {burst['failed']} got a clean 503, "
        f"{burst['lost']} lost; "
        f"`/health` afterwards: {fault['health_after']['status']} with {fault['health_after']['in_flight']} "
        "in flight. "
        f"Lost in all passes: **{data['lost_total']}**."
    )
    return out


def gpu_table() -> list[str]:
    """The last run of `benchmarks/gpu_check.py`: its tests and its speed rows (skipped ones named)."""
    data = load("gpu_check.json")
    tests = data["tests"]
    out = [
        "\n### On a GPU (`benchmarks/gpu_check.py`, from `benchmarks/results/gpu_check.json`)\n",
        f"{data['device']}, torch {data['torch']}, transformers {data['transformers']}, {data['model']} "
        "(random bf16 "
        f"weights), copy bandwidth {data['copy_bandwidth_gb_s']} GB/s. `pytest -m gpu`: "
        f"{tests.get('summary', tests.get('status'))}. "
        "tokens/s at the median decode step, its share of the bandwidth roofline in brackets; stalls are "
        "the seconds "
        "of steps over 3× the median (compiles, graph captures).\n",
        "| batch | prompt + new | eager | compiled | compiled + LYNX | `generate`, static cache | stalls: "
        "compiled / + LYNX |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(side: dict) -> str:
        if "skipped" in side:
            return "skipped (time)"
        if "error" in side:
            return "error"
        if "tokens_per_s" not in side:
            return "cut short"
        return f"{side['tokens_per_s']} ({100 * side['roofline_share']:.1f} %)" + (
            "" if side.get("complete", True) else ", cut short"
        )

    if any("compiled_overlap" in r for r in data["rows"]):
        out[2] = out[2].replace(
            "| compiled | compiled + LYNX |", "| compiled | compiled + overlap | overlap + LYNX |"
        )
        out[3] += "---|"
    for r in data["rows"]:
        stalls = " / ".join(
            f"{r[k]['stall_s']} s" if "stall_s" in r[k] else "—" for k in ("compiled", "compiled_lynx")
        )
        overlap = f"{cell(r['compiled_overlap'])} | " if "compiled_overlap" in r else ""
        out.append(
            f"| {r['batch']} | {r['prompt']} + {r['new_tokens']} | {cell(r['eager'])} | "
            f"{cell(r['compiled'])} | {overlap}"
            f"{cell(r['compiled_lynx'])} | {cell(r['generate_static'])} | {stalls} |"
        )
    warm = data.get("warm_up", {})
    if "cold" in warm and "cached" in warm:
        out.append(
            f"\nCompile once: {data.get('graphs_compiled')} graphs over the whole check; warm-up of every "
            "batch "
            f"size up to {warm['max_batch_size']}: {warm['cold'].get('warm_up_s')} s cold, "
            f"{warm['cached'].get('warm_up_s')} s cached."
        )
    return out


if __name__ == "__main__":
    main()
