"""Decode speed inside vLLM: the hf-earlyexit plugin against vLLM's own model, side by side in one run.

Runs in the vLLM venv (README "Serving with vLLM"). Every configuration is a fresh engine on the same base folder
(float32 or bfloat16, eager, 2 CPU threads), warmed up once, then decodes the prompts greedily (EOS ignored) one at a
time (batch 1) and all at once (batch = number of prompts). Prints a table and writes JSON: tokens/s, the ratio to
vLLM's own model at the same batch, the share of decode tokens that left early and where, and how many sequences
came out identical to vLLM's own.

    python -c "import json; from hf_earlyexit.evaluation.bench import BENCH_PROMPTS as P; print(json.dumps(P))" \
        > prompts.json                               # in the hf-earlyexit venv: the varied held-out prompts
    python docs/bench/vllm_earlyexit.py --base BASE_FOLDER --heads HEADS_FOLDER --prompts prompts.json \
        --dtype bfloat16 --output vllm_bf16.json     # in the vLLM venv
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def run(name: str, args, earlyexit: dict | None, prompts: list[str], speculative: dict | None = None) -> dict:
    import hf_earlyexit_vllm
    import torch
    from vllm import LLM, SamplingParams

    kwargs = {}
    if earlyexit is not None:
        kwargs = {"hf_overrides": {"architectures": ["Gemma3EarlyExitForCausalLM"],
                                   "earlyexit": {"heads": args.heads, **earlyexit}},
                  "worker_extension_cls": hf_earlyexit_vllm.WORKER_EXTENSION}
    if speculative is not None:
        kwargs["speculative_config"] = speculative
    llm = LLM(model=args.base, dtype=args.dtype, enforce_eager=True, max_model_len=1024, seed=0, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        before = hf_earlyexit_vllm.exit_stats(llm)[0] if earlyexit is not None else None
        result = {"name": name, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()}
        tokens = {}
        for batch in ("1", "all"):
            start = time.perf_counter()
            if batch == "1":
                outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
            else:
                outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens[batch] = [list(o.outputs[0].token_ids) for o in outs]
            result[f"batch_{batch}"] = {"seconds": seconds,
                                        "tokens_per_s": sum(map(len, tokens[batch])) / seconds}
            if earlyexit is not None:
                after = hf_earlyexit_vllm.exit_stats(llm)[0]
                decoded = after["decode_tokens"] - before["decode_tokens"]
                exits = {k: after["exit_tokens"][k] - before["exit_tokens"][k] for k in after["exit_tokens"]}
                result[f"batch_{batch}"]["exit_share"] = sum(exits.values()) / max(decoded, 1)
                result[f"batch_{batch}"]["exits"] = exits
                steps = after["decode_steps"] - before["decode_steps"]
                result[f"batch_{batch}"]["early_step_share"] = (after["early_steps"] - before["early_steps"]) / max(
                    steps, 1)
                before = after
        result["tokens"] = tokens
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model folder (HF layout) vLLM loads")
    parser.add_argument("--heads", required=True, help="an hf-earlyexit heads folder for that base")
    parser.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.9])
    parser.add_argument("--exits", type=int, nargs="*", default=None,
                        help="also run each ε with only these exit layers checked (e.g. 12 15)")
    parser.add_argument("--ngram", action="store_true", help="also run vLLM's own n-gram speculative decoding")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SystemExit(f"--prompts {args.prompts}: expected a JSON list of non-empty strings")
    runs = [run("vLLM Gemma3ForCausalLM", args, None, prompts)]
    if args.ngram:
        runs.append(run("vLLM n-gram speculative (4 tokens, lossless)", args, None, prompts,
                        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                         "prompt_lookup_min": 2}))
    for eps in args.eps:
        runs.append(run(f"plugin ε={eps:g}, every exit", args, {"eps": eps}, prompts))
        if args.exits:
            runs.append(run(f"plugin ε={eps:g}, exits {args.exits}", args, {"eps": eps, "exits": args.exits},
                            prompts))
    plain = runs[0]
    print(f"{args.dtype}, {len(prompts)} prompts x {args.max_new_tokens} new tokens, torch CPU capability "
          f"{plain['torch_cpu_capability']}, {plain['threads']} threads")
    print()
    n = len(prompts)
    print(f"| run | batch 1 tok/s | vs vLLM | batch {n} tok/s | vs vLLM | tokens (steps) that left early, b1 / b{n} "
          f"| identical to vLLM (b1 / b{n}) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        cells = []
        for batch in ("1", "all"):
            speed = r[f"batch_{batch}"]["tokens_per_s"]
            cells += [f"{speed:.1f}", f"{speed / plain[f'batch_{batch}']['tokens_per_s']:.2f}x"]
        share = " / ".join(f"{r[f'batch_{b}']['exit_share']:.0%}" if "exit_share" in r[f"batch_{b}"] else "–"
                           for b in ("1", "all"))
        if "early_step_share" in r["batch_1"]:
            share += " (" + " / ".join(f"{r[f'batch_{b}']['early_step_share']:.0%}" for b in ("1", "all")) + ")"
        same = " / ".join(f"{sum(a == b for a, b in zip(r['tokens'][k], plain['tokens'][k], strict=True))}/{n}"
                          for k in ("1", "all"))
        print(f"| {r['name']} | {' | '.join(cells)} | {share} | {same} |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompts": prompts,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
