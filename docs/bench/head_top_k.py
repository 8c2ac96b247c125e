"""How often the full model's next token is among a heads folder's top k at each exit (k = 1..4), teacher-forced:
what drafts of more than one candidate per position (a draft tree) could keep.

Held-out real text as `hf-earlyexit agreement` reads it (WinoGrande dev, PIQA valid, ARC-Easy dev, first 8,192 tokens
in windows of 128) and the model's greedy continuations (64 tokens) of the 8 prompts of `head_inputs.py`.

    python docs/bench/head_top_k.py --model shipped --data ../shared/data --output docs/bench/head_top_k_xeon.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hf_earlyexit import load
from hf_earlyexit.evaluation.agreement import continuations
from hf_earlyexit.training.data import Corpus

sys.path.insert(0, str(Path(__file__).parent))
from head_inputs import PROMPTS, held_out_real  # noqa: E402

TOP = 4


@torch.no_grad()
def hits(model, corpus: Corpus, keep: torch.Tensor, batch_size: int = 8) -> dict[str, list[float]]:
    """`{"exit K": [share in the top 1, ..., top TOP]}` over the positions `keep`."""
    found = torch.zeros(len(model.exit_heads), TOP)
    count = 0
    for start in range(0, len(corpus), batch_size):
        rows = slice(start, start + batch_size)
        out = model(corpus.input_ids[rows], attention_mask=corpus.attention_mask[rows], output_hidden_states=True)
        wanted = out.logits.argmax(-1)
        where = keep[rows]
        count += int(where.sum())
        for j, head in enumerate(model.exit_heads):
            candidates = head.to_token_ids(out.exit_logits[j].topk(TOP, dim=-1).indices)  # OTHER maps to -1
            inside = (candidates == wanted[..., None]).cumsum(-1).clamp(max=1)[where]
            found[j] += inside.sum(0).float()
    return {f"exit {k}": (found[j] / count).tolist() for j, k in enumerate(model.config.exit_layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = load(args.model, dtype=torch.float32)
    real = held_out_real(args.data, tokenizer)
    cont, scored = continuations(model, tokenizer, PROMPTS, 64)
    result = {"model": args.model, "real text": hits(model, real, real.attention_mask.bool()),
              "continuations": hits(model, cont, scored & cont.attention_mask.bool()),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    for kind in ("real text", "continuations"):
        print(kind)
        for name, row in result[kind].items():
            print(f"  {name:8s} top 1..{TOP}: " + " / ".join(f"{v:.3f}" for v in row))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
