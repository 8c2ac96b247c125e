"""Seconds per teacher-pass batch on the embedded model: the exact LM head against its bfloat16 screen.

One batch of the shipped recipe's teacher pass (8 rows x 128 tokens of real text, the model's top 64 per position,
`FeatureStore` features) with `lm_topk.final_topk` reading the exact float32 logits (`screen="off"`) and
screening with the LM head's bfloat16 copy (`screen="bf16"`), interleaved in one process; then, over all timed
rows, how the screened features compare with the exact ones (top token, top-64 set, normaliser).

    python docs/bench/teacher_pass.py --text_file ../shared/data/hellaswag/hellaswag_val_dev_split.jsonl \\
        --rounds 3 --output docs/bench/teacher_pass_epyc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_earlyexit.modeling.base_earlyexit import EMBEDDED, load_base_model, load_tokenizer
from hf_earlyexit.modeling.modeling_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.training.data import read_text_files, text_corpus
from hf_earlyexit.training.features import _features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text_file", required=True, help="real text (any format `train --text_files` reads)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over both ways, interleaved, new rows each")
    parser.add_argument("--output", default=None, help="write the timings here as JSON")
    args = parser.parse_args()
    tokenizer = load_tokenizer(EMBEDDED)
    model = EarlyExitForCausalLM.from_base(load_base_model(EMBEDDED, dtype=torch.float32), exit_layers=[4, 8, 12, 15],
                                           tokenizer=tokenizer)
    corpus = text_corpus(tokenizer, read_text_files([args.text_file]), seq_len=128)
    if len(corpus) < args.rounds * args.batch_size:
        raise SystemExit(f"{args.text_file} holds {len(corpus)} rows of 128 tokens; "
                         f"expected at least {args.rounds * args.batch_size}")
    result = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), **vars(args), "seconds": {"off": [], "bf16": []}}
    same_top = same_set = positions = 0
    gap = []
    with torch.no_grad():
        _features(model, corpus, torch.arange(args.batch_size), args.k, "off")  # warm-up
        for round_ in range(args.rounds):
            rows = torch.arange(round_ * args.batch_size, (round_ + 1) * args.batch_size)
            out = {}
            for screen in ("off", "bf16"):
                start = time.perf_counter()
                out[screen] = _features(model, corpus, rows, args.k, screen)
                seconds = time.perf_counter() - start
                result["seconds"][screen].append(round(seconds, 3))
                print(f"round {round_}: screen={screen:4s} {seconds:5.2f} s per batch of "
                      f"{args.batch_size} x {corpus.input_ids.shape[1]} tokens", flush=True)
            real = out["off"]["mask"].bool()
            exact, screened = out["off"], out["bf16"]
            positions += int(real.sum())
            same_top += int((exact["top"] == screened["top"])[real].sum())
            same_set += int((exact["topk_ids"].sort(-1).values == screened["topk_ids"].sort(-1).values).all(-1)[real]
                            .sum())
            gap.append((exact["topk_logp"][..., 0].float() - screened["topk_logp"][..., 0].float()).abs()[real])
    gap = torch.cat(gap)
    median = {name: statistics.median(times) for name, times in result["seconds"].items()}
    result.update(speedup=round(median["off"] / median["bf16"], 2), positions=positions, same_top=same_top,
                  same_topk_set=same_set, normaliser_gap_max=round(float(gap.max()), 4),
                  normaliser_gap_mean=round(float(gap.mean()), 5))
    print(f"screen: {result['speedup']}x the exact pass (medians of {args.rounds}); top token equal at {same_top} / "
          f"{positions} positions, top-{args.k} set at {same_set}; normaliser within {result['normaliser_gap_max']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
