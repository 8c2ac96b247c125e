"""`hf-earlyexit sweep`: lm-eval tasks across an ε grid, with the paper's three pictures.

One model load. Log-likelihood requests of every ε are scored from one forward pass (`--one_pass`, the default: ε
only decides which positions take a head's distribution, see `scoring.ScoringSweep`); generation requests decode
at each ε. Each ε point is evaluated, written to `points/eps_<ε>.json` atomically, and skipped when the sweep
is run again (resumable). At the end: `sweep.csv`, `sweep.json`, `score_vs_eps.png` (paper Fig. 2),
`speedup_vs_eps.png` (Fig. 3: cost-model speed-up from the multiply-adds saved on scored positions, and measured
tokens/s of generation tasks relative to ε = 1 when it is in the grid), `exits_vs_eps.png` (Fig. 4).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..files import write_json
from ..modeling.metrics_earlyexit import DEFAULT_SCORING_DELTA
from ..modeling.options_earlyexit import check_eps
from .lm_eval_plugin import register
from .scoring import SCORING_RULES

DEFAULT_GRID = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]


@dataclass
class SweepArgs:
    """Run lm-eval tasks with early exits at every ε of a grid."""

    tasks: list[str] = field(metadata={"help": "lm-eval task names"})
    model: str = field(default="embedded", metadata={"help": "heads folder or Hub repo (calibrated)"})
    eps: list[float] = field(default_factory=lambda: list(DEFAULT_GRID), metadata={"help": "ε grid"})
    mode: str = field(default="early_exit", metadata={"help": "early_exit or dssd",
                                                      "choices": ["early_exit", "dssd"]})
    scoring_rule: str = field(default="top_token", metadata={
        "help": "which confident scored positions leave: top_token (only where the head's top token is the scored "
                "token) or confidence (every one, the paper's way)", "choices": list(SCORING_RULES)})
    scoring_delta: float = field(default=DEFAULT_SCORING_DELTA, metadata={
        "help": "top_token: a scored position reads its head only where the head's log-probability error is within "
                "this many nats at rate >= ε on the calibration tokens (scoring gates; inf: none)"})
    dtype: str = field(default="float32", metadata={"help": "base model dtype"})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})
    limit: float | None = field(default=None, metadata={"help": "lm-eval --limit (documents per task)"})
    include_path: str | None = field(default=None, metadata={
        "help": "extra task folder (default: ./lm_eval_tasks when it exists)"})
    device: str = field(default="cpu", metadata={"help": "device"})
    one_pass: bool = field(default=True, metadata={
        "help": "score log-likelihood requests of every ε from one forward pass (generation still decodes per ε); "
                "--no_one_pass runs a full evaluation per ε"})
    output_dir: str = field(default="sweep", metadata={"help": "where points, CSV/JSON and plots go"})

    def __post_init__(self) -> None:
        self.eps = [check_eps(e) for e in self.eps]
        if not self.tasks:
            raise ValueError("give at least one task: --tasks ee_capitals")


def _point_path(out: Path, eps: float) -> Path:
    return out / "points" / f"eps_{eps:g}.json"


def _finished(out: Path, eps: float, scoring_rule: str, scoring_delta: float | None) -> bool:
    """A point an earlier run wrote with the same scoring rule and scoring gates (`scoring_delta` in effect)."""
    path = _point_path(out, eps)
    if not path.exists():
        return False
    report = json.loads(path.read_text())["early_exit"]
    return (report.get("scoring_rule", "confidence") == scoring_rule
            and report.get("scoring_delta") == scoring_delta)


def run_sweep(args: SweepArgs) -> dict:
    # lm-eval (seconds to import) is loaded only when a sweep runs, not with the command line
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_model import EarlyExitLM

    register()
    out = Path(args.output_dir)
    include = args.include_path or ("lm_eval_tasks" if Path("lm_eval_tasks").is_dir() else None)
    manager = TaskManager(include_path=include) if include else TaskManager()
    lm = EarlyExitLM(pretrained=args.model, eps=args.eps[0], mode=args.mode, scoring_rule=args.scoring_rule,
                     scoring_delta=args.scoring_delta, dtype=args.dtype, batch_size=args.batch_size,
                     device=args.device)
    delta = lm.early_exit_report()["scoring_delta"]  # the gates in effect for these heads
    todo = [e for e in args.eps if not _finished(out, e, args.scoring_rule, delta)]
    for eps in tqdm(args.eps, desc="ε sweep", unit="point"):
        if eps not in todo:
            continue  # finished in an earlier run
        if not args.one_pass:
            lm.set_eps(eps)
        elif eps == todo[0]:  # this point's evaluation records the scored answers of every point still to do
            lm.set_eps(eps)
            lm.start_scoring_sweep(todo)
        else:
            lm.replay_scoring(eps)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(args.tasks), limit=args.limit, task_manager=manager)
        metrics = {task: {k: v for k, v in values.items() if "," in k and "stderr" not in k}
                   for task, values in results["results"].items()}
        write_json(_point_path(out, eps), {"eps": eps, "metrics": metrics, "early_exit": lm.early_exit_report()})
    points = [json.loads(_point_path(out, e).read_text()) for e in sorted(args.eps)]
    rows = _rows(points)
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(points, indent=2, default=str))
    plot_sweep(points, out)
    return {"points": points, "rows": rows}


def _rows(points: list[dict]) -> list[dict]:
    """One CSV row per (ε, task, metric), with the exit summary of that task."""
    rows = []
    base_speed = {}
    for point in points:
        if point["eps"] == 1.0:
            for task, kinds in point["early_exit"]["tasks"].items():
                base_speed[task] = (kinds.get("generation") or {}).get("tokens_per_s")
    for point in points:
        for task, metrics in point["metrics"].items():
            kinds = point["early_exit"]["tasks"].get(task, {})
            entry = kinds.get("scoring") or kinds.get("generation") or {}
            macs_saved = entry.get("macs_saved")
            speed = (kinds.get("generation") or {}).get("tokens_per_s")
            for metric, value in metrics.items():
                rows.append({
                    "eps": point["eps"], "task": task, "metric": metric, "value": value,
                    "cost_speedup": (1 / (1 - macs_saved)) if macs_saved is not None and macs_saved < 1 else None,
                    "measured_speedup": (speed / base_speed[task]) if speed and base_speed.get(task) else None,
                    "exit_fractions": json.dumps(entry.get("exit_fractions", {})),
                })
    return rows


def plot_sweep(points: list[dict], out: Path) -> None:
    eps = [p["eps"] for p in points]
    tasks = sorted({t for p in points for t in p["metrics"]})
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for task in tasks:
        for metric in sorted({m for p in points for m in p["metrics"].get(task, {})}):
            ax.plot(eps, [p["metrics"].get(task, {}).get(metric) for p in points], "o-", label=f"{task} {metric}")
    ax.set(xlabel="ε", ylabel="score", title="score vs ε")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_vs_eps.png", dpi=110)

    rows = _rows(points)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for task in tasks:
        mine = {r["eps"]: r for r in rows if r["task"] == task}
        xs = sorted(mine)
        if any(mine[x]["cost_speedup"] for x in xs):
            ax.plot(xs, [mine[x]["cost_speedup"] for x in xs], "o-", label=f"{task} (cost model)")
        if any(mine[x]["measured_speedup"] for x in xs):
            ax.plot(xs, [mine[x]["measured_speedup"] for x in xs], "s--", label=f"{task} (measured tok/s)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="ε", ylabel="speed-up vs full model", title="speed-up vs ε")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_eps.png", dpi=110)

    fig = Figure(figsize=(5 * len(tasks), 4))

    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        fractions = []
        for p in points:
            kinds = p["early_exit"]["tasks"].get(task, {})
            entry = kinds.get("scoring") or kinds.get("generation") or {}
            fractions.append(entry.get("exit_fractions", {}))
        names = list(fractions[0]) if fractions and fractions[0] else []
        bottom = [0.0] * len(points)
        for name in names:
            values = [f.get(name, 0.0) for f in fractions]
            ax.bar([f"{e:g}" for e in eps], values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set(xlabel="ε", ylabel="fraction of scored tokens", title=f"{task}: where tokens leave")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "exits_vs_eps.png", dpi=110)
