"""The early-exit model classes, one per vLLM family class: the shared mechanism (`model.EarlyExitMixin`) in front of
vLLM's own class."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM

from .model import EarlyExitMixin


class Gemma3EarlyExitForCausalLM(EarlyExitMixin, Gemma3ForCausalLM):
    """vLLM's Gemma 3 with hf-earlyexit heads (`hf_overrides={"architectures": ["Gemma3EarlyExitForCausalLM"],
    "earlyexit": {"heads": ..., "eps": ...}}`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._ee_init(vllm_config, prefix)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if not self.ee_active:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return self._ee_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if not self.ee_active:
            return super().compute_logits(hidden_states)
        return self._ee_logits(hidden_states, lambda: super(Gemma3EarlyExitForCausalLM, self).compute_logits(
            hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self._ee_load_weights(weights, super().load_weights)
