"""The paper's pipeline as jobs: generate data -> train heads -> (calibrate), writing the heads folder."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..loading import is_heads_folder, load
from ..modeling.base_earlyexit import DTYPES, EMBEDDED, load_base_model, load_tokenizer
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
from .train import CURVES_PNG, LOG_CSV, TrainConfig, evaluate_heads, train_heads

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
    head: str = field(default="shared", metadata={"help": "head type", "choices": ["paper", "shared"]})
    head_init: str = field(default="lm_head", metadata={"help": "paper heads: lm_head or scratch"})
    adapter_rank: int | None = field(default=64, metadata={"help": "shared heads: adapter rank"})
    draft_vocab_size: int | None = field(
        default=16384, metadata={"help": "restrict heads to the N most frequent tokens of the data (0: full vocab)"}
    )
    prompt_file: str | None = field(default=None, metadata={"help": "seed prompts, one per line (UTF-8)"})
    text_files: list[str] | None = field(default=None, metadata={"help": "plain-text files for teacher forcing"})
    held_out_fraction: float = field(default=0.1, metadata={"help": "sequences kept out of training for the report"})

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(f"{self.output_dir}.work")


def build_corpus(job: TrainJob, spec: GenerationSpec, base, tokenizer, model_id: str) -> Corpus:
    """The training text: the model's own generations from seed prompts, plus user text files if given."""
    if job.prompt_file:
        spec.prompts = list(read_prompt_file(job.prompt_file))
    corpus = generate_corpus(base, tokenizer, spec, model_id)
    if job.text_files:
        text = text_corpus(tokenizer, read_text_files(job.text_files), seq_len=corpus.input_ids.shape[1],
                           source=",".join(job.text_files))
        corpus = concat_corpora(corpus, text, tokenizer.pad_token_id or 0)
    return corpus


def run_train(job: TrainJob, spec: GenerationSpec, config: TrainConfig) -> tuple[EarlyExitForCausalLM, list[dict]]:
    """Generate data, build (or reload) heads, train them, report held-out agreement and save the folder."""
    out = Path(job.output_dir)
    if out.exists() and any(out.iterdir()) and not (job.overwrite or job.resume):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it or --resume to continue")
    # one process, or each of an `accelerate launch`; made as `Accelerator` makes it, so CPU launches count their ranks
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.main_process_first():  # the main process writes the generated data; the others read its cache
        with torch.random.fork_rng():  # new heads draw their initial weights from `seed`: every process the same
            torch.manual_seed(config.seed)
            model = _load_or_build(job, spec)
        model.backbone.eval()
        corpus = build_corpus(job, spec, model.backbone, model.tokenizer, model.config.base_model_name_or_path)
    held_out, train = corpus.split(job.held_out_fraction)
    logger.info("Training on %d sequences (%d tokens), %d held out", len(train), train.num_tokens, len(held_out))
    train_heads(model, train, config, job.work_path, resume=job.resume)
    report = evaluate_heads(model, held_out)
    model.config.training = {
        "steps": config.steps, "train_config": asdict(config), "data": {**asdict(spec), "sequences": len(train),
        "tokens": train.num_tokens, "text_files": job.text_files}, "held_out": report,
    }
    extra = {name: job.work_path / name for name in (LOG_CSV, CURVES_PNG) if (job.work_path / name).exists()}
    if state.is_main_process:
        model.save_pretrained(out, overwrite=True, extra_files=extra)
    state.wait_for_everyone()
    return model, report


def _load_or_build(job: TrainJob, spec: GenerationSpec) -> EarlyExitForCausalLM:
    dtype = DTYPES[job.dtype]
    if job.model != EMBEDDED and is_heads_folder(job.model):
        model, _ = _load_heads(job.model, dtype)
        return model
    base = load_base_model(job.model, dtype=dtype)
    tokenizer = load_tokenizer(job.model)
    draft = None
    if job.draft_vocab_size:
        corpus = generate_corpus(base, tokenizer, spec, job.model)
        always = [t for t in [tokenizer.eos_token_id] if t is not None]
        draft = draft_vocabulary(corpus, base.config.get_text_config().vocab_size, job.draft_vocab_size, always)
    return EarlyExitForCausalLM.from_base(
        base, exit_layers=job.exit_layers, head=job.head, head_init=job.head_init,
        adapter_rank=job.adapter_rank if job.head == "shared" else None, draft_token_ids=draft, tokenizer=tokenizer,
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
    prompt_file: str | None = field(default=None, metadata={"help": "calibration prompts, one per line (UTF-8)"})


def run_calibrate(job: CalibrateJob, config) -> tuple[dict, list[dict], list[dict]]:
    """Generate calibration text, set thresholds for the ε grid, check them on held-out tokens, save."""
    model, _ = _load_heads(job.model, DTYPES[job.dtype])
    spec = calibration_spec()
    spec.num_sequences, spec.max_new_tokens = job.num_sequences, job.max_new_tokens
    if job.prompt_file:
        spec.prompts = list(read_prompt_file(job.prompt_file))
    corpus = generate_corpus(model.backbone, model.tokenizer, spec, model.config.base_model_name_or_path)
    thresholds, check_rows, cascade_rows = run_calibration(model, config, corpus)
    save_calibrated(model, job.model, check_rows, cascade_rows)
    return thresholds, check_rows, cascade_rows
