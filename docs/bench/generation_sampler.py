"""Seconds per training-data generation batch on the embedded model: HF's sampler against `TopKSampler`, and
`TopKSampler` with the LM head's bfloat16 screen for the top k (`lm_topk.sampling_head`).

The shipped recipe's generation batch (48 of the paper's seed prompts, 128 new tokens, temperature 1, top-k 50),
generated with `generate(do_sample=True, top_k=50)`, with greedy search carrying out `TopKSampler` (the same
distribution, drawn among the top k only), and with that inside `sampling_head` (the same top k, from the screen),
interleaved in one process. The last two draw from the same seed, so their tokens are compared too.

    python docs/bench/generation_sampler.py --rounds 2 --output docs/bench/generation_sampler_epyc.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from transformers import LogitsProcessorList

from hf_earlyexit.modeling.base_earlyexit import EMBEDDED, load_base_model, load_tokenizer
from hf_earlyexit.training.data import TRAIN_PROMPTS, TopKSampler, _left_padding
from hf_earlyexit.training.lm_topk import sampling_head


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
    greedy_top_k = {"do_sample": False, "logits_processor": LogitsProcessorList([TopKSampler(1.0, args.top_k)])}
    modes = {"hf_do_sample": {"do_sample": True, "temperature": 1.0, "top_k": args.top_k},
             "top_k_sampler": greedy_top_k, "top_k_screened": greedy_top_k}
    result = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), **vars(args), "seconds": {name: [] for name in modes},
              "same_tokens": []}
    common = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id}
    for round_ in range(args.rounds):
        made = {}
        for name, kwargs in modes.items():
            screened = sampling_head(base, args.top_k, "bf16") if name == "top_k_screened" else contextlib.nullcontext()
            torch.manual_seed(round_)
            start = time.perf_counter()
            with torch.no_grad(), screened:
                made[name] = base.generate(**enc, **kwargs, **common)
            seconds = time.perf_counter() - start
            result["seconds"][name].append(round(seconds, 2))
            print(f"round {round_}: {name:14s} {seconds:6.1f} s per batch of {args.batch_size}", flush=True)
        result["same_tokens"].append(bool(torch.equal(made["top_k_sampler"], made["top_k_screened"])))
    best = {name: min(times) for name, times in result["seconds"].items()}
    result["speedup"] = round(best["hf_do_sample"] / best["top_k_sampler"], 2)
    result["screen_speedup"] = round(best["top_k_sampler"] / best["top_k_screened"], 2)
    print(f"TopKSampler: {result['speedup']}x HF's sampler; with the screen {result['screen_speedup']}x TopKSampler "
          f"(best of {args.rounds} rounds each); same tokens: {result['same_tokens']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
