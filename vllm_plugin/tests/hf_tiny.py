"""A tiny random base model of one family and trained-looking heads for it, written by hf-earlyexit (run where it is
installed, not in the vLLM venv): the plugin's family tests load both in vLLM and compare with hf-earlyexit's own
decoding (`hf_oracle.py`).

    python hf_tiny.py FAMILY OUT_DIR      # prints {"base": ..., "heads": ...}

FAMILY: llama | qwen2 | qwen3 | gpt2 | gpt_neox | phi.

The base has head size 64 (vLLM's CPU attention needs one of its sizes) and no tokenizer (prompts are token ids).
The heads are context heads over a 416-token draft vocabulary with their weights moved off their start, and
thresholds at ε 0.5 set to the 30th percentile of each exit's confidence on random text, so many tokens exit.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.modeling.metrics_earlyexit import confidence

SIZES = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES),
    "qwen2": lambda: Qwen2Config(**SIZES, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**SIZES, head_dim=64),
    "gpt2": lambda: GPT2Config(vocab_size=512, n_embd=128, n_inner=256, n_layer=4, n_head=2, n_positions=512,
                               bos_token_id=0, eos_token_id=0),
    # partial rotary in both; GPT-NeoX's fused qkv is interleaved per head, Phi's layers are parallel (attention and
    # MLP on the same normed input)
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=2, max_position_embeddings=512, rotary_pct=0.5),
    "phi": lambda: PhiConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=2, max_position_embeddings=512, partial_rotary_factor=0.5),
}


def main() -> None:
    family, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    base.save_pretrained(out / "base")
    base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    model = EarlyExitForCausalLM.from_base(base, exit_layers=[1, 2], head="context", adapter_rank=8,
                                           draft_token_ids=list(range(24, 440)), metric="max_prob")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ids = torch.randint(0, 512, (4, 48), generator=gen)
        scores = [confidence("max_prob", logits=x[:, 8:].flatten(0, 1)) for x in model(ids).exit_logits]
    model.config.thresholds = {"0.5": [float(s.quantile(0.3)) for s in scores]}
    model.save_pretrained(out / "heads")
    json.dump({"base": str(out / "base"), "heads": str(out / "heads")}, sys.stdout)


if __name__ == "__main__":
    main()
