"""`hf-earlyexit generate` and `hf-earlyexit bench`: early-exit text with its exit picture, and speed measured side
by side with plain decoding on one fixed prompt set."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import ModelArgs
from .decoding_earlyexit import EXIT_POLICIES, KV_FILLS
from .modeling_earlyexit import EarlyExitForCausalLM

# prompts of the bench: none of the training or calibration seeds, a mix of prose, code and facts
BENCH_PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The main difference between TCP and UDP is",
    "To make a cup of tea, first",
    "The theory of relativity states that",
)
# one colour per exit (shallow to deep), the full model uncoloured
EXIT_COLOURS = ("\033[92m", "\033[96m", "\033[93m", "\033[95m", "\033[94m", "\033[91m")
RESET = "\033[0m"


@dataclass
class GenerateArgs(ModelArgs):
    """Generate text with early exits and print where each token left."""

    dtype: str = field(default="bfloat16", metadata={"help": "base model dtype", "choices": ["float32", "bfloat16"]})
    prompt: list[str] | None = field(default=None, metadata={"help": "prompt(s) to continue (also positional)"})
    eps: float = field(default=0.9, metadata={"help": "accuracy target ε in [0, 1]; 1.0 = plain decoding"})
    mode: str = field(default="early_exit", metadata={"help": "decoding mode", "choices": ["early_exit", "plain"]})
    kv_fill: str = field(default="recompute", metadata={"help": "KV cache of skipped layers", "choices": KV_FILLS})
    exit_policy: str = field(default="auto", metadata={"help": "auto: only exits that pay at this ε; all: every exit",
                                                       "choices": EXIT_POLICIES})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sampling: keep the k most likely tokens"})
    top_p: float = field(default=1.0, metadata={"help": "sampling: nucleus mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    colour: bool = field(default=False, metadata={"help": "colour each token by the exit it left from"})


def _generation_kwargs(args, tokenizer) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
              "pad_token_id": tokenizer.pad_token_id}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


def colour_tokens(tokenizer, token_ids: list[int], exits: list[int], num_exits: int) -> str:
    """The text of `token_ids`, each token wrapped in the ANSI colour of the exit it left from."""
    pieces = []
    for token, exit_index in zip(token_ids, exits, strict=True):
        if exit_index < 0:
            continue
        text = tokenizer.decode([token], skip_special_tokens=True)
        colour = EXIT_COLOURS[exit_index % len(EXIT_COLOURS)] if exit_index < num_exits else ""
        pieces.append(f"{colour}{text}{RESET}" if colour else text)
    return "".join(pieces)


def colour_legend(exit_layers: list[int]) -> str:
    names = [f"{EXIT_COLOURS[j % len(EXIT_COLOURS)]}exit@{layer}{RESET}" for j, layer in enumerate(exit_layers)]
    return "colours: " + " ".join(names) + " full model (plain)"


def run_generate(args: GenerateArgs) -> None:
    prompts = args.prompt or []
    if not prompts:
        raise ValueError("give a prompt: hf-earlyexit generate --eps 0.9 \"The capital of France is\"")
    model, tokenizer = args.load()
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = _generation_kwargs(args, tokenizer)
    torch.manual_seed(args.seed)
    model.reset_exit_stats()
    start = time.perf_counter()
    if args.mode == "plain":
        sequences = model.generate(**inputs, mode="plain", **kwargs)
        exits = None
    else:
        out = model.generate(**inputs, mode="early_exit", eps=args.eps, kv_fill=args.kv_fill,
                             exit_policy=args.exit_policy, return_dict_in_generate=True, **kwargs)
        sequences, exits = out.sequences, out.exit_index
    seconds = time.perf_counter() - start
    width = inputs["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        new = sequences[row, width:].tolist()
        if args.colour and exits is not None:
            text = colour_tokens(tokenizer, new, exits[row].tolist(), model.config.num_exits)
        else:
            text = tokenizer.decode(new, skip_special_tokens=True)
        print(f"{prompt}{text}\n")
    if args.colour and exits is not None:
        print(colour_legend(model.config.exit_layers))
    generated = int((sequences[:, width:] != tokenizer.pad_token_id).sum())
    print(f"{generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tok/s), mode {args.mode}"
          + (f", eps {args.eps}, kv_fill {args.kv_fill}" if args.mode != "plain" else ""))
    if args.mode != "plain":
        print(model.exit_stats.summary())


# -- bench ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchArgs(ModelArgs):
    """Tokens/s of early exit at an ε grid vs plain decoding, measured side by side in one run."""

    eps_grid: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 1.0],
                                  metadata={"help": "ε values to measure"})
    kv_fill: str = field(default="recompute", metadata={"help": "KV cache of skipped layers", "choices": KV_FILLS})
    exit_policy: str = field(default="auto", metadata={"help": "auto: only exits that pay at this ε; all: every exit",
                                                       "choices": EXIT_POLICIES})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per prompt (EOS ignored)"})
    batch_size: int = field(default=1, metadata={"help": "prompts per generate call (left padded)"})
    num_prompts: int = field(default=len(BENCH_PROMPTS), metadata={"help": "how many bench prompts to use"})
    repeats: int = field(default=1, metadata={"help": "timed repetitions of every configuration (median kept)"})
    per_exit: bool = field(default=True, metadata={"help": "also time tokens forced to leave at each exit"})
    output_dir: str = field(default="bench", metadata={"help": "where bench.json and bench.png go"})


def _agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, list[int | None]]:
    """Fraction of identical new tokens, and per row the first position where they differ (`None`: never)."""
    same = reference == other  # (batch, new)
    first = []
    for row in same:
        bad = (~row).nonzero()
        first.append(int(bad[0, 0]) if len(bad) else None)
    return float(same.float().mean()), first


def _forced(model: EarlyExitForCausalLM, j: int) -> dict[str, list]:
    """Thresholds that make every token leave at exit `j` (and nowhere else)."""
    taus = [None] * model.config.num_exits
    taus[j] = -math.inf
    return {"0": taus}


def run_bench(args: BenchArgs) -> dict:
    """Measure, print, and write `bench.json` + `bench.png` into `args.output_dir`."""
    for eps in args.eps_grid:
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps={eps!r} in eps_grid must lie in [0, 1]")
    if not 1 <= args.num_prompts <= len(BENCH_PROMPTS):
        raise ValueError(f"num_prompts={args.num_prompts} must lie in 1..{len(BENCH_PROMPTS)}")
    model, tokenizer = args.load()
    tokenizer.padding_side = "left"
    prompts = list(BENCH_PROMPTS[: args.num_prompts])
    groups = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    encoded = [tokenizer(g, return_tensors="pt", padding=True) for g in groups]
    common = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}

    configs = [("plain", None)] + [("early_exit", eps) for eps in args.eps_grid]
    if args.per_exit:
        configs += [("forced", j) for j in range(model.config.num_exits)]
    saved_thresholds = dict(model.config.thresholds or {})

    def run(kind, value, enc):
        if kind == "plain":
            return model.generate(**enc, mode="plain", **common), None
        if kind == "forced":
            model.config.thresholds = _forced(model, value)
            try:
                out = model.generate(**enc, eps=0.0, kv_fill=args.kv_fill, exit_policy="all",
                                     return_dict_in_generate=True, **common)
            finally:
                model.config.thresholds = saved_thresholds
        else:
            out = model.generate(**enc, eps=value, kv_fill=args.kv_fill, exit_policy=args.exit_policy,
                                 return_dict_in_generate=True, **common)
        return out.sequences, out.exit_stats

    with torch.inference_mode():
        run("plain", None, encoded[0])  # warm-up
        times = {c: [] for c in configs}
        outputs, stats = {}, {}
        bar = tqdm(total=args.repeats * len(encoded) * len(configs), desc="Bench", unit="run")
        for rep in range(args.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]  # alternate the order against drift
            for g, enc in enumerate(encoded):
                for config in order:
                    start = time.perf_counter()
                    seqs, st = run(*config, enc)
                    times[config].append((g, time.perf_counter() - start))
                    if rep == 0:
                        outputs[config, g] = seqs[:, enc["input_ids"].shape[1]:]
                        if st is not None:
                            stats.setdefault(config, []).append(st)
                    bar.update()
        bar.close()

    tokens = sum(outputs[("plain", None), g].numel() for g in range(len(encoded)))
    rows = []
    for config in configs:
        per_group = {}
        for g, seconds in times[config]:
            per_group.setdefault(g, []).append(seconds)
        seconds = sum(statistics.median(v) for v in per_group.values())
        row = {"mode": config[0], "eps": config[1] if config[0] == "early_exit" else None,
               "exit": model.config.exit_layers[config[1]] if config[0] == "forced" else None,
               "seconds": seconds, "tokens_per_s": tokens / seconds}
        if config[0] != "plain":
            agree, first = zip(*(_agreement(outputs[("plain", None), g], outputs[config, g])
                                 for g in range(len(encoded))), strict=True)
            row["agreement"] = statistics.fmean(agree)
            firsts = [f for group in first for f in group]
            row["first_divergence"] = firsts
            row["identical_sequences"] = sum(f is None for f in firsts)
            total = stats[config][0]
            for extra in stats[config][1:]:
                total.add(extra)
            row["exit_fractions"] = [c / max(1, total.tokens) for c in total.exit_counts]
            row["layers_fraction"] = total.layers_computed_fraction
            row["macs_fraction"] = total.macs_fraction
            row["weight_bytes_fraction"] = total.weight_bytes_fraction
            row["wasted_layer_tokens"] = total.wasted_layer_tokens
            row["checked_exits"] = total.checked_exits
        rows.append(row)
    plain_speed = rows[0]["tokens_per_s"]
    same_loop = next((r["tokens_per_s"] for r in rows if r["mode"] == "early_exit" and r["eps"] == 1.0), None)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / plain_speed
        row["speedup_vs_eps1"] = row["tokens_per_s"] / same_loop if same_loop else None
    report = {
        "model": args.model, "dtype": args.dtype, "kv_fill": args.kv_fill, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "prompts": prompts, "repeats": args.repeats,
        "exit_layers": model.config.exit_layers, "num_layers": model.num_layers,
        "threads": torch.get_num_threads(), "rows": rows, "args": asdict(args),
    }
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot_bench(report, out_dir / "bench.png")
    print(bench_table(report))
    print(f"\nwritten: {out_dir / 'bench.json'}, {out_dir / 'bench.png'}")
    return report


def bench_table(report: dict) -> str:
    """The bench as a Markdown table."""
    names = [f"exit@{k}" for k in report["exit_layers"]] + ["full"]
    lines = [
        f"{report['dtype']}, batch {report['batch_size']}, {report['max_new_tokens']} new tokens x "
        f"{len(report['prompts'])} prompts, kv_fill {report['kv_fill']}, {report['threads']} threads",
        "",
        "| run | tok/s | vs plain | vs ε=1 | token agreement | identical seqs | layer work | MACs | checked | exits ("
        + " / ".join(names) + ") |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        name = {"plain": "plain", "early_exit": f"ε={row['eps']}", "forced": f"all at exit@{row['exit']}"}[row["mode"]]
        if row["mode"] == "plain":
            lines.append(f"| {name} | {row['tokens_per_s']:.1f} | 1.00 | – | 1.000 | – | 1.00 | 1.00 | – | – |")
            continue
        exits = " / ".join(f"{f:.2f}" for f in row["exit_fractions"])
        vs_eps1 = f"{row['speedup_vs_eps1']:.2f}" if row["speedup_vs_eps1"] else "–"
        checked = ",".join(str(k) for k in row["checked_exits"] or []) or "none"
        lines.append(
            f"| {name} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f} | {vs_eps1} | {row['agreement']:.3f} | "
            f"{row['identical_sequences']}/{len(row['first_divergence'])} | {row['layers_fraction']:.2f} | "
            f"{row['macs_fraction']:.2f} | {checked} | {exits} |"
        )
    return "\n".join(lines)


def plot_bench(report: dict, path: Path) -> None:
    """Speed-up and agreement against ε, and the exit distribution per ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["mode"] == "early_exit"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if rows:
        eps = [r["eps"] for r in rows]
        left.plot(eps, [r["speedup"] for r in rows], "o-", label="tokens/s vs plain")
        left.plot(eps, [r["agreement"] for r in rows], "s-", label="token agreement with plain greedy")
        left.axhline(1.0, color="grey", lw=0.8)
        left.set_xlabel("ε")
        left.legend()
        names = [f"exit@{k}" for k in report["exit_layers"]] + ["full"]
        bottom = [0.0] * len(rows)
        for j, name in enumerate(names):
            values = [r["exit_fractions"][j] for r in rows]
            right.bar([str(e) for e in eps], values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        right.set_xlabel("ε")
        right.set_ylabel("fraction of tokens")
        right.legend(fontsize=8)
    left.set_title(f"{report['dtype']}, batch {report['batch_size']}")
    right.set_title("where tokens leave")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
