"""`hf-earlyexit` command line: one subcommand per job, arguments generated from dataclasses."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from transformers import HfArgumentParser

from ..evaluation.agreement import AgreementArgs, run_agreement
from ..evaluation.bench import BenchArgs, run_bench
from ..evaluation.lm_eval_plugin import run_eval
from ..evaluation.local_tasks import TasksArgs, write_local_tasks
from ..evaluation.sweep import SweepArgs, run_sweep
from ..loading import ModelArgs
from ..publish.hub import PushArgs, run_push
from ..publish.ship import ShipArgs, ship
from ..reproduce.run import ReproduceArgs, run_reproduce
from ..training.calibrate import CalibrateConfig
from ..training.data import GenerationSpec
from ..training.pipeline import CalibrateJob, TrainJob, run_calibrate, run_train
from ..training.train import TrainConfig
from .demo import DemoArgs, run_demo
from .generate import GenerateArgs, run_generate
from .report import print_model_info, print_table


def _info(args: ModelArgs) -> None:
    model, _ = args.load()
    print_model_info(model)


def _train(job: TrainJob, spec: GenerationSpec, config: TrainConfig) -> None:
    _, report = run_train(job, spec, config)
    print(f"heads written to {job.output_dir}; agreement with the full model on held-out generated tokens:")
    print(print_table(report, ["exit", "agreement", "entropy", "tokens"]))


def _calibrate(job: CalibrateJob, config: CalibrateConfig) -> None:
    _, check_rows, cascade_rows = run_calibrate(job, config)
    print(f"thresholds written to {job.model}; on held-out tokens, per exit:")
    print(print_table(check_rows, ["eps", "exit", "threshold", "coverage", "agreement"]))
    print("whole rule (a token leaves at the first exit that passes):")
    print(print_table(cascade_rows, ["eps", "exited", "agreement_exited", "agreement_all"]))


def _sweep(args: SweepArgs) -> None:
    result = run_sweep(args)
    print(f"{len(result['points'])} ε points; written to {args.output_dir}: sweep.csv, sweep.json, "
          "score_vs_eps.png, speedup_vs_eps.png, exits_vs_eps.png")


def _tasks(args: TasksArgs) -> None:
    written = write_local_tasks(args)
    for name, entry in written.items():
        splits = ", ".join(f"{split} {n}" for split, n in entry["splits"].items())
        print(f"{name}: lm-eval's {entry['builtin']} on {splits} documents")
    print(f"{len(written)} tasks written to {args.output_dir}; run them with --include_path {args.output_dir}")


def _reproduce(args: ReproduceArgs) -> None:
    result = run_reproduce(args)
    print(f"steps run: {', '.join(result['ran']) or 'none'}; already done (skipped): "
          f"{', '.join(result['skipped']) or 'none'}; written: {result['results']}")


def _ship(args: ShipArgs) -> None:
    manifest = ship(args)
    print(f"shipped {len(manifest['files'])} files from {args.model}")


# name -> (the dataclasses its arguments come from, what runs them, help)
COMMANDS: dict[str, tuple[tuple[type, ...], Callable[..., None], str]] = {
    "info": ((ModelArgs,), _info, "show the model, its exits and the per-token cost of each exit"),
    "demo": ((DemoArgs,), run_demo, "embedded model + shipped heads: plain vs early exit vs DSSD side by side"),
    "train": ((TrainJob, GenerationSpec, TrainConfig), _train,
              "self-supervised head training on text the model writes itself"),
    "calibrate": ((CalibrateJob, CalibrateConfig), _calibrate,
                  "set per-exit thresholds for a grid of ε on generated text"),
    "generate": ((GenerateArgs,), run_generate, "generate text with early exits and show where each token left"),
    "agreement": ((AgreementArgs,), run_agreement,
                  "per-exit agreement with the full model on a text file or on the model's own continuations"),
    "bench": ((BenchArgs,), run_bench, "tokens/s of early exit at an ε grid vs plain decoding, side by side"),
    "sweep": ((SweepArgs,), _sweep, "lm-eval tasks across an ε grid: CSV/JSON and the paper's three plots"),
    "tasks": ((TasksArgs,), _tasks,
              "write lm-eval's built-in arc/hellaswag/winogrande/mmlu/piqa tasks over local files (official formats)"),
    "reproduce": ((ReproduceArgs,), _reproduce, "re-measure the papers' claims: docs/RESULTS.md, figures, verdicts"),
    "push": ((PushArgs,), run_push, "upload a heads folder to the Hugging Face Hub (one commit, never base weights)"),
    "ship": ((ShipArgs,), _ship, "maintainers: make a heads folder of the embedded model the package's shipped heads"),
}
# subcommands that also take their dataclass's `prompt` field as positional words
POSITIONAL_PROMPT = ("generate",)
# subcommands whose dataclass fields may also be given as positional arguments, in this order
POSITIONAL_FIELDS = {"push": ("model", "repo_id")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-earlyexit", description="Early-exit heads for Hugging Face causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (anywhere on the line; default: one line, exit 2)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for name, (types, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, dataclass_types=list(types), help=help_text, description=help_text)
        if name in POSITIONAL_PROMPT:
            command.add_argument("positional_prompt", nargs="*", metavar="PROMPT", help="prompt(s) to continue")
        for dest in POSITIONAL_FIELDS.get(name, ()):
            command.add_argument(f"positional_{dest}", nargs="?", metavar=dest.upper(), help=f"same as --{dest}")
    sub.add_parser("eval", add_help=False, help="lm-eval with --model ee-hf (every lm_eval argument passes through)")
    return parser


# errors a user's input causes (a bad value, file or folder): one line on stderr and exit status 2, unless --debug
USER_ERRORS = (ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a user error (bad value, missing or unusable file) prints one line naming it and returns
    2, with the traceback only under `--debug` (accepted anywhere on the line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [word for word in argv if word != "--debug"]
    try:
        return _run(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-earlyexit: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    if argv[:1] == ["eval"]:
        run_eval(argv[1:])
        return 0
    namespace = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if namespace.verbose else logging.WARNING, format="%(message)s")
    types, run, _ = COMMANDS[namespace.command]
    words = getattr(namespace, "positional_prompt", None)
    if words:
        namespace.prompt = (namespace.prompt or []) + list(words)
    for dest in POSITIONAL_FIELDS.get(namespace.command, ()):
        if getattr(namespace, f"positional_{dest}", None) is not None:
            setattr(namespace, dest, getattr(namespace, f"positional_{dest}"))
    run(*(t(**{f.name: getattr(namespace, f.name) for f in fields(t) if f.init}) for t in types))
    return 0


if __name__ == "__main__":
    sys.exit(main())
