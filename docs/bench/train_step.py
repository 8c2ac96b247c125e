"""Seconds per head-training step on the embedded model, measured side by side in one process.

The shipped recipe's heads (context heads after layers 4/8/12/15, rank-N blocks or full blocks, rank-64 adapter, 16k
draft vocabulary), one batch of random features (batch x 128 positions) and top-64 targets, AdamW, in fp32 and in
bf16 autocast, three ways to compute the same top-k loss:

- `log-softmax`: `lam=1e-12` (the same loss up to 1e-12), through a log-softmax, an entropy and a gather kept for
  the backward pass;
- `fused`: the fused top-k cross-entropy on each head's whole logits (`sparse_head_loss`, `lam=0`);
- `sliced`: what training runs now (`linear_topk_loss`): the LM head's product and the loss a slice of positions at
  a time, the input gradient taken in the same pass.

    python docs/bench/train_step.py --rank 0 --rounds 2 --output docs/bench/train_step_epyc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_earlyexit.modeling.base_earlyexit import EMBEDDED, load_base_model, load_tokenizer
from hf_earlyexit.modeling.modeling_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.training.features import SparseTargets
from hf_earlyexit.training.losses import sparse_head_loss
from hf_earlyexit.training.teacher import Teacher
from hf_earlyexit.training.train import TrainConfig, batch_losses


def whole_logits_loss(model: EarlyExitForCausalLM, batch: Teacher) -> torch.Tensor:
    """The fused top-k loss on each head's whole logits (the training step before `linear_topk_loss`)."""
    return sum(sparse_head_loss(head(hidden, batch.mask), head, batch.targets, batch.mask, 0.0, False)[0]
               for head, hidden in zip(model.exit_heads, batch.hidden, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32, help="context-block delta rank (0: full trainable blocks)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all modes, interleaved")
    parser.add_argument("--output", default=None, help="write the timings here as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_base_model(EMBEDDED, dtype=torch.float32)
    model = EarlyExitForCausalLM.from_base(
        base, exit_layers=[4, 8, 12, 15], head="context", context_rank=args.rank or None, adapter_rank=64,
        draft_token_ids=list(range(16384)), tokenizer=load_tokenizer(EMBEDDED))
    hidden_size, seq = base.config.get_text_config().hidden_size, 128
    batch = Teacher(
        hidden=[torch.randn(args.batch_size, seq, hidden_size) * 3 for _ in model.exit_heads],
        targets=SparseTargets(torch.randint(0, 262144, (args.batch_size, seq, 64)),
                              torch.randn(args.batch_size, seq, 64).log_softmax(-1)),
        top=torch.randint(0, 16384, (args.batch_size, seq)), mask=torch.ones(args.batch_size, seq, dtype=torch.long))
    params = [p for head in model.exit_heads for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; {sum(p.numel() for p in params):,} trainable parameters")
    modes = [(loss, dtype) for loss in ("log-softmax", "fused", "sliced") for dtype in ("fp32", "bf16")]
    seconds: dict[str, list[float]] = {f"{loss} {dtype}": [] for loss, dtype in modes}
    for round_ in range(args.rounds):
        for loss, dtype in modes:
            config = TrainConfig(loss="topk", lam=1e-12 if loss == "log-softmax" else 0.0)
            times = []
            for _ in range(args.steps + 1):  # the first step warms up
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    if loss == "fused":
                        total = whole_logits_loss(model, batch)
                    else:
                        total, _ = batch_losses(model, batch, config, with_stats=False)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            seconds[f"{loss} {dtype}"].append(round(statistics.median(times[1:]), 3))
            print(f"round {round_}: {loss:11s} {dtype}: {seconds[f'{loss} {dtype}'][-1]:.2f} s/step", flush=True)
    best = {mode: min(times) for mode, times in seconds.items()}
    ratios = {dtype: round(best[f"fused {dtype}"] / best[f"sliced {dtype}"], 2) for dtype in ("fp32", "bf16")}
    print("sliced vs fused (best round each): " + ", ".join(f"{d} {r}x" for d, r in ratios.items()))
    if args.output:
        result = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), **vars(args), "seconds_per_step": seconds,
                  "sliced_speedup": ratios}
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
