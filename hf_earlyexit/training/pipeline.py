"""The paper's pipeline as jobs: generate data -> train heads -> (calibrate), writing the heads folder."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..loading import is_heads_folder, load
from ..modeling.base_earlyexit import DTYPES, EMBEDDED, load_base_model, load_tokenizer
from ..modeling.configuration_earlyexit import BLOCK_DELTA_BITS, CONTEXT_INITS, HEAD_TYPES, HEADS_DTYPES
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from .calibrate import calibration_spec, run_calibration, save_calibrated
from .data import (
    Corpus,
    GenerationSpec,
    concat_corpora,
    draft_vocabulary,
    generate_corpus,
    read_prompt_file,
    read_text_files,
    text_corpus,
)
from .features import FeatureStore
from .train import CHECKPOINT, CURVES_PNG, LOG_CSV, TrainConfig, check_resumable, evaluate_heads, train_heads

logger = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """What to train and where to write it (hyper-parameters live in `TrainConfig`, data in `GenerationSpec`)."""

    model: str = field(default=EMBEDDED, metadata={"help": "base model (Hub id, path, 'embedded') or heads to go on"})
    output_dir: str = field(default="earlyexit-heads", metadata={"help": "heads folder to write"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in work_dir"})
    work_dir: str | None = field(default=None, metadata={"help": "checkpoints and logs (default: <output_dir>.work)"})
    dtype: str = field(default="float32", metadata={"help": "base model dtype", "choices": list(DTYPES)})
    exit_layers: list[int] | None = field(default=None, metadata={"help": "exit after these layers"})
    head: str = field(default="shared", metadata={"help": "head type", "choices": list(HEAD_TYPES)})
    head_init: str = field(default="lm_head", metadata={"help": "paper heads: lm_head or scratch"})
    context_init: str = field(default="next", metadata={
        "help": "context heads: the layer their block copies", "choices": list(CONTEXT_INITS)})
    context_rank: int | None = field(default=None, metadata={
        "help": "context heads: train rank-N deltas on the block's projections (small folders) instead of a full copy"})
    adapter_rank: int | None = field(default=64, metadata={"help": "shared heads: adapter rank"})
    heads_dtype: str = field(default="float32", metadata={
        "help": "how the folder stores head weights (bfloat16: half the bytes; training runs in --dtype)",
        "choices": list(HEADS_DTYPES)})
    block_delta_bits: int | None = field(default=None, metadata={
        "help": "context heads with full blocks: store each block weight as its change from the layer it copies, in "
                "N bits (3..8; 6: 0.39x the bytes of bfloat16)", "choices": list(BLOCK_DELTA_BITS)})
    draft_vocab_size: int | None = field(
        default=16384, metadata={"help": "restrict heads to the N most frequent tokens of the data (0: full vocab)"}
    )
    prompt_file: str | None = field(default=None, metadata={"help": "seed prompts, one per line (UTF-8)"})
    text_files: list[str] | None = field(default=None, metadata={"help": "plain-text files for teacher forcing"})
    seq_len: int = field(default=128, metadata={"help": "text files: tokens per teacher-forced window"})
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "text files: read at most this many tokens (passages in file order, windows kept whole)"})
    held_out_fraction: float = field(default=0.1, metadata={"help": "sequences kept out of training for the report"})
    log_held_out: bool = field(default=False, metadata={
        "help": "also measure the held-out sequences' agreement at every logged step (the log's held_out_* columns "
                "and curves; costs one pass of the heads over them per log)"})
    features_dir: str | None = field(default=None, metadata={
        "help": "loss topk: where the backbone's features go (default: <work_dir>/features; reused when it holds "
                "this corpus)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction!r} must lie strictly between 0 and 1 (the "
                             "fraction of sequences kept out of training)")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len!r} must be at least 2 tokens")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens={self.max_text_tokens!r} must be a positive number of tokens")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size!r} must be >= 0 (0: the full vocabulary)")
        if self.block_delta_bits is not None and (self.head != "context" or self.context_rank is not None):
            raise ValueError(f"block_delta_bits={self.block_delta_bits!r} stores full context blocks; expected "
                             f"--head context without --context_rank (got head={self.head!r}, "
                             f"context_rank={self.context_rank!r})")

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(f"{self.output_dir}.work")

    @property
    def features_path(self) -> Path:
        return Path(self.features_dir) if self.features_dir else self.work_path / "features"


def build_corpus(job: TrainJob, spec: GenerationSpec, base, tokenizer, model_id: str) -> Corpus:
    """The training text: the model's own generations from seed prompts (none when `spec.num_sequences` is 0),
    plus the user's text files teacher-forced, cut into windows of `job.seq_len` tokens."""
    read_inputs(job, spec)
    parts = []
    if spec.num_sequences:
        parts.append(generate_corpus(base, tokenizer, spec, model_id))
    if job.text_files:
        per_file = [read_text_files([path]) for path in job.text_files]
        # round robin over the files, so a token budget reads some of each
        passages = [p for group in itertools.zip_longest(*per_file) for p in group if p is not None]
        text = text_corpus(tokenizer, passages, seq_len=job.seq_len, source=",".join(job.text_files))
        if job.max_text_tokens:
            rows = max(1, job.max_text_tokens // job.seq_len)
            text = Corpus(text.input_ids[:rows], text.attention_mask[:rows], text.source)
        parts.append(text)
    if not parts:
        raise ValueError("no training text: give --num_sequences > 0 (generated text) or --text_files")
    corpus = parts[0]
    for part in parts[1:]:
        corpus = concat_corpora(corpus, part, tokenizer.pad_token_id or 0)
    return corpus


def run_train(job: TrainJob, spec: GenerationSpec, config: TrainConfig) -> tuple[EarlyExitForCausalLM, list[dict]]:
    """Build the corpus, build (or reload) heads over it, train them, report held-out agreement, save the folder.

    With `loss="topk"` the backbone runs over the training corpus once, into a `FeatureStore` on disk
    (`features_dir`, default `<work_dir>/features`), and training streams from it.
    """
    out = Path(job.output_dir)
    for name, path in (("output_dir", out), ("work_dir", job.work_path)):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{name}={str(path)!r} is a file; expected a folder (or a path that does not "
                                     "exist yet)")
    if out.exists() and any(out.iterdir()) and not (job.overwrite or job.resume):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it or --resume to continue")
    read_inputs(job, spec)  # before any model work: a bad prompt or text file fails at once
    if not job.text_files and spec.num_sequences < 2:
        raise ValueError(f"num_sequences={spec.num_sequences} gives too little text: training keeps some sequences "
                         "out for its report, so it needs at least 2 (or --text_files)")
    data = data_settings(job, spec)
    if job.resume:  # other data or hyper-parameters are refused before any model work
        check_resumable(job.work_path / CHECKPOINT, config, data)
    # one process, or each of an `accelerate launch`; made as `Accelerator` makes it, so CPU launches count their ranks
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.main_process_first():  # the main process writes generated data and features; the others read them
        base, tokenizer, heads = _base_of(job)
        corpus = build_corpus(job, spec, base, tokenizer, heads.config.base_model_name_or_path if heads else job.model)
        with torch.random.fork_rng():  # new heads draw their initial weights from `seed`: every process the same
            torch.manual_seed(config.seed)
            model = heads or _new_heads(job, base, tokenizer, corpus)
        model.backbone.eval()
        if len(corpus) < 2:
            raise ValueError(f"the training text makes {len(corpus)} sequence(s); training keeps some out for its "
                             "report, so it needs at least 2: raise --num_sequences or give more text")
        held_out, train = corpus.split(job.held_out_fraction)
        source = train
        if config.loss == "topk":
            source = FeatureStore.build(model, train, job.features_path, k=config.topk)
    logger.info("Training on %d sequences (%d tokens), %d held out", len(train), train.num_tokens, len(held_out))
    train_heads(model, source, config, job.work_path, resume=job.resume, data=data,
                held_out=held_out if job.log_held_out else None)
    report = evaluate_heads(model, held_out)
    model.config.training = {
        "steps": config.steps, "train_config": asdict(config), "data": {**asdict(spec), "sequences": len(train),
        "tokens": train.num_tokens, "text_files": shared_names(job.text_files)}, "held_out": report,
    }
    extra = {name: job.work_path / name for name in (LOG_CSV, CURVES_PNG) if (job.work_path / name).exists()}
    if state.is_main_process:
        model.save_pretrained(out, overwrite=True, extra_files=extra)
    state.wait_for_everyone()
    return model, report


def shared_names(paths: list[str] | None) -> list[str] | None:
    """Text files as a heads folder records them: relative to the folder they all lie under, so that a published
    config and card name the files, not the trainer's machine (`data_settings` keeps their sha256)."""
    if not paths:
        return paths
    resolved = [Path(path).resolve() for path in paths]
    root = Path(os.path.commonpath([path.parent for path in resolved]))
    return [path.relative_to(root).as_posix() for path in resolved]


def data_settings(job: TrainJob, spec: GenerationSpec) -> dict:
    """What the training corpus is built from, as a checkpoint records it (a resumed run must build the same):
    generation settings, the prompts' and text files' contents (SHA-256) and how text is cut and held out."""
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    settings = {k: v for k, v in asdict(spec).items() if k != "prompts"}
    settings["prompts (sha256)"] = digest(json.dumps(spec.prompts).encode()) if spec.num_sequences else None
    settings["text_files (sha256)"] = [digest(Path(path).read_bytes()) for path in job.text_files or []]
    for name in ("seq_len", "max_text_tokens"):
        settings[name] = getattr(job, name) if job.text_files else None
    settings["held_out_fraction"] = job.held_out_fraction
    return settings


def read_inputs(job: TrainJob, spec: GenerationSpec) -> None:
    """Read the prompt file into `spec` and check the text files, before any model work."""
    if job.prompt_file:
        spec.prompts = list(read_prompt_file(job.prompt_file))
    if job.text_files:
        read_text_files(job.text_files)


def _base_of(job: TrainJob):
    """`(base, tokenizer, heads)`: the base model and tokenizer, and the heads when `job.model` is a heads folder to
    go on training (else `None`)."""
    dtype = DTYPES[job.dtype]
    if job.model != EMBEDDED and is_heads_folder(job.model):
        model, tokenizer = _load_heads(job.model, dtype)
        return model.backbone, tokenizer, model
    return load_base_model(job.model, dtype=dtype), load_tokenizer(job.model), None


def _new_heads(job: TrainJob, base, tokenizer, corpus: Corpus) -> EarlyExitForCausalLM:
    """Fresh heads over `base`, their draft vocabulary the most frequent tokens of the corpus they train on."""
    draft = None
    if job.draft_vocab_size:
        always = [t for t in [tokenizer.eos_token_id] if t is not None]
        draft = draft_vocabulary(corpus, base.config.get_text_config().vocab_size, job.draft_vocab_size, always)
    return EarlyExitForCausalLM.from_base(
        base, exit_layers=job.exit_layers, head=job.head, head_init=job.head_init, context_init=job.context_init,
        context_rank=job.context_rank if job.head == "context" else None,
        adapter_rank=job.adapter_rank if job.head in ("shared", "context") else None, draft_token_ids=draft,
        heads_dtype=job.heads_dtype, block_delta_bits=job.block_delta_bits, tokenizer=tokenizer,
    )


def _load_heads(path: str, dtype):
    return load(path, dtype=dtype)


@dataclass
class CalibrateJob:
    """Which heads folder to calibrate (it is rewritten in place, atomically)."""

    model: str = field(default="earlyexit-heads", metadata={"help": "heads folder written by `train`"})
    dtype: str = field(default="float32", metadata={"help": "base model dtype", "choices": list(DTYPES)})
    num_sequences: int = field(default=64, metadata={"help": "calibration sequences the model writes"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per calibration sequence"})
    generation_batch_size: int = field(default=8, metadata={"help": "calibration sequences generated at once"})
    prompt_file: str | None = field(default=None, metadata={"help": "calibration prompts, one per line (UTF-8)"})

    def __post_init__(self) -> None:
        if self.num_sequences < 2:
            raise ValueError(f"num_sequences={self.num_sequences!r} must be at least 2 (half the calibration sequences "
                             "set the thresholds, the other half checks them)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive number of tokens")
        if self.generation_batch_size < 1:
            raise ValueError(f"generation_batch_size={self.generation_batch_size!r} must be a positive number of "
                             "sequences")


def run_calibrate(job: CalibrateJob, config) -> tuple[dict, list[dict], list[dict]]:
    """Generate calibration text, set thresholds for the ε grid, check them on held-out tokens, save."""
    model, _ = _load_heads(job.model, DTYPES[job.dtype])
    spec = calibration_spec()
    spec.num_sequences, spec.max_new_tokens = job.num_sequences, job.max_new_tokens
    spec.generation_batch_size = job.generation_batch_size
    if job.prompt_file:
        spec.prompts = list(read_prompt_file(job.prompt_file))
    corpus = generate_corpus(model.backbone, model.tokenizer, spec, model.config.base_model_name_or_path)
    thresholds, check_rows, cascade_rows = run_calibration(model, config, corpus)
    save_calibrated(model, job.model, check_rows, cascade_rows)
    return thresholds, check_rows, cascade_rows
