"""Tiny random models of every supported family, built in code (no downloads)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
    PreTrainedModel,
    Qwen3Config,
)

VOCAB = 97


def _llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )


def _qwen3() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )


def _gemma3() -> Gemma3TextConfig:
    # a sliding window of 4 so that the tests cross it; every second layer full attention
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=30.0,
    )


def _gpt_neox() -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
    )


def _gpt2() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)


def _phi() -> PhiConfig:
    return PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5,
    )


CONFIGS = {
    "llama": _llama,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "phi": _phi,
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa") -> PreTrainedModel:
    """A randomly initialised tiny causal LM of family `arch`, fp32, eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random `input_ids`, `attention_mask` `(len(lengths), max(lengths))`."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        ids[row, : width - n] = 0
    return ids, mask


def tiny_tokenizer():
    """A character-level fast tokenizer over `VOCAB` ids (0 pad, 1 bos, 2 eos, 3 unk), built in code."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;!?'\"()-_/+*=<>[]{}#@&%$\n")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in chars[: VOCAB - len(vocab)]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def save_tiny_base(arch: str, folder, seed: int = 0, attn: str = "sdpa") -> str:
    """Save a tiny model of family `arch` and the tiny tokenizer into `folder`; return its path as a string."""
    model = tiny_model(arch, seed=seed, attn=attn)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def launch_two_cpu_ranks(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch -m <module> <args>` on 2 CPU processes (gloo).

    accelerate 1.15's `--cpu` starts ONE process (its multi-CPU launcher is mpirun); two come from `--multi_gpu`
    (torchrun) with `ACCELERATE_USE_CPU=1`.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", module]
    return subprocess.run([*launch, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


class WeightReads(torch.overrides.TorchFunctionMode):
    """Inside `with WeightReads(weight) as reads:`, every `F.linear` call that reads rows of `weight` (the weight
    itself or a slice of its rows, as `nn.Linear` and a streamed LM head do): `reads.calls` holds per call
    `(input positions, first row, rows)`. Observes only; every call runs as it would."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.calls = weight, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if w.untyped_storage().data_ptr() == self.weight.untyped_storage().data_ptr():
                first = (w.storage_offset() - self.weight.storage_offset()) // self.weight.stride(0)
                self.calls.append((x.numel() // x.shape[-1], first, w.shape[0]))
        return func(*args, **kwargs)

    def positions(self) -> int:
        """How many positions the whole weight was read for (each row of it once per position, any split)."""
        rows = sum(n * r for n, _, r in self.calls)
        assert rows % self.weight.shape[0] == 0, self.calls
        return rows // self.weight.shape[0]
