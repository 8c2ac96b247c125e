"""Self-supervised head training (paper §3.2, eq. 1): heads learn the frozen model's own next-token distributions.

Loss per head k, summed over heads and averaged over real (non-pad) positions:
`(1-λ)·CE(p_model, p_k) − λ·H(p_k)`, or with `loss="kl"` `(1-λ)·KL(p_model ‖ p_k) − λ·H(p_k)`, or with
`loss="topk"` the same CE against the model's top-k tokens renormalised (top-k distillation, the targets a
`FeatureStore` keeps on disk). Draft-vocabulary heads see the target over their vocabulary plus one OTHER class
holding the out-of-vocabulary mass. Runs through `accelerate`; checkpoints (safetensors + JSON, no pickles) and
resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..modeling.heads_earlyexit import SharedHead
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from .data import Corpus
from .features import FeatureStore, SparseTargets
from .losses import agrees_with, entropy_of, head_loss, linear_topk_loss, sparse_head_loss
from .teacher import CachedTeacher, DiskTeacher, OnlineTeacher, Teacher, teacher_for

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LOSSES = ("ce", "kl", "topk")
LR_SCHEDULES = ("constant", "cosine", "linear")
# settings added after checkpoints were first written: an older checkpoint ran with these values
LATER_SETTINGS = {"lr_schedule": "constant", "warmup_steps": 0}
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
    topk: int = 64  # loss topk: the model's most likely tokens kept per position
    # per-head multipliers of the learning rate (one per exit; None: all 1)
    head_lr_scale: list[float] | None = None
    # learning-rate schedule over `steps` (transformers' `get_scheduler` names: constant, cosine, linear, ...) after
    # `warmup_steps` of linear warm-up
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    # the backbone's outputs for the whole corpus are computed once and kept in memory when they fit in this many
    # GiB (draft-vocabulary heads: ~0.1 GiB per 1,000 tokens at 16k rows); 0: run the backbone every step
    teacher_cache_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.topk < 1:
            raise ValueError(f"topk={self.topk!r} must be a positive number of tokens")
        if self.head_lr_scale is not None and any(not scale > 0 for scale in self.head_lr_scale):
            raise ValueError(f"head_lr_scale={self.head_lr_scale!r} must hold positive numbers, one per exit")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam!r} must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be positive")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive number of steps")
        if not 0.0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a positive number")
        if self.teacher_cache_gib < 0:
            raise ValueError(f"teacher_cache_gib={self.teacher_cache_gib!r} must be >= 0 (0: no cache)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must lie in [0, steps={self.steps})")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of no, bf16, fp16")


def batch_losses(model: EarlyExitForCausalLM, teacher: Teacher, config: TrainConfig, with_stats: bool = True
                 ) -> tuple[Tensor, list]:
    """Summed loss over heads for one batch and per-head `{loss, agreement, entropy}` (`loss` only with
    `with_stats=False`: agreement and entropy each take a pass over `(batch, seq, head_vocab)`).

    Top-k distillation (`lam=0`) of shared and context heads never builds the whole logits (`linear_topk_loss`);
    at logged steps they are taken once more, without gradients, for the stats."""
    total, stats = 0.0, []
    real = teacher.mask.bool()
    targets = teacher.targets
    if isinstance(targets, SparseTargets):  # one set of full-vocabulary top-k tokens serves every head
        targets = [targets] * len(model.exit_heads)
    for head, hidden, target in zip(model.exit_heads, teacher.hidden, targets, strict=True):
        if isinstance(target, SparseTargets) and config.lam == 0.0 and isinstance(head, SharedHead):
            features = head.features(hidden, teacher.mask)
            loss = linear_topk_loss(head, features, target, teacher.mask)
            if with_stats:
                with torch.no_grad():
                    logits = head.logits_from(features)
                entropy = entropy_of(logits)
        else:
            logits = head(hidden, teacher.mask)  # (batch, seq, head_vocab)
            if isinstance(target, SparseTargets):
                loss, entropy = sparse_head_loss(logits, head, target, teacher.mask, config.lam, with_stats)
            else:
                loss, entropy = head_loss(logits, target, teacher.mask, config.lam, config.loss)
        total = total + loss
        row = {"loss": loss.item()}
        if with_stats:
            row["agreement"] = agrees_with(head, logits.detach(), teacher.top)[real].float().mean().item()
            row["entropy"] = entropy.detach()[real].mean().item()
        stats.append(row)
    return total, stats


# -- evaluation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_heads(
    model: EarlyExitForCausalLM, corpus: Corpus | FeatureStore | CachedTeacher | OnlineTeacher | DiskTeacher,
    batch_size: int = 4,
) -> list[dict]:
    """Per-head agreement with the model and mean entropy over the real tokens of `corpus` (or of a teacher built
    from it)."""
    if isinstance(corpus, Corpus):
        source = OnlineTeacher(model, corpus, with_targets=False)
    elif isinstance(corpus, FeatureStore):
        source = DiskTeacher(corpus, with_targets=False)
    else:
        source = corpus
    agree = [0.0] * len(model.exit_heads)
    entropy = [0.0] * len(model.exit_heads)
    count = 0
    for start in range(0, len(source), batch_size):
        teacher = source.batch(torch.arange(start, min(start + batch_size, len(source))))
        real = teacher.mask.bool()
        count += int(real.sum())
        for j, (head, hidden) in enumerate(zip(model.exit_heads, teacher.hidden, strict=True)):
            logits = head(hidden, teacher.mask)  # (batch, seq, head_vocab)
            agree[j] += agrees_with(head, logits, teacher.top)[real].float().sum().item()
            entropy[j] += entropy_of(logits)[real].sum().item()
    return [{"exit": k, "agreement": a / count, "entropy": e / count, "tokens": count}
            for k, a, e in zip(model.config.exit_layers, agree, entropy, strict=True)]


# -- the loop ------------------------------------------------------------------------------------------------------


def train_heads(
    model: EarlyExitForCausalLM, corpus: Corpus | FeatureStore, config: TrainConfig, work_dir: str | Path,
    resume: bool = False, held_out: Corpus | FeatureStore | None = None, data: dict | None = None,
) -> list[dict]:
    """Train `model`'s heads on `corpus` (the backbone stays frozen); returns the log rows.

    Args:
        corpus: token sequences (the backbone runs over them, or once into memory), or a `FeatureStore` of
            backbone features on disk (streamed shard by shard; needs `loss="topk"`).
        work_dir: where checkpoints, the CSV log and the curves plot go.
        resume: continue from `work_dir/checkpoint` (refused if its hyper-parameters differ from `config`).
        held_out: sequences never trained on; when given, every logged step also records each head's agreement and
            mean entropy on them (`held_out_agreement`, `held_out_entropy`), as `evaluate_heads` measures them.
        data: the settings the corpus was built from (JSON values); recorded in checkpoints, and a resumed run with
            other values is refused like other hyper-parameters.
    """
    work_dir = Path(work_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    if isinstance(corpus, FeatureStore) != (config.loss == "topk"):
        raise ValueError(f"loss={config.loss!r} needs {'a FeatureStore' if config.loss == 'topk' else 'a Corpus'} "
                         "(top-k targets are what a FeatureStore keeps; dense targets come from a Corpus)")
    scales = config.head_lr_scale or [1.0] * len(model.exit_heads)
    if len(scales) != len(model.exit_heads):
        raise ValueError(f"head_lr_scale has {len(scales)} values for {len(model.exit_heads)} exits")
    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": config.learning_rate * scale}
              for head, scale in zip(model.exit_heads, scales, strict=True)]
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    schedule = get_scheduler(config.lr_schedule if config.warmup_steps == 0 or config.lr_schedule != "constant"
                             else "constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps,
                             num_training_steps=config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start, history = 0, []
    if resume:
        start, history = load_checkpoint(work_dir / CHECKPOINT, model, optimizer, config, accelerator, data)
        with warnings.catch_warnings():  # the schedule is a function of the step: replay it up to `start`
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                schedule.step()
    else:
        existing = [p for p in checkpoint_folders(work_dir / CHECKPOINT) if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass resume=True (--resume) to continue it, or use another "
                                  "work dir")
    inner = _unwrap(accelerator, model)
    teacher = _teacher(inner, corpus, config)
    held_out_teacher = None if held_out is None else _teacher(inner, held_out, config, with_targets=False)
    bar = tqdm(range(start, config.steps), desc="Training heads", unit="step", initial=start, total=config.steps,
               disable=not accelerator.is_main_process)
    agree = "-"
    for step in bar:
        batch = teacher.batch(_rows_for_step(teacher, step, config, accelerator))
        logged = (step + 1) % config.log_every == 0 or step + 1 == config.steps
        with accelerator.autocast():
            loss, stats = batch_losses(inner, batch, config, with_stats=logged)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        _average_gradients(params, accelerator, int(batch.mask.sum()))
        optimizer.step()
        schedule.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        if logged:
            agree = "/".join(f"{s['agreement']:.2f}" for s in stats)
            if held_out_teacher is not None:
                stats = _with_held_out(stats, evaluate_heads(inner, held_out_teacher))
            history.extend({"step": step + 1, "exit": k, **s}
                           for k, s in zip(inner.config.exit_layers, stats, strict=True))
        bar.set_postfix(loss=f"{loss.item():.3f}", agree=agree)  # agreement: at the last logged step
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(work_dir / CHECKPOINT, inner, optimizer, config, step + 1, history, accelerator, data)
    if accelerator.is_main_process:
        write_log(history, work_dir)
    return history


def _average_gradients(params: list[Tensor], accelerator: Accelerator, tokens: int) -> None:
    """Make every process's head gradients those of the whole global batch: each process's loss is a mean over its
    `tokens` real tokens, so gradients are summed weighted by token counts and divided by the global count (what
    one process with the union of the batches computes). The heads run outside any DDP wrapper (the loss reads them
    directly, on hidden states of the frozen backbone), so no hook syncs them; every process then takes the same
    step."""
    if accelerator.num_processes == 1:
        return
    count = torch.tensor(float(tokens), device=accelerator.device)
    total = accelerator.reduce(count, reduction="sum")
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad * count, reduction="sum") / total


def _with_held_out(stats: list[dict], report: list[dict]) -> list[dict]:
    """Per-head training stats plus the held-out agreement and entropy of `evaluate_heads`."""
    return [{**s, "held_out_agreement": r["agreement"], "held_out_entropy": r["entropy"]}
            for s, r in zip(stats, report, strict=True)]


def _unwrap(accelerator: Accelerator, model) -> EarlyExitForCausalLM:
    return accelerator.unwrap_model(model)


def _teacher(model: EarlyExitForCausalLM, data: Corpus | FeatureStore, config: TrainConfig,
             with_targets: bool = True) -> CachedTeacher | OnlineTeacher | DiskTeacher:
    if isinstance(data, FeatureStore):
        return DiskTeacher(data, with_targets)
    return teacher_for(model, data, config.teacher_cache_gib, config.batch_size, with_targets)


def _rows_for_step(teacher, step: int, config: TrainConfig, accelerator: Accelerator) -> Tensor:
    """This process's corpus rows at `step`: a seeded order per epoch (the teacher's own, when it has one that
    keeps disk shards together), sharded over processes, so resuming is exact."""
    num_rows = len(teacher)
    per_step = config.batch_size * accelerator.num_processes
    per_epoch = max(1, num_rows // per_step)
    epoch, index = divmod(step, per_epoch)
    if hasattr(teacher, "order"):
        order = teacher.order(epoch, config.seed)
    else:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(config.seed + epoch))
    chosen = order[index * per_step : (index + 1) * per_step]
    if len(chosen) < per_step:  # fewer sequences than one global batch: reuse them cyclically
        chosen = order.repeat(per_step // len(order) + 1)[:per_step]
    return chosen[accelerator.process_index :: accelerator.num_processes]


# -- checkpoints (safetensors + JSON) ------------------------------------------------------------------------------


STATE_FILE = "trainer_state.json"
HEADS_FILE = "heads.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def checkpoint_folders(folder: Path) -> tuple[Path, Path, Path]:
    """`folder` and what an interrupted swap can leave beside it: `.partial` (the next checkpoint, written but not
    yet moved into place) and `.old` (the previous one, moved aside but not yet replaced or deleted)."""
    return folder, folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")


def _complete_step(folder: Path) -> int | None:
    """The step of a complete checkpoint in `folder` (its state, written last, names it), else `None`."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or not all((folder / name).is_file() for name in (HEADS_FILE, OPTIMIZER_FILE)):
        return None
    return step


def find_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint among `folder`, `.partial` and `.old` (every state a crash during
    `save_checkpoint` can leave), or `None`."""
    best: tuple[int, Path] | None = None
    for path in checkpoint_folders(folder):
        step = _complete_step(path)
        if step is not None and (best is None or step > best[0]):
            best = (step, path)
    return None if best is None else best[1]


def _settle(folder: Path) -> None:
    """Put the newest complete checkpoint at `folder` and remove what an interrupted save left beside it."""
    folder, staging, old = checkpoint_folders(folder)
    best = find_checkpoint(folder)
    if best is not None and best != folder:
        if folder.exists():
            shutil.rmtree(folder)  # older or incomplete: the newest complete one replaces it
        best.rename(folder)
        logger.warning("Recovered checkpoint %s from %s, left by an interrupted save", folder, best)
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def save_checkpoint(folder: Path, model: EarlyExitForCausalLM, optimizer, config: TrainConfig, step: int,
                    history: list[dict], accelerator: Accelerator, data: dict | None = None) -> None:
    """Write heads, optimizer tensors and trainer state into `folder`, atomically: a staging folder (`.partial`,
    its state file written last) swapped in by two renames (the previous checkpoint waits in `.old`). A crash at
    any point leaves a complete checkpoint that `find_checkpoint` finds; the next save cleans up."""
    if not accelerator.is_main_process:
        return
    folder, staging, old = checkpoint_folders(folder)
    _settle(folder)
    staging.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()},
              staging / HEADS_FILE)
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, staging / OPTIMIZER_FILE)
    state = {"step": step, "train_config": asdict(config), "heads_config": _heads_identity(model),
             "param_groups": groups, "history": history}
    if data is not None:
        state["data"] = data
    (staging / (STATE_FILE + ".tmp")).write_text(json.dumps(state, indent=1))
    os.replace(staging / (STATE_FILE + ".tmp"), staging / STATE_FILE)  # last: the checkpoint is complete
    if folder.exists():
        folder.rename(old)
    try:
        staging.rename(folder)
    except OSError as err:
        raise OSError(f"could not move the new checkpoint (step {step}) from {staging} to {folder} ({err}); the "
                      f"previous checkpoint is in {old}; --resume finds the newest complete one of both") from err
    shutil.rmtree(old, ignore_errors=True)


def settings_diff(state: dict, config: TrainConfig, data: dict | None, heads: dict | None = None) -> list[str]:
    """What differs between a checkpoint's recorded settings and this run's: hyper-parameters, the data the corpus
    was built from (when both record it) and the heads (when given)."""
    saved, current = {**LATER_SETTINGS, **state["train_config"]}, asdict(config)
    if heads is not None:
        saved.update(state["heads_config"])
        current.update(heads)
    # with(out) the cache is allowed, and training longer than planned where the schedule does not depend on it
    free = ["teacher_cache_gib"] + (["steps"] if current["lr_schedule"] == "constant" else [])
    for name in free:
        current[name] = saved[name] = None
    if data is not None and state.get("data") is not None:
        saved.update({f"data {k}": v for k, v in state["data"].items()})
        current.update({f"data {k}": v for k, v in data.items()})
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_resumable(folder: Path, config: TrainConfig, data: dict | None = None) -> Path:
    """The checkpoint `--resume` would continue (`find_checkpoint`), refused when its hyper-parameters or data
    settings differ from this run's: called before any model work."""
    found = find_checkpoint(folder)
    if found is None:
        raise FileNotFoundError(f"no checkpoint to resume in {folder} (nor beside it in "
                                f"{checkpoint_folders(folder)[1].name} / {checkpoint_folders(folder)[2].name})")
    diffs = settings_diff(json.loads((found / STATE_FILE).read_text()), config, data)
    if diffs:
        raise ValueError(f"cannot resume {found} with different settings: " + "; ".join(diffs))
    return found


def load_checkpoint(folder: Path, model, optimizer, config: TrainConfig, accelerator: Accelerator,
                    data: dict | None = None):
    """Restore heads + optimizer from the newest complete checkpoint at `folder` (or beside it, after a crash);
    refuse when hyper-parameters, data settings or heads differ. Returns (step, log)."""
    found = check_resumable(folder, config, data)
    state = json.loads((found / STATE_FILE).read_text())
    inner = _unwrap(accelerator, model)
    if data is not None and state.get("data") is None:
        logger.warning("%s records no data settings (an older checkpoint): make sure this run builds the same corpus",
                       found)
    diffs = settings_diff(state, config, data, _heads_identity(inner))
    if diffs:
        raise ValueError(f"cannot resume {found} with different settings: " + "; ".join(diffs))
    inner.load_heads_state(load_file(found / HEADS_FILE), str(found))
    optimizer.load_state_dict(_unflatten_optimizer(load_file(found / OPTIMIZER_FILE), state["param_groups"]))
    logger.info("Resuming from step %d (%s)", state["step"], found)
    return state["step"], state["history"]


def _heads_identity(model: EarlyExitForCausalLM) -> dict:
    c = model.config
    identity = {"exit_layers": list(c.exit_layers), "head_type": c.head_type, "head_init": c.head_init,
                "adapter_rank": c.adapter_rank, "draft_vocab_size": c.draft_vocab_size}
    if c.head_type == "context":
        identity["context_init"], identity["context_rank"] = c.context_init, c.context_rank
    return identity


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
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for exit_layer in sorted({row["exit"] for row in history}):
        rows = [r for r in history if r["exit"] == exit_layer]
        steps = [r["step"] for r in rows]
        line, = axes[0].plot(steps, [r["agreement"] for r in rows], label=f"exit@{exit_layer}")
        if "held_out_agreement" in rows[0]:  # held out at every logged step (`log_held_out`): dashed, same colour
            axes[0].plot(steps, [r["held_out_agreement"] for r in rows], linestyle="--", color=line.get_color())
        axes[1].plot(steps, [r["entropy"] for r in rows], label=f"exit@{exit_layer}")
    axes[0].set(title="agreement with the full model (dashed: held out)" if "held_out_agreement" in history[0]
                else "agreement with the full model", xlabel="step", ylabel="top-1 agreement")
    axes[1].set(title="head entropy", xlabel="step", ylabel="nats")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
