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
every layer; `None`: no limit), `ignore_base_mismatch` (use heads trained on other base weights).
"""

from __future__ import annotations

import os

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
