"""`hf-earlyexit reproduce`: re-measure the claims of the papers on one model and write `docs/RESULTS.md`.

A ladder of named steps, each writing `<output_dir>/<step>/result.json` and skipped when that file exists and was
made with the same settings (resumable; a step whose settings changed starts again from an empty folder):

    training_dynamics (Fig. 1) -> heads (train + calibrate, unless --heads) -> confidence_metrics (§3.3.1)
    -> calibration (held-out agreement vs ε) -> lm_eval (Figs. 2-4) -> dssd (vs LayerSkip-style) -> batching

The steps only orchestrate the project's own machinery (`train_heads`, `run_train`, `run_calibrate`,
`collect_metrics`, `run_sweep`, `run_bench`). `report.render` then writes the Markdown, its figures and a
verdict per claim from the JSON files alone. `--quick` shrinks every size (same code path) to a smoke test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm

from ..files import finite, write_json
from ..loading import resolve
from ..modeling.base_earlyexit import EMBEDDED
from ..training.pipeline import TrainJob
from . import steps as s
from .report import render

logger = logging.getLogger(__name__)

RESULT = "result.json"
SETTINGS = "settings.json"


@dataclass
class ReproduceArgs:
    """Re-measure the papers' claims (training dynamics, confidence metrics, calibration, lm-eval ε sweep, DSSD,
    batching) and write a results report with a figure and a verdict for each."""

    model: str = field(default=EMBEDDED, metadata={"help": "base model (Hub id, local path, 'embedded')"})
    heads: str | None = field(default=None, metadata={
        "help": "trained + calibrated heads folder for sections 2-6 (default: train and calibrate them here)"})
    output_dir: str = field(default="reproduce-runs", metadata={"help": "step results, checkpoints, raw outputs"})
    docs_dir: str = field(default="docs", metadata={"help": "where RESULTS.md and its figures go"})
    quick: bool = field(default=False, metadata={"help": "smoke-test sizes (minutes, not hours; same code path)"})
    dtype: str = field(default="float32", metadata={"help": "dtype of training, calibration and lm-eval",
                                                    "choices": ["float32", "bfloat16"]})
    bench_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the timed runs (sections 5-6)",
                                                           "choices": ["float32", "bfloat16"]})
    exit_layers: list[int] | None = field(default=None, metadata={"help": "heads trained here: exit layers"})
    draft_vocab_size: int = field(default=TrainJob.draft_vocab_size, metadata={
        "help": "heads trained here: the N most frequent tokens of the data (0: full vocabulary)"})
    adapter_rank: int = field(default=TrainJob.adapter_rank, metadata={
        "help": "heads trained here for sections 2-6 (shared heads): adapter rank"})
    lam: float = field(default=0.1, metadata={"help": "λ of the heads trained here for sections 2-6"})
    tasks_dir: str | None = field(default=None, metadata={
        "help": "folder of the lm-eval tasks (default: the project's lm_eval_tasks)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "local copies of ARC, HellaSwag, WinoGrande, MMLU, PIQA in their official formats (as in "
                "`hf-earlyexit tasks`): section 4 runs lm-eval's own tasks on them instead of the offline smoke tasks"})
    steps: list[str] | None = field(default=None, metadata={
        "help": "run only these steps (the heads step always; the others keep the results of earlier runs or show "
                "as not measured), e.g. to re-run the timed steps on a quiet machine (default: every step)"})

    def __post_init__(self) -> None:
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be >= 0 (0: full vocabulary)")
        names = [step.name for step in _steps()]
        unknown = [name for name in self.steps or [] if name not in names]
        if unknown:
            raise ValueError(f"steps={unknown} are not steps of reproduce; expected some of {names}")

    def command(self) -> str:
        """The `hf-earlyexit reproduce` command line that gives these arguments."""
        words = ["hf-earlyexit", "reproduce"]
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default
            if value == default:
                continue
            if isinstance(value, bool):
                words.append(f"--{f.name}" if value else f"--{f.name} false")
            elif isinstance(value, list):
                words.append(f"--{f.name} " + " ".join(map(str, value)))
            else:
                words.append(f"--{f.name} {value}")
        return " ".join(words)


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run measures (the only difference between --quick and a full run)."""

    sequences: int  # generated training sequences (shared by the four Fig. 1 runs and the heads trained here)
    new_tokens: int  # tokens per generated sequence
    held_out_fraction: float  # Fig. 1: sequences kept out of training to measure agreement and entropy
    train_steps: int
    batch_size: int
    log_every: int  # Fig. 1: a point on the curves every this many steps
    calibration_sequences: int
    calibration_tokens: int
    min_calibration_tokens: int
    sweep_tasks: tuple[str, ...]
    sweep_eps: tuple[float, ...]  # ε = 1 (the full model) is always added
    sweep_limit: int | None  # documents per task
    real_tasks: tuple[str, ...]  # section 4 with --data_dir: lm-eval's built-in tasks on the local files
    real_limit: int | None  # documents per real task
    dssd_eps: tuple[float, ...]
    layerskip_drafts: tuple[int, ...]
    dssd_prompts: int  # per prompt set (varied, repetitive)
    dssd_tokens: int
    batch_sizes: tuple[int, ...]
    batch_eps: tuple[float, ...]
    batch_prompts: int
    batch_tokens: int


QUICK = Sizes(  # under 20 minutes on 2 CPU cores with the embedded model (README, "Does it reproduce?")
    sequences=16, new_tokens=48, held_out_fraction=0.25, train_steps=12, batch_size=2, log_every=3,
    calibration_sequences=16, calibration_tokens=48, min_calibration_tokens=200,
    sweep_tasks=("ee_capitals",), sweep_eps=(0.8,), sweep_limit=8,
    real_tasks=("arc_easy_local",), real_limit=8,
    dssd_eps=(0.8,), layerskip_drafts=(3,), dssd_prompts=2, dssd_tokens=16,
    batch_sizes=(1, 4), batch_eps=(0.9,), batch_prompts=4, batch_tokens=16,
)
FULL = Sizes(
    sequences=96, new_tokens=128, held_out_fraction=0.1, train_steps=80, batch_size=4, log_every=10,
    calibration_sequences=128, calibration_tokens=128, min_calibration_tokens=1000,
    sweep_tasks=("ee_capitals", "ee_sequences"), sweep_eps=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99),
    sweep_limit=None,
    real_tasks=("arc_easy_local", "arc_challenge_local", "hellaswag_local", "winogrande_local", "piqa_local",
                "mmlu_high_school_microeconomics_local"), real_limit=100,
    dssd_eps=(0.6, 0.7, 0.8, 0.9), layerskip_drafts=(2, 4, 6), dssd_prompts=4, dssd_tokens=64,
    batch_sizes=(1, 4, 8), batch_eps=(0.8, 0.9, 0.95), batch_prompts=8, batch_tokens=64,
)


@dataclass
class Run:
    """What every step sees: the arguments, the sizes, the output folder and (after the heads step) the heads."""

    args: ReproduceArgs
    sizes: Sizes
    out: Path
    heads: str | None = None  # path of the heads used by sections 2-6

    def heads_identity(self) -> str | None:
        """A digest of the heads' config.json (thresholds and training included): other heads, other results."""
        if self.heads is None:
            return None

        return hashlib.sha256((Path(resolve(self.heads)) / "config.json").read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Step:
    """One named step: `run(run, folder) -> result`; `uses` names the settings that make its result valid."""

    name: str
    run: Callable[[Run, Path], dict]
    uses: tuple[str, ...]


def _steps() -> tuple[Step, ...]:
    data = ("model", "dtype", "exit_layers", "draft_vocab_size", "sequences", "new_tokens", "train_steps",
            "batch_size")
    calibration = ("calibration_sequences", "calibration_tokens")
    return (
        Step("training_dynamics", s.training_dynamics, data + ("held_out_fraction", "log_every")),
        Step("heads", s.heads, data + ("heads", "lam", "adapter_rank", *calibration, "min_calibration_tokens")),
        Step("confidence_metrics", s.confidence_metrics, ("heads_identity", "dtype", *calibration)),
        Step("calibration", s.calibration, ("heads_identity",)),
        Step("lm_eval", s.lm_eval, ("heads_identity", "dtype", "sweep_tasks", "sweep_eps", "sweep_limit", "data_dir",
                                    "real_tasks", "real_limit")),
        Step("dssd", s.dssd, ("heads_identity", "bench_dtype", "dssd_eps", "layerskip_drafts", "dssd_prompts",
                              "dssd_tokens")),
        Step("batching", s.batching, ("heads_identity", "bench_dtype", "batch_sizes", "batch_eps", "batch_prompts",
                                      "batch_tokens")),
    )


def settings_of(step: Step, run: Run) -> dict:
    """The values `step` depends on, from the arguments, the sizes and the heads."""
    values = {**asdict(run.args), **asdict(run.sizes), "heads_identity": run.heads_identity()}
    return {name: values[name] for name in step.uses}


def _normalised(settings: dict) -> dict:
    return json.loads(json.dumps(finite(settings), default=str))


def is_done(step: Step, run: Run, folder: Path) -> bool:
    """Whether `folder` holds a finished result of `step` made with the current settings."""
    if not (folder / RESULT).exists():
        return False
    return json.loads((folder / RESULT).read_text()).get("settings") == _normalised(settings_of(step, run))


def prepare_folder(step: Step, run: Run, folder: Path) -> None:
    """Keep `folder` (partial work of an interrupted run) when its settings match; else start it afresh."""
    settings = _normalised(settings_of(step, run))
    if (folder / SETTINGS).exists() and json.loads((folder / SETTINGS).read_text()) != settings:
        logger.info("%s: settings changed, starting the step again", step.name)
        shutil.rmtree(folder)
    write_json(folder / SETTINGS, settings)


def run_step(step: Step, run: Run) -> dict:
    """Run `step` into `<out>/<name>/` and write its result (with settings, seconds and the reproduce command)."""
    folder = run.out / step.name
    prepare_folder(step, run, folder)
    start = time.perf_counter()
    result = step.run(run, folder)
    result.update(step=step.name, settings=settings_of(step, run), seconds=time.perf_counter() - start,
                  reproduce_command=run.args.command())
    write_json(folder / RESULT, result)
    return json.loads((folder / RESULT).read_text())


def run_reproduce(args: ReproduceArgs) -> dict:
    """Run every step not done yet, then render the report.

    Returns:
        `{"ran": [...], "skipped": [...], "results": path of RESULTS.md}`.
    """
    run = Run(args=args, sizes=QUICK if args.quick else FULL, out=Path(args.output_dir))
    ran, skipped = [], []
    bar = tqdm(_steps(), desc="Reproduce", unit="step")
    for step in bar:
        bar.set_postfix_str(step.name)
        folder = run.out / step.name
        if is_done(step, run, folder):
            skipped.append(step.name)
            logger.info("%s: done in an earlier run, skipped", step.name)
            result = json.loads((folder / RESULT).read_text())
        elif args.steps is not None and step.name not in args.steps and step.name != "heads":
            skipped.append(step.name)
            logger.info("%s: not in --steps, left as it is", step.name)
            continue
        else:
            result = run_step(step, run)
            ran.append(step.name)
        if step.name == "heads":
            run.heads = result["path"]
    bar.close()
    path = render(run.out, Path(args.docs_dir), args)
    return {"ran": ran, "skipped": skipped, "results": str(path)}
