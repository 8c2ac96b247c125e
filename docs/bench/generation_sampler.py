"""Seconds per training-data generation batch on the embedded model: HF's sampler against `TopKSampler`.

The shipped recipe's generation batch (48 of the paper's seed prompts, 128 new tokens, temperature 1, top-k 50),
generated with `generate(do_sample=True, top_k=50)` and with greedy search carrying out `TopKSampler` (the same
distribution, drawn among the top k only), interleaved in one process.

    python docs/bench/generation_sampler.py --rounds 2 --output docs/bench/generation_sampler_epyc.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LogitsProcessorList

from hf_earlyexit.modeling.base_earlyexit import EMBEDDED, load_base_model, load_tokenizer
from hf_earlyexit.training.data import TRAIN_PROMPTS, TopKSampler, _left_padding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=48)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over both samplers, interleaved")
    parser.add_argument("--output", default=None, help="write the timings here as JSON")
    args = parser.parse_args()
    base = load_base_model(EMBEDDED, dtype=torch.float32)
    tokenizer = _left_padding(load_tokenizer(EMBEDDED))
    prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(args.batch_size)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    result = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), **vars(args), "seconds": {"hf_do_sample": [], "top_k_sampler": []}}
    common = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id}
    for round_ in range(args.rounds):
        for name, kwargs in (("hf_do_sample", {"do_sample": True, "temperature": 1.0, "top_k": args.top_k}),
                             ("top_k_sampler", {"do_sample": False, "logits_processor": LogitsProcessorList(
                                 [TopKSampler(1.0, args.top_k)])})):
            torch.manual_seed(round_)
            start = time.perf_counter()
            with torch.no_grad():
                base.generate(**enc, **kwargs, **common)
            seconds = time.perf_counter() - start
            result["seconds"][name].append(round(seconds, 2))
            print(f"round {round_}: {name:13s} {seconds:6.1f} s per batch of {args.batch_size}", flush=True)
    best = {name: min(times) for name, times in result["seconds"].items()}
    result["speedup"] = round(best["hf_do_sample"] / best["top_k_sampler"], 2)
    print(f"TopKSampler: {result['speedup']}x HF's sampler (best of {args.rounds} rounds each)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
