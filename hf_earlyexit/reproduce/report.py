"""`docs/RESULTS.md` of `hf-earlyexit reproduce`, written from the steps' JSON files alone: per section the claim,
its figure, a numbers table, the commands, and a verdict per claim (rules in `verdicts.py`)."""

from __future__ import annotations

import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..formatting import num
from .verdicts import VERDICTS, Verdict, calibration_points, dssd_summary, final_stats, metric_means

RESULTS = "RESULTS.md"
FIGURES = "results"  # figures go to <docs_dir>/results/
SECTIONS = (  # (step, title, what it measures)
    ("training_dynamics", "Training dynamics (paper Fig. 1)",
     "Four short trainings of paper-style heads (norm + linear) on one corpus the model wrote itself: from scratch or "
     "copied from the LM head, with λ = 0.1 or 0.95. Per head, top-1 agreement with the full model and mean entropy "
     "on held-out sequences at every logged step, then the breaking-ties AUROC on those sequences."),
    ("confidence_metrics", "Confidence metrics (paper §3.3.1, DSSD revision, inference framework)",
     "Every confidence metric on the same calibration-style tokens of the heads of sections 2-6: AUROC of agreeing vs "
     "disagreeing tokens per head, and the fraction of tokens one threshold lets exit at agreement ≥ 0.9."),
    ("calibration", "Calibration honesty (paper §3.3.1)",
     "The held-out half of the calibration text (never used to set thresholds): agreement of the tokens that exit "
     "under the whole rule, and per head, against ε. On the diagonal, calibration delivers what ε promises."),
    ("lm_eval", "Accuracy, speed-up and exits vs ε through lm-eval (paper Figs. 2-4)",
     "`lm_eval --model ee-hf` at every ε (`hf-earlyexit sweep`) on lm-eval's built-in benchmark tasks read from local "
     "files (`--data_dir`), else on the project's offline smoke tasks: task score, speed-up of the cost model "
     "(multiply-adds saved on scored positions; measured tokens/s for generation tasks), and where tokens leave. For "
     "scored (log-likelihood) positions the savings are what token-by-token decoding would save there: the scoring "
     "pass itself runs the full model."),
    ("dssd", "Dynamic self-speculative decoding (DSSD revision)",
     "Wall-clock greedy decoding (EOS off) on varied and repetitive prompts: DSSD at an ε grid against the "
     "LayerSkip-style baseline (every exit × fixed draft lengths; the fastest is the tuned baseline), plain greedy, HF "
     "prompt lookup and HF assistant early exit. Acceptance = accepted ÷ drafted tokens."),
    ("batching", "Batched early exit (inference framework)",
     "Early-exit decoding at several batch sizes, against HF's batched greedy and the same loop without exits (ε = 1, "
     "the framework's full-layer baseline)."),
)


def render(out: Path, docs: Path, args) -> Path:
    """Write `<docs>/RESULTS.md` and `<docs>/results/*.png` from the step results under `out`."""
    results = {step: _load(out / step / "result.json") for step in ["heads", *(s for s, _, _ in SECTIONS)]}
    figures = docs / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    facts = _facts(results, args)
    verdicts = {step: VERDICTS[step](results[step], facts) for step, _, _ in SECTIONS if results[step]}
    lines = _header(results, facts, args) + _summary(verdicts)
    for number, (step, title, measures) in enumerate(SECTIONS, start=1):
        lines += [f"## {number}. {title}", "", measures, ""]
        if not results[step]:
            lines += ["Not measured yet: run the command above.", ""]
            continue
        for name in FIGURE_WRITERS[step](results[step], figures, number):
            lines += [f"![{title}]({FIGURES}/{name})", ""]
        lines += TABLES[step](results[step]) + [""] + _commands(results[step]) + _verdict_lines(verdicts[step])
    path = docs / RESULTS
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _facts(results: dict, args) -> dict:
    """What the reasons may cite: the model and heads, their agreement, the timing setup, the sizes."""
    facts = dict(results["heads"] or {})
    metrics = results["confidence_metrics"]
    if metrics:
        first = metrics["metrics"][0]
        facts["agreement"] = {r["exit"]: r["agreement"] for r in metrics["rows"] if r["metric"] == first}
    facts["quick"] = args.quick
    facts["threads"] = torch.get_num_threads()
    facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX2 vs AVX512 decides bf16 vs fp32 speed
    return facts


def _header(results: dict, facts: dict, args) -> list[str]:
    heads = results["heads"] or {}
    training = heads.get("training") or {}
    trained = (f"trained here ({training.get('steps')} steps, λ = {training.get('lam')}) and calibrated"
               if heads.get("trained_here") else "given with `--heads`")
    return [
        "# Does it reproduce?", "",
        "<!-- written by `hf-earlyexit reproduce`; edits are overwritten on the next run -->", "",
        f"Produced by `{args.command()}` ({'quick smoke-test sizes' if args.quick else 'full sizes'}) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, torch {torch.__version__}, {facts['threads']} CPU threads "
        f"({platform.machine()}, torch CPU capability {facts['cpu_capability']}). "
        f"Step results and raw outputs: `{args.output_dir}/`.", "",
        f"Model: `{heads.get('base_model')}` ({heads.get('model_type')}, {heads.get('num_layers')} layers, hidden "
        f"{heads.get('hidden_size')}, vocabulary {heads.get('vocab_size', 0):,}). Heads of sections 2-6: "
        f"`{heads.get('path')}`, {heads.get('head_type')} heads at exits {heads.get('exit_layers')}, draft vocabulary "
        f"{heads.get('draft_vocab_size') or 'full'}, metric {heads.get('metric')}; {trained}.", "",
        "Verdicts: **confirmed** (the numbers meet the claim), **differs** (same direction, smaller effect, or not "
        "measurable here; the likely reason follows), **refuted** (the numbers go against it). Each rule is in "
        "`hf_earlyexit/reproduce/verdicts.py`.", "",
    ]


def _summary(verdicts: dict[str, list[Verdict]]) -> list[str]:
    lines = ["| # | claim | source | verdict |", "|---|---|---|---|"]
    for items in verdicts.values():
        lines += [f"| {v.key} | {v.claim} | {v.source} | **{v.verdict}** |" for v in items]
    return lines + [""]


def _commands(result: dict) -> list[str]:
    lines = ["Produced by:", "", "```bash", result["reproduce_command"] + f"   # step {result['step']}, "
             f"{result['seconds']:.0f} s", "```"]
    if result.get("commands"):
        lines += ["", "The same measurement by hand:", "", "```bash", *result["commands"], "```"]
    return lines + [""]


def _verdict_lines(verdicts: list[Verdict]) -> list[str]:
    lines = []
    for v in verdicts:
        lines.append(f"- **Verdict {v.key}: {v.verdict}.** {v.claim} ({v.source}) Numbers: {v.evidence}."
                     + (f" Likely reason: {v.reason}." if v.reason else ""))
    return lines + [""]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# -- figures -------------------------------------------------------------------------------------------------------


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    return name


def figure_training(result: dict, folder: Path, number: int) -> list[str]:
    exits = result["exit_layers"]
    fig = Figure(figsize=(3.2 * len(exits), 6))
    axes = fig.subplots(2, len(exits), squeeze=False)
    for run in result["runs"]:
        key = "held_out_agreement" if "held_out_agreement" in run["history"][0] else "agreement"
        for j, layer in enumerate(exits):
            rows = [r for r in run["history"] if r["exit"] == layer]
            steps = [r["step"] for r in rows]
            axes[0][j].plot(steps, [r[key] for r in rows], marker=".", label=run["name"])
            axes[1][j].plot(steps, [r[key.replace("agreement", "entropy")] for r in rows], marker=".")
            axes[0][j].set_title(f"exit@{layer}: agreement (held out)", fontsize=9)
            axes[1][j].set_title(f"exit@{layer}: entropy (nats)", fontsize=9)
            axes[1][j].set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    return [_save(fig, folder, f"fig{number}_training_dynamics.png")]


def figure_metrics(result: dict, folder: Path, number: int) -> list[str]:
    exits, metrics = result["exit_layers"], result["metrics"]
    fig = Figure(figsize=(3.4 * (len(exits) + 1), 3.6))
    axes = fig.subplots(1, len(exits) + 1, squeeze=False)
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        rows = [r for r in result["rows"] if r["metric"] == metric]
        axes[0][0].bar([k + (i - len(metrics) / 2 + 0.5) * width for k in range(len(rows))],
                       [r["auroc"] or 0 for r in rows], width, label=metric)
        for j, row in enumerate(rows):
            axes[0][j + 1].plot(row["roc"]["fpr"], row["roc"]["tpr"], label=metric)
    axes[0][0].set_xticks(range(len(exits)), [f"exit@{k}" for k in exits])
    axes[0][0].axhline(0.5, color="grey", lw=0.8)
    axes[0][0].set(title="AUROC (agreeing vs not)", ylim=(0, 1))
    axes[0][0].legend(fontsize=7)
    for j, layer in enumerate(exits):
        axes[0][j + 1].plot([0, 1], [0, 1], color="grey", lw=0.8)
        axes[0][j + 1].set(title=f"exit@{layer}: ROC", xlabel="false positive rate", ylabel="true positive rate")
    return [_save(fig, folder, f"fig{number}_confidence_metrics.png")]


def figure_calibration(result: dict, folder: Path, number: int) -> list[str]:
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for layer in sorted({r["exit"] for r in result["check"]}):
        rows = sorted((r for r in result["check"] if r["exit"] == layer and r["eps"] < 1), key=lambda r: r["eps"])
        axes[0].plot([r["eps"] for r in rows], [r["agreement"] for r in rows], "o-", alpha=0.6, label=f"exit@{layer}")
        axes[1].plot([r["eps"] for r in rows], [r["coverage"] for r in rows], "o-", alpha=0.6, label=f"exit@{layer}")
    points = calibration_points(result)
    axes[0].plot([p["eps"] for p in points], [p["agreement_exited"] for p in points], "ks-", label="whole rule")
    axes[1].plot([p["eps"] for p in points], [p["exited"] for p in points], "ks-", label="whole rule")
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, label="agreement = ε")
    axes[0].set(title="held-out agreement of exited tokens", xlabel="ε", ylabel="agreement", xlim=(0.45, 1.0),
                ylim=(0, 1.02))
    axes[1].set(title="held-out tokens that exit", xlabel="ε", ylabel="fraction")
    axes[0].legend(fontsize=7)
    return [_save(fig, folder, f"fig{number}_calibration.png")]


def figure_lm_eval(result: dict, folder: Path, number: int) -> list[str]:
    """The sweep's three plots (and its CSV beside them, for readers who want the numbers)."""
    csv = Path(next(iter(result["figures"].values()))).with_name("sweep.csv")
    if csv.exists():
        shutil.copyfile(csv, folder / f"fig{number}_sweep.csv")
    names = []
    for i, (key, path) in enumerate(result["figures"].items()):
        name = f"fig{number}{'abc'[i]}_{key}.png"
        shutil.copyfile(path, folder / name)
        names.append(name)
    return names


def figure_dssd(result: dict, folder: Path, number: int) -> list[str]:
    sets = list(result["sets"].items())
    fig = Figure(figsize=(6.5 * len(sets), 4))
    axes = fig.subplots(1, len(sets), squeeze=False)
    for ax, (name, rows) in zip(axes[0], sets, strict=True):
        picked = [r for r in rows if r["family"] == "dssd" and r["eps"] < 1]
        best = dssd_summary(rows)["layerskip"]
        if best:
            picked.append(best)
        labels = [r["label"] for r in picked]
        xs = range(len(picked))
        ax.bar([x - 0.2 for x in xs], [r.get("acceptance_rate") or 0 for r in picked], 0.4, label="acceptance")
        ax.bar([x + 0.2 for x in xs], [r["speedup"] for r in picked], 0.4, label="speed-up vs plain greedy")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=7)
        ax.set_title(f"{name} prompts ({result['dtype']})")
        ax.legend(fontsize=7)
    return [_save(fig, folder, f"fig{number}_dssd.png")]


def figure_batching(result: dict, folder: Path, number: int) -> list[str]:
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for size, rows in sorted(result["batches"].items(), key=lambda kv: int(kv[0])):
        runs = sorted((r for r in rows if r["family"] == "early_exit"), key=lambda r: r["eps"])
        axes[0].plot([r["eps"] for r in runs], [r["speedup_vs_eps1"] for r in runs], "o-", label=f"batch {size}")
        axes[1].plot([r["eps"] for r in runs], [r["speedup"] for r in runs], "o-", label=f"batch {size}")
    for ax, title in zip(axes, ("vs the same loop without exits (ε = 1)", "vs HF greedy at the same batch"),
                         strict=True):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"tokens/s {title}", xlabel="ε", ylabel="speed-up")
        ax.legend(fontsize=7)
    return [_save(fig, folder, f"fig{number}_batching.png")]


FIGURE_WRITERS = {"training_dynamics": figure_training, "confidence_metrics": figure_metrics,
                  "calibration": figure_calibration, "lm_eval": figure_lm_eval, "dssd": figure_dssd,
                  "batching": figure_batching}


# -- numbers tables ------------------------------------------------------------------------------------------------


def table_training(result: dict) -> list[str]:
    rows = []
    for run in result["runs"]:
        s = final_stats(run)
        rows.append([run["name"], s["step"], num(s["agreement"]), num(s["entropy"]), num(s["auroc"])])
    data = result["data"]
    return [f"Held out: {data['held_out_sequences']} sequences ({data['held_out_tokens']} tokens); trained on "
            f"{data['sequences']} sequences ({data['tokens']} tokens). Means over exits at the last step:", "",
            *_table(["run", "step", "agreement", "entropy (nats)", "breaking-ties AUROC"], rows)]


def table_metrics(result: dict) -> list[str]:
    exits = result["exit_layers"]
    rows = []
    for metric, means in metric_means(result).items():
        cells = {r["exit"]: r for r in result["rows"] if r["metric"] == metric}
        rows.append([metric, *(f"{num(cells[k]['auroc'])} / {num(cells[k]['coverage'], '.2f')}" for k in exits),
                     num(means["auroc"]), num(means["coverage"], ".2f")])
    agreement = {r["exit"]: r["agreement"] for r in result["rows"]}
    tokens = result["rows"][0]["tokens"] if result["rows"] else 0
    return [f"{result['sequences']} sequences, {tokens} tokens per head; head agreement with the full model: "
            + ", ".join(f"exit@{k} {num(v, '.2f')}" for k, v in agreement.items()) + f". Cells: AUROC / coverage at "
            f"agreement ≥ {result['target']}.", "",
            *_table(["metric", *(f"exit@{k}" for k in exits), "mean AUROC", "mean coverage"], rows)]


def table_calibration(result: dict) -> list[str]:
    rows = [[f"{p['eps']:g}", num(p["exited"]), p["n"], num(p["agreement_exited"]), num(p["agreement_all"])]
            for p in calibration_points(result)]
    return [f"Metric {result['metric']}; thresholds set on {result['fit_tokens']} tokens, checked on "
            f"{result['check_tokens']} held-out tokens.", "",
            *_table(["ε", "tokens that exit", "exited tokens", "agreement of exited", "agreement of all"], rows)]


def table_lm_eval(result: dict) -> list[str]:
    rows = [[f"{r['eps']:g}", r["task"], r["metric"], num(r["value"]), num(r["cost_speedup"], ".2f"),
             num(r["measured_speedup"], ".2f"),
             " ".join(f"{k}:{v:.2f}" for k, v in json.loads(r["exit_fractions"] or "{}").items())]
            for r in result["rows"]]
    head = []
    if result.get("scoring_rule"):
        head = [f"Scoring rule: `{result['scoring_rule']}`; documents per task: "
                + ", ".join(f"{t} {n}" for t, n in result.get("task_sizes", {}).items()) + ".", ""]
    return head + _table(["ε", "task", "metric", "score", "speed-up (cost)", "speed-up (tok/s)", "exits"], rows)


def table_dssd(result: dict) -> list[str]:
    rows = []
    for name, part in result["sets"].items():
        for r in part:
            if r["family"] in ("plain", "dssd", "layerskip", "prompt_lookup", "hf_early_exit"):
                identical = (f"{r['identical_sequences']}/{len(r['first_divergence'])}"
                             if "first_divergence" in r else "–")
                rows.append([name, r["label"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}",
                             num(r.get("acceptance_rate"), ".2f"), num(r.get("mean_accepted"), ".2f"), identical])
    return [f"{result['dtype']}, {result['prompts']} prompts per set × {result['max_new_tokens']} new tokens, "
            f"{result['threads']} threads.", "",
            *_table(["set", "run", "tok/s", "vs plain", "acceptance", "accepted per round", "identical"], rows)]


def table_batching(result: dict) -> list[str]:
    rows = []
    for size, part in sorted(result["batches"].items(), key=lambda kv: int(kv[0])):
        for r in part:
            exits = " / ".join(f"{f:.2f}" for f in r.get("exit_fractions", [])) or "–"
            rows.append([size, r["label"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}",
                         num(r.get("speedup_vs_eps1"), ".2f"), num(r.get("agreement", 1.0)),
                         num(r.get("layers_fraction"), ".2f"), exits])
    return [f"{result['dtype']}, {result['prompts']} prompts × {result['max_new_tokens']} new tokens.", "",
            *_table(["batch", "run", "tok/s", "vs HF greedy", "vs ε=1", "token agreement", "layer work", "exits"],
                    rows)]


TABLES = {"training_dynamics": table_training, "confidence_metrics": table_metrics, "calibration": table_calibration,
          "lm_eval": table_lm_eval, "dssd": table_dssd, "batching": table_batching}
