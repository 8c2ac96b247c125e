"""hf-earlyexit's own early-exit decoding of some token prompts, as JSON on stdout: the oracle the plugin's tests
compare vLLM's tokens with. Runs in an environment with hf-earlyexit installed (not the vLLM one):

    python hf_oracle.py HEADS EPS MAX_NEW_TOKENS BATCHED [BATCH_EXIT] < prompts.json > tokens.json

`prompts.json` is a list of token-id lists; BATCHED=1 decodes them as one left-padded batch under BATCH_EXIT (default
the iteration-level rule `step`; `row`: each row leaves the batch at its own exit), 0 one at a time. Skipped layers'
KV cache: `kv_fill="propagate"` (what the plugin does); every calibrated exit checked (`exit_policy="all"`); greedy,
float32, EOS ignored."""

import json
import sys

import torch

import hf_earlyexit


def main() -> None:
    heads, eps, max_new, batched = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    batch_exit = sys.argv[5] if len(sys.argv) > 5 else "step"
    prompts = json.load(sys.stdin)
    model = hf_earlyexit.EarlyExitForCausalLM.from_pretrained(heads).float()  # a folder: no tokenizer needed
    options = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, mode="early_exit", eps=eps,
                   kv_fill="propagate", exit_policy="all", pad_token_id=0)
    groups = [prompts] if batched else [[p] for p in prompts]
    out = []
    for group in groups:
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        if batched:
            options["batch_exit"] = batch_exit
        with torch.no_grad():
            sequences = model.generate(input_ids=ids, attention_mask=mask, **options)
        out += [row[width:].tolist() for row in sequences]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
