"""Many requests of different lengths, side by side in one process: static batches against continuous batching.

A queue of requests (the bench's varied prompts, each with its own token budget, as stop sequences give in a
harness) decoded `--batch_sizes` at a time:

- `hf static`: HF `generate()` on consecutive batches (left-padded); a batch runs until its longest request is
  done (a per-row budget criterion ends rows, but HF keeps computing them), as lm-eval's `--model hf` does;
- `static ε`: our early-exit loop on the same batches (finished rows leave the batch);
- `continuous ε`: `continuous_generate`, a finished request's place taken by the next at the next step.

Useful tokens per second (each request's budget) and ratios against HF static batches and against our own loop
without exits (ε = 1) in the same scheduling; at ε = 1 every request's tokens are checked against HF's.

    python docs/bench/continuous_batching.py --model shipped --dtype float32 --batch_sizes 1 4 8 16 --eps 0.9
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_earlyexit import load
from hf_earlyexit.evaluation.bench import BENCH_PROMPTS
from hf_earlyexit.modeling.continuous_earlyexit import continuous_generate
from hf_earlyexit.modeling.options_earlyexit import DecodingOptions

BUDGETS = (16, 48, 24, 64, 32, 8, 40, 56)  # new tokens per request, cycled: 36 on average


class RowBudgets(StoppingCriteria):
    """Row `r` of a left-padded batch is done after `budgets[r]` new tokens."""

    def __init__(self, budgets: list[int], prompt_length: int) -> None:
        self.budgets, self.prompt_length = torch.tensor(budgets), prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.prompt_length) >= self.budgets.to(input_ids.device)


def static(model, tokenizer, prompts, budgets, batch_size: int, options: DecodingOptions | None) -> list[list[int]]:
    """Consecutive batches through `generate()` (HF's own loop when `options` is None)."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        texts, chunk = prompts[start:start + batch_size], budgets[start:start + batch_size]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        length = enc["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=max(chunk), do_sample=False, eos_token_id=None,
                      pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList(
                          [RowBudgets(chunk, length)]))
        if options is None:
            out = model.get_base_model().generate(**enc, **kwargs)
        else:
            out = model.generate(**enc, decoding=options, **kwargs)
        outputs += [row[length:length + b].tolist() for row, b in zip(out, chunk, strict=True)]
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--num_requests", type=int, default=32)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype))
    tokenizer.padding_side = "left"
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(args.num_requests)]
    budgets = [BUDGETS[i % len(BUDGETS)] for i in range(args.num_requests)]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    useful = sum(budgets)
    head = (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads, {args.dtype}; {args.num_requests} requests, {useful} new tokens")
    print(head)
    eps_one, eps = (DecodingOptions(mode="early_exit", eps=e) for e in (1.0, args.eps))
    runs = {
        "hf static": lambda b: static(model, tokenizer, prompts, budgets, b, None),
        "static eps=1": lambda b: static(model, tokenizer, prompts, budgets, b, eps_one),
        f"static eps={args.eps:g}": lambda b: static(model, tokenizer, prompts, budgets, b, eps),
        "continuous eps=1": lambda b: continuous_generate(model, ids, budgets, batch_size=b, options=eps_one),
        f"continuous eps={args.eps:g}": lambda b: continuous_generate(model, ids, budgets, batch_size=b,
                                                                      options=eps),
    }
    results = {"setting": head, "batches": {}}
    for b in args.batch_sizes:
        row, outputs = {}, {}
        for name, run in runs.items():
            model.reset_exit_stats()
            started = time.perf_counter()
            outputs[name] = run(b)
            row[name] = {"tokens_per_s": useful / (time.perf_counter() - started)}
            if name != "hf static":
                stats = model.exit_stats
                row[name]["exits"] = dict(zip(stats.exit_names, stats.exit_counts, strict=True))
                row[name]["layers_computed_fraction"] = stats.layers_computed_fraction
        reference = outputs["hf static"]
        for name in runs:
            row[name]["identical"] = sum(a == r for a, r in zip(outputs[name], reference, strict=True))
            row[name]["vs_hf_static"] = row[name]["tokens_per_s"] / row["hf static"]["tokens_per_s"]
        for name in runs:
            if name.startswith(("static", "continuous")):
                own = row[name.split(" ")[0] + " eps=1"]["tokens_per_s"]
                row[name]["vs_own_eps1"] = row[name]["tokens_per_s"] / own
        results["batches"][b] = row
        print(f"\nbatch {b}:")
        print("| run | tok/s | vs HF static | vs own loop ε=1 (same scheduling) | layer work | identical to HF "
              f"(of {args.num_requests}) |\n|---|---|---|---|---|---|")
        for name, values in row.items():
            work = values.get("layers_computed_fraction")
            print(f"| {name} | {values['tokens_per_s']:.1f} | {values['vs_hf_static']:.2f} | "
                  f"{values.get('vs_own_eps1', float('nan')):.2f} | {'–' if work is None else f'{work:.2f}'} | "
                  f"{values['identical']} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
