"""Self-supervised head training (paper §3.2, eq. 1): heads learn the frozen model's own next-token distributions.

Loss per head k, summed over heads and averaged over real (non-pad) positions:
`(1-λ)·CE(p_model, p_k) − λ·H(p_k)`, or with `loss="kl"` `(1-λ)·KL(p_model ‖ p_k) − λ·H(p_k)`.
Draft-vocabulary heads see the target renormalised over their vocabulary plus one OTHER class holding the
out-of-vocabulary mass. Runs through `accelerate`; checkpoints (safetensors + JSON, no pickles) and resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import Corpus
from .heads_earlyexit import ExitHead
from .modeling_earlyexit import EarlyExitForCausalLM

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LOG_CSV = "train_log.csv"
CURVES_PNG = "training_curves.png"


@dataclass
class TrainConfig:
    """Hyper-parameters of head training (a checkpoint only resumes with the same values)."""

    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-3
    lam: float = 0.95  # the paper's best setting: a high entropy penalty, with heads trained from scratch
    loss: str = "ce"
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "kl"):
            raise ValueError(f"loss={self.loss!r} is not one of ce, kl")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam!r} must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be positive")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of no, bf16, fp16")


# -- loss ----------------------------------------------------------------------------------------------------------


def head_targets(model_probs: Tensor, head: ExitHead) -> Tensor:
    """The model's distribution as the head can express it: `(..., vocab)` -> `(..., head_vocab)`."""
    if not head.is_draft:
        return model_probs
    inside = model_probs[..., head.token_ids]  # (..., draft)
    other = (1.0 - inside.sum(-1, keepdim=True)).clamp(min=0.0)  # (..., 1) out-of-vocabulary mass
    return torch.cat([inside, other], dim=-1)


def head_loss(logits: Tensor, target: Tensor, mask: Tensor, lam: float, kind: str) -> tuple[Tensor, Tensor]:
    """Eq. 1 for one head. `logits`, `target` `(batch, seq, head_vocab)`, `mask` `(batch, seq)`.

    Returns:
        `(loss, entropy)`: the masked mean loss (scalar) and the head's entropy per position `(batch, seq)`.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (batch, seq)
    cross = -(target * logp).sum(-1)  # (batch, seq)
    if kind == "kl":
        cross = cross + (target * target.clamp(min=1e-30).log()).sum(-1)  # CE - H(target)
    per_token = (1.0 - lam) * cross - lam * entropy
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0), entropy


def agreement(head: ExitHead, logits: Tensor, model_logits: Tensor) -> Tensor:
    """`(batch, seq)` bool: the head's top token equals the model's (an OTHER prediction never agrees)."""
    return head.to_token_ids(logits.argmax(-1)) == model_logits.argmax(-1)


def batch_losses(model: EarlyExitForCausalLM, ids: Tensor, mask: Tensor, config: TrainConfig) -> tuple[Tensor, list]:
    """Summed loss over heads for one batch and per-head `{loss, agreement, entropy}`."""
    out = model(ids, attention_mask=mask)
    with torch.no_grad():
        probs = F.softmax(out.logits.float(), dim=-1)  # (batch, seq, vocab)
    total, stats = 0.0, []
    real = mask.bool()
    for head, logits in zip(model.exit_heads, out.exit_logits, strict=True):
        loss, entropy = head_loss(logits, head_targets(probs, head), mask, config.lam, config.loss)
        total = total + loss
        agree = agreement(head, logits.detach(), out.logits)[real].float().mean()
        stats.append({"loss": loss.item(), "agreement": agree.item(), "entropy": entropy.detach()[real].mean().item()})
    return total, stats


# -- evaluation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_heads(model: EarlyExitForCausalLM, corpus: Corpus, batch_size: int = 4) -> list[dict]:
    """Per-head agreement with the model and mean entropy over the real tokens of `corpus`."""
    agree = [0.0] * len(model.exit_heads)
    entropy = [0.0] * len(model.exit_heads)
    count = 0
    for start in range(0, len(corpus), batch_size):
        rows = slice(start, start + batch_size)
        ids, mask = _trim(corpus.input_ids[rows], corpus.attention_mask[rows])
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model(ids, attention_mask=mask)
        real = mask.bool()
        count += int(real.sum())
        for j, (head, logits) in enumerate(zip(model.exit_heads, out.exit_logits, strict=True)):
            agree[j] += agreement(head, logits, out.logits)[real].float().sum().item()
            logp = F.log_softmax(logits.float(), -1)
            entropy[j] += (-(logp.exp() * logp).sum(-1))[real].sum().item()
    return [{"exit": k, "agreement": a / count, "entropy": e / count, "tokens": count}
            for k, a, e in zip(model.config.exit_layers, agree, entropy, strict=True)]


# -- the loop ------------------------------------------------------------------------------------------------------


def train_heads(
    model: EarlyExitForCausalLM, corpus: Corpus, config: TrainConfig, work_dir: str | Path, resume: bool = False,
    held_out: Corpus | None = None,
) -> list[dict]:
    """Train `model`'s heads on `corpus` (the backbone stays frozen); returns the log rows.

    Args:
        work_dir: where checkpoints, the CSV log and the curves plot go.
        resume: continue from `work_dir/checkpoint` (refused if its hyper-parameters differ from `config`).
        held_out: sequences never trained on; when given, every logged step also records each head's agreement and
            mean entropy on them (`held_out_agreement`, `held_out_entropy`), as `evaluate_heads` measures them.
    """
    work_dir = Path(work_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    params = [p for p in model.heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    start, history = 0, []
    if resume:
        start, history = load_checkpoint(work_dir / CHECKPOINT, model, optimizer, config, accelerator)
    elif (work_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{work_dir / CHECKPOINT} exists; pass resume=True (--resume) to continue it, or use "
                              "another work dir")
    bar = tqdm(range(start, config.steps), desc="Training heads", unit="step", initial=start, total=config.steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        ids, mask = _batch_for_step(corpus, step, config, accelerator)
        with accelerator.autocast():
            loss, stats = batch_losses(_unwrap(accelerator, model), ids, mask, config)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        bar.set_postfix(loss=f"{loss.item():.3f}", agree="/".join(f"{s['agreement']:.2f}" for s in stats))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            if held_out is not None:
                stats = _with_held_out(stats, evaluate_heads(_unwrap(accelerator, model), held_out))
            history.extend({"step": step + 1, "exit": k, **s}
                           for k, s in zip(_unwrap(accelerator, model).config.exit_layers, stats, strict=True))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(work_dir / CHECKPOINT, _unwrap(accelerator, model), optimizer, config, step + 1, history,
                            accelerator)
    if accelerator.is_main_process:
        write_log(history, work_dir)
    return history


def _with_held_out(stats: list[dict], report: list[dict]) -> list[dict]:
    """Per-head training stats plus the held-out agreement and entropy of `evaluate_heads`."""
    return [{**s, "held_out_agreement": r["agreement"], "held_out_entropy": r["entropy"]}
            for s, r in zip(stats, report, strict=True)]


def _unwrap(accelerator: Accelerator, model) -> EarlyExitForCausalLM:
    return accelerator.unwrap_model(model)


def _batch_for_step(corpus: Corpus, step: int, config: TrainConfig, accelerator: Accelerator) -> tuple[Tensor, Tensor]:
    """The batch of `step`: a seeded permutation per epoch, sharded over processes, so resuming is exact."""
    per_step = config.batch_size * accelerator.num_processes
    per_epoch = max(1, len(corpus) // per_step)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(config.seed + epoch))
    chosen = order[index * per_step : (index + 1) * per_step]
    if len(chosen) < per_step:  # fewer sequences than one global batch: reuse them cyclically
        chosen = order.repeat(per_step // len(order) + 1)[:per_step]
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    ids, mask = _trim(corpus.input_ids[mine], corpus.attention_mask[mine])
    return ids.to(accelerator.device), mask.to(accelerator.device)


def _trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop leading columns that are padding in every row."""
    first = int(mask.any(0).nonzero()[0]) if mask.any() else 0
    return ids[:, first:], mask[:, first:]


# -- checkpoints (safetensors + JSON) ------------------------------------------------------------------------------


def save_checkpoint(folder: Path, model: EarlyExitForCausalLM, optimizer, config: TrainConfig, step: int,
                    history: list[dict], accelerator: Accelerator) -> None:
    """Write heads, optimizer tensors and trainer state into `folder`, atomically (temp folder, then rename)."""
    if not accelerator.is_main_process:
        return
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()},
              staging / "heads.safetensors")
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, staging / "optimizer.safetensors")
    state = {"step": step, "train_config": asdict(config), "heads_config": _heads_identity(model),
             "param_groups": groups, "history": history}
    (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    if old.exists():
        for p in old.iterdir():
            p.unlink()
        old.rmdir()


def load_checkpoint(folder: Path, model, optimizer, config: TrainConfig, accelerator: Accelerator):
    """Restore heads + optimizer from `folder`; refuse when hyper-parameters or heads differ. Returns (step, log)."""
    if not (folder / "trainer_state.json").exists():
        raise FileNotFoundError(f"no checkpoint to resume in {folder}")
    state = json.loads((folder / "trainer_state.json").read_text())
    inner = _unwrap(accelerator, model)
    saved = {**state["train_config"], **state["heads_config"]}
    current = {**asdict(config), **_heads_identity(inner)}
    current["steps"] = saved["steps"] = None  # training longer than first planned is allowed
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume {folder} with different settings: " + "; ".join(diffs))
    inner.load_heads_state(load_file(folder / "heads.safetensors"), str(folder))
    optimizer.load_state_dict(_unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["param_groups"]))
    logger.info("Resuming from step %d (%s)", state["step"], folder)
    return state["step"], state["history"]


def _heads_identity(model: EarlyExitForCausalLM) -> dict:
    c = model.config
    return {"exit_layers": list(c.exit_layers), "head_type": c.head_type, "head_init": c.head_init,
            "adapter_rank": c.adapter_rank, "draft_vocab_size": c.draft_vocab_size}


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, Tensor], list]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, Tensor], groups: list) -> dict:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


# -- logs and plots ------------------------------------------------------------------------------------------------


def write_log(history: list[dict], folder: Path) -> None:
    """`train_log.csv` (one row per logged step and head) and `training_curves.png` (agreement, entropy)."""
    if not history:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOG_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_curves(history, folder / CURVES_PNG)


def plot_curves(history: list[dict], path: Path) -> None:
    """Agreement and entropy per head over training steps (the paper's Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for exit_layer in sorted({row["exit"] for row in history}):
        rows = [r for r in history if r["exit"] == exit_layer]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["agreement"] for r in rows], label=f"exit@{exit_layer}")
        axes[1].plot(steps, [r["entropy"] for r in rows], label=f"exit@{exit_layer}")
    axes[0].set(title="agreement with the full model", xlabel="step", ylabel="top-1 agreement")
    axes[1].set(title="head entropy", xlabel="step", ylabel="nats")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
