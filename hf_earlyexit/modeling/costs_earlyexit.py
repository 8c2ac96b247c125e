"""The cost model: what one token costs in every part early-exit decoding can run (portable: torch + siblings).

Costs are weight multiply-adds and bytes of weights read per token (attention over the context, which grows with
the sequence, is not counted). Decoding one token at a time is bound by reading weights; scoring and verifying many
positions at once by multiply-adds. Everything that prices work (the cost table, the exit policy, the decoders'
statistics, lm-eval's exit report) reads it from one `CostModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Cost:
    """Per-token cost of a module: weight multiply-adds and bytes of weights read."""

    macs: int
    weight_bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.weight_bytes + other.weight_bytes)


ZERO = Cost(0, 0)


def module_cost(module: nn.Module) -> Cost:
    """Cost of one token through `module`: every matrix is one multiply-add per element."""
    params = list(module.parameters())
    macs = sum(p.numel() for p in params if p.dim() >= 2)
    return Cost(macs=macs, weight_bytes=sum(p.numel() * p.element_size() for p in params))


def total(costs: list[Cost]) -> Cost:
    return sum(costs, ZERO)


class CostModel:
    """Per-token costs of one model with exit heads.

    Args:
        model: an `EarlyExitForCausalLM` (its engine, exits and heads are read once).
    """

    def __init__(self, model) -> None:
        parts = model.engine.parts
        self.exit_layers: list[int] = list(model.config.exit_layers)
        self.layers: list[Cost] = [module_cost(layer) for layer in parts.layers]
        # a head's own part (norm, adapter, its rows of the LM head), and its context block where it has one: the
        # engine runs a block for every position (counted as the engine's layer `L + m`), the rest per check
        self.tails: list[Cost] = [head.cost() for head in model.exit_heads]
        self.contexts: list[Cost] = [head.context_cost() for head in model.exit_heads if head.has_context]
        self.heads: list[Cost] = [head.cost() + head.context_cost() for head in model.exit_heads]
        self.final: Cost = module_cost(parts.norm) + module_cost(parts.lm_head)
        self._engine = model.engine
        self._kv: list[Cost] | None = None

    @property
    def full(self) -> Cost:
        """One token through the whole model and its LM head."""
        return total(self.layers) + self.final

    def kv(self) -> list[Cost]:
        """Per decoder layer, a KV-only pass (input norm + key/value projections) of one token: measured once with
        torch's flop counter on a throw-away one-token state."""
        if self._kv is None:
            from torch.utils.flop_counter import FlopCounterMode

            engine = self._engine
            weight = engine.parts.embed.weight
            state = engine.start(torch.zeros(1, 1, dtype=torch.long, device=weight.device))
            embedded = engine.run_to(state, 0)  # (1, 1, hidden): what enters layer 0; no layer runs
            macs = []
            for i in range(engine.num_layers):  # each layer still has the token to write: one KV-only pass each
                with FlopCounterMode(display=False) as counter:
                    engine.write_kv(state, i, embedded)
                macs.append(counter.get_total_flops() // 2)
            self._kv = [Cost(m, m * weight.element_size()) for m in macs]
        return self._kv

    def table(self) -> list[dict[str, int]]:
        """Per exit, then the full model: layers run, their MACs, the head's MACs, the total and weight bytes."""
        rows = []
        for j, layer in enumerate(self.exit_layers):
            rows.append(_row(f"exit@{layer}", layer, total(self.layers[:layer]), self.heads[j]))
        rows.append(_row("full", len(self.layers), total(self.layers), self.final))
        return rows

    def scoring_macs(self) -> list[int]:
        """MACs of a position that leaves at each exit after checking every exit below it (then the full model,
        having checked them all): what token-by-token decoding would spend on it."""
        checked, out = 0, []
        for j, layer in enumerate(self.exit_layers):
            checked += self.heads[j].macs
            out.append(total(self.layers[:layer]).macs + checked)
        out.append(self.full.macs + checked)
        return out


def _row(name: str, layers: int, body: Cost, head: Cost) -> dict:
    return {
        "exit": name, "layers": layers, "layer_macs": body.macs, "head_macs": head.macs,
        "total_macs": body.macs + head.macs, "weight_bytes": body.weight_bytes + head.weight_bytes,
    }
