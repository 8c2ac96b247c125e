"""Decode speed inside vLLM: the hf-earlyexit plugin against vLLM's own model and plain HF `generate()`, side by side
in one run.

Runs in the vLLM venv (README "Serving with vLLM"). Every configuration is a fresh engine on the same base folder
(float32 or bfloat16, eager, 2 CPU threads), warmed up once, then decodes prompts greedily (EOS ignored) at each
batch size B of `--batch_sizes`: the first max(B, 8) prompts, B at a time (one `generate` call per group). Prints a
table and writes JSON: tokens/s, the ratio to vLLM's own model at the same batch, the share of decode tokens (and
decode steps) that left early, and how many sequences came out identical to vLLM's own. `--hf` adds plain HF
`generate()` (the vLLM venv's transformers; left-padded batches) as a row.

    python -c "import json; from hf_earlyexit.evaluation.bench import BENCH_PROMPTS as P; print(json.dumps(P))" \
        > prompts.json                               # in the hf-earlyexit venv: the varied held-out prompts
    python docs/bench/vllm_earlyexit.py --base BASE_FOLDER --heads HEADS_FOLDER --prompts prompts.json \
        --dtype bfloat16 --output vllm_bf16.json     # in the vLLM venv

Batch 32 needs 32 prompts: `docs/bench/vllm_prompts.py` writes the 8 varied bench prompts followed by the openings of
held-out PIQA questions (../shared/data), which no shipped heads were trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def batches(prompts: list[str], size: int) -> list[list[str]]:
    """Batch `size`'s groups: the first max(size, 8) prompts, `size` at a time."""
    chosen = prompts[:max(size, 8)]
    return [chosen[i:i + size] for i in range(0, len(chosen), size)]


def _spec_counts(llm) -> dict:
    """vLLM's speculative-decoding counters so far (draft tokens proposed and accepted)."""
    names = {"vllm:spec_decode_num_draft_tokens": "drafted", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def run(name: str, args, earlyexit: dict | None, prompts: list[str], speculative: dict | None = None,
        one_kv_group: bool = False) -> dict:
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
        kwargs["disable_log_stats"] = False  # for the acceptance counters
    if one_kv_group:  # vLLM's drafters need every layer in one KV cache group (Gemma 3 has sliding + full)
        kwargs["disable_hybrid_kv_cache_manager"] = True
    llm = LLM(model=args.base, dtype=args.dtype, enforce_eager=True, max_model_len=1024, seed=0, **kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        before = hf_earlyexit_vllm.exit_stats(llm)[0] if earlyexit is not None else None
        counted = _spec_counts(llm) if speculative is not None else None
        result = {"name": name, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()}
        tokens = {}
        for size in args.batch_sizes:
            batch = str(size)
            start = time.perf_counter()
            outs = [o for group in batches(prompts, size) for o in llm.generate(group, params, use_tqdm=False)]
            seconds = time.perf_counter() - start
            tokens[batch] = [list(o.outputs[0].token_ids) for o in outs]
            result[f"batch_{batch}"] = {"seconds": seconds,
                                        "tokens_per_s": sum(map(len, tokens[batch])) / seconds}
            if counted is not None:
                now = _spec_counts(llm)
                result[f"batch_{batch}"]["acceptance"] = (now["accepted"] - counted["accepted"]) / max(
                    now["drafted"] - counted["drafted"], 1)
                counted = now
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


def run_hf(args, prompts: list[str]) -> dict:
    """Plain HF `generate()` (greedy, EOS ignored, left-padded batches) on the same base folder, prompts and batches."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.base, padding_side="left")
    result = {"name": f"HF generate() (transformers {transformers.__version__})",
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}

    def generate(group: list[str], new: int) -> list[list[int]]:
        enc = tokenizer(group, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    generate(prompts[:1], 8)  # warm-up
    tokens = {}
    for size in args.batch_sizes:
        start = time.perf_counter()
        tokens[str(size)] = [t for group in batches(prompts, size) for t in generate(group, args.max_new_tokens)]
        seconds = time.perf_counter() - start
        result[f"batch_{size}"] = {"seconds": seconds, "tokens_per_s": sum(map(len, tokens[str(size)])) / seconds}
    result["tokens"] = tokens
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base model folder (HF layout) vLLM loads")
    parser.add_argument("--heads", required=True, help="an hf-earlyexit heads folder for that base")
    parser.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--eps", type=float, nargs="*", default=[0.9], help="plugin runs at these ε (none: --eps)")
    parser.add_argument("--exits", type=int, nargs="*", default=None,
                        help="also run each ε with only these exit layers checked (e.g. 12 15)")
    parser.add_argument("--max_batch", type=int, nargs="*", default=[],
                        help="also run each ε with exits checked only at decode steps of at most this many sequences")
    parser.add_argument("--batch_exit", nargs="+", default=["step"], choices=["step", "row"],
                        help="the batch rules to run each ε with: step (the whole batch leaves together) and/or row "
                             "(each sequence leaves at its own exit)")
    parser.add_argument("--ngram", action="store_true", help="also run vLLM's own n-gram speculative decoding")
    parser.add_argument("--draft", nargs="*", default=[], metavar="EXIT:K",
                        help="also run lossless speculative decoding drafted by the layers below EXIT and its head, K "
                             "tokens a round (vLLM's draft-model hook; with vLLM's own model again in one KV cache "
                             "group, as the drafter needs)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8],
                        help="decode batch sizes (batch B decodes the first max(B, 8) prompts, B at a time)")
    parser.add_argument("--hf", action="store_true", help="also time plain HF generate() on the same prompts")
    parser.add_argument("--baseline_again", action="store_true",
                        help="run vLLM's own model once more at the end (order effects show as its two rows' gap)")
    parser.add_argument("--every_exit", action=argparse.BooleanOptionalAction, default=True,
                        help="run each ε with every exit checked (--no-every_exit: only the --exits runs)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SystemExit(f"--prompts {args.prompts}: expected a JSON list of non-empty strings")
    if len(prompts) < max(max(args.batch_sizes), 8):
        raise SystemExit(f"--batch_sizes {args.batch_sizes} need {max(max(args.batch_sizes), 8)} prompts; "
                         f"{args.prompts} has {len(prompts)}")
    runs = [run("vLLM Gemma3ForCausalLM", args, None, prompts)]
    if args.hf:
        runs.append(run_hf(args, prompts))
    if args.ngram:
        runs.append(run("vLLM n-gram speculative (4 tokens, lossless)", args, None, prompts,
                        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                         "prompt_lookup_min": 2}))
    if args.draft:
        import tempfile

        import hf_earlyexit_vllm

        runs.append(run("vLLM's own, one KV cache group", args, None, prompts, one_kv_group=True))
        for item in args.draft:
            exit_layer, count = (int(x) for x in item.split(":"))
            folder = hf_earlyexit_vllm.write_draft_folder(args.base, args.heads, exit_layer,
                                                          tempfile.mkdtemp(prefix=f"draft{exit_layer}-"))
            runs.append(run(f"drafter exit {exit_layer}, {count} tokens (lossless)", args, None, prompts,
                            {"method": "draft_model", "model": folder, "num_speculative_tokens": count},
                            one_kv_group=True))
    for eps in args.eps:
        for rule in args.batch_exit:
            named = "" if args.batch_exit == ["step"] else f", {rule} rule"
            if args.every_exit or not args.exits:
                runs.append(run(f"plugin ε={eps:g}, every exit{named}", args,
                                {"eps": eps, "max_batch": None, "batch_exit": rule}, prompts))
            if args.exits:
                runs.append(run(f"plugin ε={eps:g}, exits {args.exits}{named}", args,
                                {"eps": eps, "exits": args.exits, "max_batch": None, "batch_exit": rule}, prompts))
        for limit in args.max_batch:
            chosen = {"exits": args.exits} if args.exits else {}
            runs.append(run(f"plugin ε={eps:g}, {'exits ' + str(args.exits) if args.exits else 'every exit'}, "
                            f"max_batch {limit}", args, {"eps": eps, **chosen, "max_batch": limit}, prompts))
    if args.baseline_again:
        runs.append(run("vLLM Gemma3ForCausalLM (again, last)", args, None, prompts))
    plain = runs[0]
    print(f"{args.dtype}, batches {args.batch_sizes} of the first max(B, 8) of {len(prompts)} prompts x "
          f"{args.max_new_tokens} new tokens, torch CPU capability "
          f"{plain['torch_cpu_capability']}, {plain['threads']} threads")
    print()
    sizes = [str(b) for b in args.batch_sizes]
    head = " | ".join(f"batch {b} tok/s | vs vLLM" for b in sizes)
    print(f"| run | {head} | tokens (steps) that left early, b{' / b'.join(sizes)} "
          f"| identical to vLLM (b{' / b'.join(sizes)}) |")
    print("|---|" + "---|" * (2 * len(sizes) + 2))
    for r in runs:
        cells = []
        for batch in sizes:
            speed = r[f"batch_{batch}"]["tokens_per_s"]
            cells += [f"{speed:.1f}", f"{speed / plain[f'batch_{batch}']['tokens_per_s']:.2f}x"]
        share = " / ".join(f"{r[f'batch_{b}']['exit_share']:.0%}" if "exit_share" in r[f"batch_{b}"] else "–"
                           for b in sizes)
        if "early_step_share" in r[f"batch_{sizes[0]}"]:
            share += " (" + " / ".join(f"{r[f'batch_{b}']['early_step_share']:.0%}" for b in sizes) + ")"
        if "acceptance" in r[f"batch_{sizes[0]}"]:
            share = "accepted " + " / ".join(f"{r[f'batch_{b}']['acceptance']:.0%}" for b in sizes)
        same = " / ".join(f"{sum(a == b for a, b in zip(r['tokens'][k], plain['tokens'][k], strict=True))}/"
                          f"{len(plain['tokens'][k])}" for k in sizes)
        print(f"| {r['name']} | {' | '.join(cells)} | {share} | {same} |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            # prompts by hash only: past the 8 bench prompts they are benchmark questions, which stay out of the repo
            json.dump({"dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompts_source": args.prompts,
                       "prompts_sha256": [hashlib.sha256(p.encode()).hexdigest() for p in prompts], "runs": runs},
                      f, indent=1)


if __name__ == "__main__":
    main()
