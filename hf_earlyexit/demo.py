"""The main job's demo: the embedded default with exit heads, their costs and a generation."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .report import print_model_info

if TYPE_CHECKING:
    from .cli import DemoArgs


def run_demo(args: DemoArgs) -> None:
    """Load `args.model`, print its exits and costs, how often each exit agrees with the full model on the prompt,
    and a greedy generation."""
    model, tokenizer = args.load()
    print_model_info(model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
        final = out.logits.argmax(-1)  # (1, seq)
        print("\nagreement of each exit's top-1 with the full model over the prompt positions:")
        for layer, head, logits in zip(model.config.exit_layers, model.exit_heads, out.exit_logits, strict=False):
            agree = (head.to_token_ids(logits.argmax(-1)) == final).float().mean().item()
            print(f"  exit@{layer}: {agree:.0%}")
        start = time.perf_counter()
        ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    new = ids.shape[1] - inputs["input_ids"].shape[1]
    text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\ngreedy generation ({new} tokens, {new / seconds:.1f} tok/s):\n{args.prompt}{text}")
