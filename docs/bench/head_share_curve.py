"""Each exit head of a heads folder, alone, as a confidence-gated drafter on the model's greedy continuations of the
bench's prompts (teacher-forced): the share of positions whose confidence (the folder's metric) clears a threshold,
and how often the head's token is then the full model's. The points to read against the bench's imperfect oracles
(`hf-earlyexit bench --oracle_mix EXIT:DRAFTED:KEPT`), which time DSSD with drafts of exactly such a quality.

    python docs/bench/head_share_curve.py --model shipped --output docs/bench/head_share_curve_xeon.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_earlyexit import load
from hf_earlyexit.evaluation.agreement import continuations
from hf_earlyexit.evaluation.bench import BENCH_PROMPTS
from hf_earlyexit.modeling.metrics_earlyexit import confidence

SHARES = (0.1, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = load(args.model, dtype=torch.float32)
    corpus, scored = continuations(model, tokenizer, list(BENCH_PROMPTS), args.max_new_tokens)
    out = model(corpus.input_ids, attention_mask=corpus.attention_mask, output_hidden_states=True)
    keep = scored & corpus.attention_mask.bool()
    wanted = out.logits.argmax(-1)[keep]
    metric = model.config.metric
    result = {"model": args.model, "metric": metric, "positions": int(keep.sum()), "exits": {},
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    for j, (layer, head) in enumerate(zip(model.config.exit_layers, model.exit_heads, strict=True)):
        logits = out.exit_logits[j][keep].float()
        score = confidence(metric, logits=logits)
        right = (head.to_token_ids(logits.argmax(-1)) == wanted).float()
        order = score.argsort(descending=True)
        rows = []
        for share in SHARES:
            top = order[: max(1, round(share * len(order)))]
            rows.append({"share": share, "right": float(right[top].mean()), "threshold": float(score[top].min())})
        result["exits"][f"exit {layer}"] = rows
        print(f"exit {layer}: " + "  ".join(f"{r['share']:.0%} drafted -> {r['right']:.3f} right" for r in rows))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
