"""The main job's demo: the embedded Gemma 3 270M with its shipped heads, decoded side by side: plain, early
exit, DSSD (and DSSD with prompt-lookup drafts).

For a few prompts (batch 1, greedy) it times plain decoding (HF `generate`), early exit at `eps` and self-speculative
decoding at `dssd_eps`, prints tokens/s, agreement with plain decoding, the exit distribution and the DSSD
acceptance, shows each token coloured by the exit it left from, and writes `demo.json` + `demo.png`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..evaluation.bench import token_agreement
from ..loading import SHIPPED, ModelArgs
from ..modeling.base_earlyexit import DTYPES
from ..modeling.stats_earlyexit import ExitStats
from .generate import colour_legend, colour_tokens
from .report import print_model_info, print_table

DEMO_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
)


def preferred_dtype() -> str:
    """bfloat16 where this CPU computes it natively (torch's oneDNN check: AVX-512 bf16 / AMX), else float32: on a
    CPU without it bf16 matrix products are emulated and slower than fp32 (README), and the exact-argmax fast path of
    verification is fp32 only."""
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"


@dataclass
class DemoArgs(ModelArgs):
    """Demo: the embedded model with its shipped heads, plain vs early exit vs DSSD, side by side."""

    model: str = field(default=SHIPPED, metadata={
        "help": "calibrated heads (folder or Hub repo); default: the embedded Gemma 3 270M with its shipped heads"})
    dtype: str = field(default_factory=preferred_dtype, metadata={
        "help": "base model dtype; default: bfloat16 where the CPU computes it natively, else float32",
        "choices": list(DTYPES)})
    prompt: list[str] = field(default_factory=lambda: list(DEMO_PROMPTS), metadata={"help": "prompts to continue"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens to generate per prompt"})
    eps: float = field(default=0.9, metadata={"help": "early exit: accuracy target ε"})
    dssd_eps: float = field(default=0.8, metadata={"help": "self-speculative decoding: ε of the drafts"})
    lookup: int = field(default=2, metadata={
        "help": "also run DSSD with prompt-lookup drafts of n-grams up to this size (0: not)"})
    output_dir: str = field(default="demo", metadata={"help": "where demo.json and demo.png go"})


@dataclass
class DemoRun:
    """One decoding mode over every prompt."""

    name: str
    seconds: float = 0.0
    tokens: int = 0
    sequences: list | None = None  # one (1, new) tensor per prompt
    exits: list | None = None  # one (new,) exit-index list per prompt (None for plain decoding)
    stats: ExitStats | None = None
    lossless: bool = False  # must reproduce plain decoding (DSSD)


def _decode(model, encoded: list, name: str, pad: int, **kwargs) -> DemoRun:
    run = DemoRun(name, sequences=[], exits=[], lossless=kwargs.get("mode") == "dssd")
    for enc in encoded:
        width = enc["input_ids"].shape[1]
        start = time.perf_counter()
        out = model.generate(**enc, return_dict_in_generate=True, pad_token_id=pad, **kwargs)
        run.seconds += time.perf_counter() - start
        run.sequences.append(out.sequences[:, width:])
        run.tokens += out.sequences.shape[1] - width
        exit_index = getattr(out, "exit_index", None)
        run.exits.append(exit_index[0].tolist() if exit_index is not None else None)
        stats = getattr(out, "exit_stats", None)
        if stats is not None and run.stats is None:
            run.stats = copy.deepcopy(stats)
        elif stats is not None:
            run.stats.add(stats)
    return run


def _row(run: DemoRun, plain: DemoRun, names: list[str]) -> dict:
    agreement, firsts = zip(*(token_agreement(p, o) for p, o in zip(plain.sequences, run.sequences, strict=True)),
                            strict=True)
    row = {"mode": run.name, "tok/s": run.tokens / run.seconds,
           "vs plain": plain.seconds / plain.tokens * run.tokens / run.seconds,
           "agreement": sum(agreement) / len(agreement),
           "identical": f"{sum(f[0] is None for f in firsts)}/{len(firsts)}"}
    if run.stats is not None:
        fractions = [c / max(1, run.stats.tokens) for c in run.stats.exit_counts]
        row["exits " + "/".join(names)] = " ".join(f"{f:.2f}" for f in fractions)
        row["accepted/drafted"] = f"{run.stats.acceptance_rate:.2f}" if run.stats.rounds else "–"
    return row


def find_divergences(model, tokenizer, encoded: list, plain: DemoRun, run: DemoRun) -> list[dict]:
    """Where `run` first departs from plain decoding, per prompt: both tokens and the full model's logit gap between
    them there (one forward pass over the prompt and plain's tokens before it), beside the dtype's resolution."""
    found = []
    for i, (enc, reference, other) in enumerate(zip(encoded, plain.sequences, run.sequences, strict=True)):
        first = token_agreement(reference, other)[1][0]
        if first is None or first >= min(reference.shape[1], other.shape[1]):
            continue
        ids = torch.cat([enc["input_ids"], reference[:, :first]], dim=1)
        logits = model.get_base_model()(input_ids=ids).logits[0, -1]
        a, b = int(reference[0, first]), int(other[0, first])
        top = torch.maximum(logits[a].abs(), logits[b].abs())
        found.append({"mode": run.name, "prompt": i, "position": first, "plain": tokenizer.decode([a]),
                      "dssd": tokenizer.decode([b]), "logit_gap": float((logits[a] - logits[b]).abs()),
                      "resolution": float(top * torch.finfo(logits.dtype).eps)})
    return found


def run_demo(args: DemoArgs) -> dict:
    """Load `args.model`, print its exits and costs, decode the prompts in each mode, print and plot."""
    model, tokenizer = args.load()
    print_model_info(model)
    if not model.config.thresholds:
        raise ValueError(f"{args.model} has no calibrated thresholds: the demo needs trained, calibrated heads "
                         "(the default --model shipped has them; or run hf-earlyexit train + calibrate)")
    names = [f"exit@{k}" for k in model.config.exit_layers] + ["full"]
    encoded = [tokenizer(p, return_tensors="pt") for p in args.prompt]
    common = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        model.generate(**encoded[0], mode="plain", max_new_tokens=4, pad_token_id=pad)  # warm-up
        model.engine.learn_final_argmax()  # the LM head's fastest way per row count, learned before timing
        runs = [
            _decode(model, encoded, "plain (HF generate)", pad, mode="plain", **common),
            _decode(model, encoded, f"early exit ε={args.eps:g}", pad, mode="early_exit", eps=args.eps, **common),
            _decode(model, encoded, f"DSSD ε={args.dssd_eps:g}", pad, mode="dssd", eps=args.dssd_eps, **common),
        ]
        if args.lookup:
            runs.append(_decode(model, encoded, f"DSSD ε={args.dssd_eps:g} + lookup", pad, mode="dssd",
                                eps=args.dssd_eps, lookup=args.lookup, **common))
    plain = runs[0]
    rows = [_row(run, plain, names) for run in runs]
    print(f"\n{len(encoded)} prompts x up to {args.max_new_tokens} new tokens, batch 1, greedy, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(print_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    for run in runs[1:]:
        print(f"\n{run.name}, each token coloured by the exit it left from:")
        for prompt, seq, exits in zip(args.prompt, run.sequences, run.exits, strict=True):
            text = colour_tokens(tokenizer, seq[0].tolist(), exits, model.config.num_exits)
            print(f"  {prompt}{text}")
    print(colour_legend(model.config.exit_layers))
    divergences = [d for run in runs[1:] if run.lossless
                   for d in find_divergences(model, tokenizer, encoded, plain, run)]
    if divergences:
        print("\nDSSD is lossless, but these sequences depart from plain decoding:")
        for d in divergences:
            print(f"  {d['mode']}, prompt {d['prompt'] + 1}, new token {d['position'] + 1}: plain {d['plain']!r}, "
                  f"DSSD {d['dssd']!r}; the full model's logits for the two differ by {d['logit_gap']:.3g} "
                  f"({args.dtype} resolves about {d['resolution']:.3g} there)")
        print(f"  a near-tie rounds differently when {args.dtype} verifies several positions in one pass than in "
              "one-token steps; in float32 DSSD reproduces plain decoding exactly (tested; "
              "`hf-earlyexit demo --dtype float32`)")
    report = {"model": args.model, "dtype": args.dtype, "prompts": list(args.prompt), "rows": rows,
              "dssd_divergences": divergences,
              "exit_names": names,
              "exit_fractions": {r.name: [c / max(1, r.stats.tokens) for c in r.stats.exit_counts]
                                 for r in runs if r.stats is not None}}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    plot_demo(report, out_dir / "demo.png")
    print(f"\nwritten: {out_dir / 'demo.json'}, {out_dir / 'demo.png'}")
    return report


def plot_demo(report: dict, path: Path) -> None:
    """Left: tokens/s per mode; right: where tokens left, per mode."""
    rows = report["rows"]
    fig = Figure(figsize=(12, 4))
    left, right = fig.subplots(1, 2)
    colours = ["black", "tab:blue", "tab:red", "tab:pink"][: len(rows)]
    left.bar([r["mode"] for r in rows], [r["tok/s"] for r in rows], color=colours)
    left.set_ylabel("tokens/s")
    left.set_title(f"{report['model']} ({report['dtype']}), batch 1, greedy")
    names = report["exit_names"]
    bottom = None
    modes = list(report["exit_fractions"])
    for j, name in enumerate(names):
        values = [report["exit_fractions"][m][j] for m in modes]
        right.bar(modes, values, bottom=bottom, label=name)
        bottom = values if bottom is None else [a + b for a, b in zip(bottom, values, strict=True)]
    right.set_ylabel("fraction of tokens")
    right.set_title("where tokens left (DSSD: accepted drafts per head)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
