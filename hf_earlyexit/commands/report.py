"""Human-readable summaries of a model with exit heads."""

from __future__ import annotations

from ..modeling.modeling_earlyexit import EarlyExitForCausalLM


def print_model_info(model: EarlyExitForCausalLM) -> None:
    """Print the base model, the exits and the per-token cost of stopping at each exit."""
    config = model.config
    text = config.text_config
    vocab = config.draft_vocab_size or text.vocab_size
    print(f"base: {config.base_model_name_or_path} (revision {config.base_revision or '-'}), "
          f"{text.model_type}, {model.num_layers} layers, hidden {text.hidden_size}, vocab {text.vocab_size}, "
          f"dtype {model.backbone.dtype}")
    print(f"exits: after layers {config.exit_layers}; head {config.head_type} over {vocab} tokens; "
          f"metric {config.metric}; calibrated eps: {sorted(config.thresholds or {}) or 'none'}")
    print(cost_table_text(model))


def cost_table_text(model: EarlyExitForCausalLM) -> str:
    """The per-exit cost table as text: weight multiply-adds per token, relative to the full model."""
    rows = model.cost_table()
    full = rows[-1]["total_macs"]
    lines = [f"{'exit':<10}{'layers':>7}{'layer MMAC':>12}{'head MMAC':>11}{'total MMAC':>12}{'vs full':>9}{'MB':>9}"]
    for row in rows:
        lines.append(
            f"{row['exit']:<10}{row['layers']:>7}{row['layer_macs'] / 1e6:>12.2f}{row['head_macs'] / 1e6:>11.2f}"
            f"{row['total_macs'] / 1e6:>12.2f}{row['total_macs'] / full:>9.2f}{row['weight_bytes'] / 2**20:>9.1f}"
        )
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table of `rows` (floats with 3 decimals)."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)
