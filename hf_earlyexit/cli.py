"""`hf-earlyexit` command line: one subcommand per job, arguments generated from dataclasses."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser

from .configuration_earlyexit import HEAD_TYPES
from .shipped import SHIPPED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


@dataclass
class ModelArgs:
    """Which model to load and, for a base model, which fresh heads to attach."""

    model: str = field(
        default=SHIPPED,
        metadata={"help": "saved heads (folder or Hub repo), 'shipped' (the embedded model with the heads shipped "
                          "in the package), or a base model with fresh heads (Hub id, local path, 'embedded')"},
    )
    dtype: str = field(default="float32", metadata={"help": "base model dtype", "choices": list(DTYPES)})
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "fresh heads: exit after these layers (default: regular intervals)"}
    )
    head: str | None = field(
        default=None, metadata={"help": "fresh heads: head type (default: paper)", "choices": list(HEAD_TYPES)}
    )
    draft_vocab_size: int | None = field(default=None, metadata={"help": "fresh heads: restrict to the first N ids"})
    adapter_rank: int | None = field(default=None, metadata={"help": "fresh shared heads: adapter rank"})

    def load(self):
        """`(model, tokenizer)` as `hf_earlyexit.load` gives them."""
        from . import load

        fresh = {"exit_layers": self.exit_layers, "head": self.head, "draft_vocab_size": self.draft_vocab_size,
                 "adapter_rank": self.adapter_rank}
        return load(self.model, dtype=DTYPES[self.dtype], **{k: v for k, v in fresh.items() if v is not None})


DEMO_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
)


@dataclass
class DemoArgs(ModelArgs):
    """Demo: the embedded model with its shipped heads, plain vs early exit vs DSSD, side by side."""

    model: str = field(default=SHIPPED, metadata={
        "help": "calibrated heads (folder or Hub repo); default: the embedded Gemma 3 270M with its shipped heads"})
    dtype: str = field(default="bfloat16", metadata={"help": "base model dtype", "choices": list(DTYPES)})
    prompt: list[str] = field(default_factory=lambda: list(DEMO_PROMPTS), metadata={"help": "prompts to continue"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens to generate per prompt"})
    eps: float = field(default=0.9, metadata={"help": "early exit: accuracy target ε"})
    dssd_eps: float = field(default=0.8, metadata={"help": "self-speculative decoding: ε of the drafts"})
    lookup: int = field(default=2, metadata={
        "help": "also run DSSD with prompt-lookup drafts of n-grams up to this size (0: not)"})
    output_dir: str = field(default="demo", metadata={"help": "where demo.json and demo.png go"})


def _info(args: ModelArgs) -> None:
    from .report import print_model_info

    model, _ = args.load()
    print_model_info(model)


def _demo(args: DemoArgs) -> None:
    from .demo import run_demo

    run_demo(args)


def _train(job, spec, config) -> None:
    from .pipeline import run_train
    from .report import print_table

    _, report = run_train(job, spec, config)
    print(f"heads written to {job.output_dir}; agreement with the full model on held-out generated tokens:")
    print(print_table(report, ["exit", "agreement", "entropy", "tokens"]))


def _train_types() -> tuple[type, ...]:
    from .data import GenerationSpec
    from .pipeline import TrainJob
    from .train import TrainConfig

    return (TrainJob, GenerationSpec, TrainConfig)


def _calibrate(job, config) -> None:
    from .pipeline import run_calibrate
    from .report import print_table

    _, check_rows, cascade_rows = run_calibrate(job, config)
    print(f"thresholds written to {job.model}; on held-out tokens, per exit:")
    print(print_table(check_rows, ["eps", "exit", "threshold", "coverage", "agreement"]))
    print("whole rule (a token leaves at the first exit that passes):")
    print(print_table(cascade_rows, ["eps", "exited", "agreement_exited", "agreement_all"]))


def _calibrate_types() -> tuple[type, ...]:
    from .calibrate import CalibrateConfig
    from .pipeline import CalibrateJob

    return (CalibrateJob, CalibrateConfig)


def _generate(args) -> None:
    from .bench import run_generate

    run_generate(args)


def _bench(args) -> None:
    from .bench import run_bench

    run_bench(args)


def _generate_types() -> tuple[type, ...]:
    from .bench import GenerateArgs

    return (GenerateArgs,)


def _bench_types() -> tuple[type, ...]:
    from .bench import BenchArgs

    return (BenchArgs,)


def _sweep(args) -> None:
    from .sweep import run_sweep

    result = run_sweep(args)
    print(f"{len(result['points'])} ε points; written to {args.output_dir}: sweep.csv, sweep.json, "
          "score_vs_eps.png, speedup_vs_eps.png, exits_vs_eps.png")


def _sweep_types() -> tuple[type, ...]:
    from .sweep import SweepArgs

    return (SweepArgs,)


def _push(args) -> None:
    from .hub import run_push

    run_push(args)


def _push_types() -> tuple[type, ...]:
    from .hub import PushArgs

    return (PushArgs,)


def _reproduce(args) -> None:
    from .reproduce import run_reproduce

    result = run_reproduce(args)
    print(f"steps run: {', '.join(result['ran']) or 'none'}; already done (skipped): "
          f"{', '.join(result['skipped']) or 'none'}; written: {result['results']}")


def _reproduce_types() -> tuple[type, ...]:
    from .reproduce import ReproduceArgs

    return (ReproduceArgs,)


def _ship(args) -> None:
    from .shipped import ship

    manifest = ship(args)
    print(f"shipped {len(manifest['files'])} files from {args.model}")


def _ship_types() -> tuple[type, ...]:
    from .shipped import ShipArgs

    return (ShipArgs,)


COMMANDS: dict[str, tuple[Callable[[], tuple[type, ...]], Callable[..., None], str]] = {
    "info": (lambda: (ModelArgs,), _info, "show the model, its exits and the per-token cost of each exit"),
    "demo": (lambda: (DemoArgs,), _demo, "embedded model + shipped heads: plain vs early exit vs DSSD side by side"),
    "train": (_train_types, _train, "self-supervised head training on text the model writes itself"),
    "calibrate": (_calibrate_types, _calibrate, "set per-exit thresholds for a grid of ε on generated text"),
    "generate": (_generate_types, _generate, "generate text with early exits and show where each token left"),
    "bench": (_bench_types, _bench, "tokens/s of early exit at an ε grid vs plain decoding, side by side"),
    "sweep": (_sweep_types, _sweep, "lm-eval tasks across an ε grid: CSV/JSON and the paper's three plots"),
    "reproduce": (_reproduce_types, _reproduce, "re-measure the papers' claims: docs/RESULTS.md, figures, verdicts"),
    "push": (_push_types, _push, "upload a heads folder to the Hugging Face Hub (one commit, never base weights)"),
    "ship": (_ship_types, _ship, "maintainers: make a heads folder of the embedded model the package's shipped heads"),
}
# subcommands that also take their dataclass's `prompt` field as positional words
POSITIONAL_PROMPT = ("generate",)
# subcommands whose dataclass fields may also be given as positional arguments, in this order
POSITIONAL_FIELDS = {"push": ("model", "repo_id")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-earlyexit", description="Early-exit heads for Hugging Face causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for name, (types, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, dataclass_types=list(types()), help=help_text, description=help_text)
        if name in POSITIONAL_PROMPT:
            command.add_argument("positional_prompt", nargs="*", metavar="PROMPT", help="prompt(s) to continue")
        for dest in POSITIONAL_FIELDS.get(name, ()):
            command.add_argument(f"positional_{dest}", nargs="?", metavar=dest.upper(), help=f"same as --{dest}")
    sub.add_parser("eval", add_help=False, help="lm-eval with --model ee-hf (every lm_eval argument passes through)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from .lm_eval_plugin import run_eval

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
    run(*(t(**{f.name: getattr(namespace, f.name) for f in fields(t) if f.init}) for t in types()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
