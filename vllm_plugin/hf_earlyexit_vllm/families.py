"""The early-exit model classes, one per vLLM family class, all the same mechanism (`model.EarlyExitMixin`) in front
of vLLM's own class; a family's layout (`model.ResidualLayers`, `model.PlainLayers`) says where its parts are and
how its layers are called: Gemma 3, Llama, Qwen 2, Qwen 3 (layers with a residual stream, rotary positions), GPT-2
(blocks on the hidden state alone, learned positions), and GPT-NeoX and Phi, which vLLM serves through its Transformers
backend (transformers' own modules with vLLM's attention): one class there, named once per family."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.transformers import TransformersForCausalLM

from .model import EarlyExitMixin, PlainLayers, ResidualLayers, TransformersLayers


def early_exit_class(base: type, name: str, layout: type[ResidualLayers] = ResidualLayers) -> type:
    """`base` (a vLLM `*ForCausalLM`) with hf-earlyexit heads, selected by `hf_overrides={"architectures": [name],
    "earlyexit": {...}}`; `layout`: where the family keeps its parts and how its layers are called."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self._ee_init(vllm_config, prefix)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if not self.ee_active:
            return base.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return self._ee_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if not self.ee_active:
            return base.compute_logits(self, hidden_states)
        return self._ee_logits(hidden_states, lambda h: base.compute_logits(self, h))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self._ee_load_weights(weights, lambda stream: base.load_weights(self, stream))

    methods = {"__init__": __init__, "forward": forward, "compute_logits": compute_logits,
               "load_weights": load_weights, "ee_layout": layout, "__module__": __name__,
               "__doc__": f"vLLM's {base.__name__} with hf-earlyexit heads."}
    if hasattr(base, "_create_hf_to_vllm_mapper"):  # the Transformers backend
        def _create_hf_to_vllm_mapper(self) -> None:
            # the backend takes checkpoint renamings (GPT-NeoX: `embed_out` -> `lm_head`) from the architecture
            # names in the config: show it the family's own name, not ours
            config = self.config
            names = config.architectures
            config.architectures = [a.replace("EarlyExit", "") for a in names or []]
            try:
                base._create_hf_to_vllm_mapper(self)
            finally:
                config.architectures = names

        methods["_create_hf_to_vllm_mapper"] = _create_hf_to_vllm_mapper
    return type(name, (EarlyExitMixin, base), methods)


Gemma3EarlyExitForCausalLM = early_exit_class(Gemma3ForCausalLM, "Gemma3EarlyExitForCausalLM")
LlamaEarlyExitForCausalLM = early_exit_class(LlamaForCausalLM, "LlamaEarlyExitForCausalLM")
Qwen2EarlyExitForCausalLM = early_exit_class(Qwen2ForCausalLM, "Qwen2EarlyExitForCausalLM")
Qwen3EarlyExitForCausalLM = early_exit_class(Qwen3ForCausalLM, "Qwen3EarlyExitForCausalLM")
GPT2EarlyExitForCausalLM = early_exit_class(GPT2LMHeadModel, "GPT2EarlyExitForCausalLM", PlainLayers)
# one class for every family of the Transformers backend, named per family (the name picks the checkpoint renamings)
GPTNeoXEarlyExitForCausalLM = early_exit_class(TransformersForCausalLM, "GPTNeoXEarlyExitForCausalLM",
                                               TransformersLayers)
PhiEarlyExitForCausalLM = early_exit_class(TransformersForCausalLM, "PhiEarlyExitForCausalLM", TransformersLayers)
