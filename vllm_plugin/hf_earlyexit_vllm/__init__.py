"""hf-earlyexit heads inside vLLM (a `vllm.general_plugins` entry point).

    from vllm import LLM
    llm = LLM(model=BASE_FOLDER, hf_overrides={
        "architectures": ["Gemma3EarlyExitForCausalLM"],
        "earlyexit": {"heads": HEADS_FOLDER, "eps": 0.9}},
        worker_extension_cls=hf_earlyexit_vllm.WORKER_EXTENSION)  # for exit_stats
    ...
    print(hf_earlyexit_vllm.exit_stats(llm))

`earlyexit` settings: `heads` (a local hf-earlyexit heads folder for this base), `eps` (a calibrated accuracy target;
1 = vLLM's own model), `exits` (the exit layers to check; default every exit with a threshold at `eps`), `log_every`
(log exit counts every N decode steps; 0: never), `max_batch` (decode steps of more sequences check no exit and run
every layer; `None`: no limit), `batch_exit` (`"step"`: the whole decode batch leaves together; `"row"`: each sequence
leaves at its own exit), `draft_exit` (make the model a drafter from that exit for vLLM's lossless speculative
decoding; see `write_draft_folder`), `ignore_base_mismatch` (use heads trained on other base weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ARCHITECTURES = {  # our class -> (where it lives, the vLLM architecture it extends)
    f"{family}EarlyExitForCausalLM": (f"hf_earlyexit_vllm.families:{family}EarlyExitForCausalLM", base)
    for family, base in (("Gemma3", "Gemma3ForCausalLM"), ("Llama", "LlamaForCausalLM"),
                         ("Qwen2", "Qwen2ForCausalLM"), ("Qwen3", "Qwen3ForCausalLM"), ("GPT2", "GPT2LMHeadModel"),
                         ("GPTNeoX", "GPTNeoXForCausalLM"), ("Phi", "PhiForCausalLM"))
}
HEADS_ENV = "HF_EARLYEXIT_VLLM_HEADS"  # set: the plugin takes the place of the base architectures it extends


def register() -> None:
    """Register the early-exit model classes with vLLM (called by vLLM in every process through the entry point).

    With `HF_EARLYEXIT_VLLM_HEADS` set, they also replace the vLLM classes they extend, so any front end that builds
    an engine from a plain base folder (`vllm serve`, `lm_eval --model vllm`) runs with exits; the other settings
    then come from `HF_EARLYEXIT_VLLM_EPS`, `HF_EARLYEXIT_VLLM_EXITS` (comma-separated exit layers),
    `HF_EARLYEXIT_VLLM_LOG_EVERY` and `HF_EARLYEXIT_VLLM_MAX_BATCH`.
    """
    from vllm import ModelRegistry

    replace = bool(os.environ.get(HEADS_ENV))
    for name, (target, base) in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
        if replace:
            ModelRegistry.register_model(base, target)


def write_draft_folder(base: str | os.PathLike, heads: str | os.PathLike, exit_layer: int,
                       out: str | os.PathLike) -> str:
    """A folder vLLM loads as a draft model for lossless speculative decoding from one exit of `heads`:

        LLM(model=base, speculative_config={"method": "draft_model", "num_speculative_tokens": 3,
                                            "model": write_draft_folder(base, heads, 4, "draft-4")})

    It holds the base's `config.json` with this plugin's class for the family and `earlyexit: {"heads": ...,
    "draft_exit": exit_layer}`, and links to the base's other files (weights, tokenizer). The drafter runs the layers
    below the exit and the exit's head; vLLM's target model verifies every draft, so the output is its own."""
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
        raise ValueError(f"exit_layer={exit_layer!r}: expected the layer number of one of the heads' exits")
    base_path, folder = Path(base).resolve(), Path(out)
    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    ours = {family_base: name for name, (_, family_base) in ARCHITECTURES.items()}
    named = [ours[a] for a in config.get("architectures") or [] if a in ours]
    if not named:
        raise ValueError(f"{base_path}: architectures {config.get('architectures')} have no early-exit class here "
                         f"(expected one of {', '.join(sorted(ours))})")
    folder.mkdir(parents=True, exist_ok=True)
    config["architectures"] = named[:1]
    config["earlyexit"] = {"heads": str(Path(heads).resolve()), "draft_exit": exit_layer}
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    for item in base_path.iterdir():
        link = folder / item.name
        if item.is_file() and item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    return str(folder)


WORKER_EXTENSION = "hf_earlyexit_vllm.EarlyExitWorker"


class EarlyExitWorker:
    """vLLM worker extension (`LLM(..., worker_extension_cls=hf_earlyexit_vllm.WORKER_EXTENSION)`): lets
    `exit_stats(llm)` read the exit counts from the worker processes."""

    def earlyexit_stats(self) -> dict:
        model = self.model_runner.get_model()
        if not hasattr(model, "earlyexit_stats"):
            raise TypeError(f"{type(model).__name__} is not an hf-earlyexit model (pick one with hf_overrides="
                            f"{{'architectures': [...]}})")
        return model.earlyexit_stats()


def exit_stats(llm) -> list[dict]:
    """Exit counts of every worker of a vLLM `LLM` running an early-exit model, made with
    `worker_extension_cls=WORKER_EXTENSION` (one dict per worker: decode steps, decode tokens, tokens per exit
    layer, tokens that ran the full model, the share that left early)."""
    return llm.collective_rpc("earlyexit_stats")
