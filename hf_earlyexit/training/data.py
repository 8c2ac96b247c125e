"""Training and calibration data with no labels: text the base model writes itself, or the user's own text.

Generated corpora are cached (safetensors of token ids + a JSON of how they were made) under the hf-earlyexit
cache, keyed by everything that determines them, so a rerun does not regenerate them.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..modeling.base_earlyexit import cache_root, weight_fingerprint
from .lm_topk import sampling_head

logger = logging.getLogger(__name__)

# the paper's seed prompts (§4): one set to generate training text, a disjoint one for calibration
TRAIN_PROMPTS = ("This is an example script:", "My name is", "I am a", "Welcome to", "what is a")
CALIBRATION_PROMPTS = (
    "A cat is", "In Python, a list is", "In C, we can define a function", "The capital of France is",
    "The derivative of x^2 is",
)


@dataclass
class Corpus:
    """Token sequences, left padded: `input_ids` and `attention_mask` are `(num_sequences, seq_len)`."""

    input_ids: Tensor
    attention_mask: Tensor
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def split(self, fraction: float) -> tuple[Corpus, Corpus]:
        """`(first, rest)` with `fraction` of the sequences in `first`."""
        n = max(1, min(len(self) - 1, round(len(self) * fraction)))
        return (Corpus(self.input_ids[:n], self.attention_mask[:n], self.source),
                Corpus(self.input_ids[n:], self.attention_mask[n:], self.source))


@dataclass
class GenerationSpec:
    """How the base model writes its own data (sampling, so that text is varied)."""

    prompts: list[str] = field(default_factory=lambda: list(TRAIN_PROMPTS), metadata={"help": "seed prompts"})
    num_sequences: int = field(default=64, metadata={"help": "sequences the model writes"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per generated sequence"})
    generation_batch_size: int = field(default=8, metadata={"help": "sequences generated at once"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sampling top-k"})
    sampling_seed: int = field(default=0, metadata={"help": "seed of the sampler"})

    def __post_init__(self) -> None:
        for name, low in (("num_sequences", 0), ("max_new_tokens", 1), ("generation_batch_size", 1), ("top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or not (
            0.0 < self.temperature < float("inf")
        ):
            raise ValueError(f"temperature={self.temperature!r} must be a positive number")


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per non-empty line of a UTF-8 text file; empty or non-UTF-8 files are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (expected a UTF-8 text file, one prompt per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (expected one prompt per non-empty line)")
    return prompts


class TopKSampler(LogitsProcessor):
    """Temperature + top-k sampling done inside a logits processor, for greedy search to carry out.

    HF's own sampling draws with `torch.multinomial` over the whole vocabulary even when top-k has masked all but
    `top_k` entries; for a 262k-token vocabulary and 48 rows that draw took a third of every generation step on a
    2-core CPU. This processor draws among the top `top_k` scores only (the same distribution: softmax of the
    temperature-scaled top-k scores) and returns scores where only the drawn token is finite, so `do_sample=False`
    picks it. `top_k=0` draws over the whole vocabulary. Uses torch's global generator (seeded by the caller).
    """

    def __init__(self, temperature: float, top_k: int):
        self.temperature = float(temperature)
        self.top_k = int(top_k)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if 0 < self.top_k < scores.shape[-1]:
            values, index = scores.topk(self.top_k, dim=-1)
        else:
            values, index = scores, None
        probs = torch.softmax(values.float() / self.temperature, dim=-1)
        drawn = torch.multinomial(probs, 1)
        token = drawn if index is None else index.gather(-1, drawn)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token, 0.0)


def generate_corpus(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: GenerationSpec, model_id: str,
    cache: bool = True, screen: str = "auto",
) -> Corpus:
    """Sample `spec.num_sequences` continuations of `spec.prompts` (cycled) from `model`, in batches.

    Args:
        model: the base causal LM.
        model_id: names the model in the cache key, with its weight fingerprint and dtype (other weights under the
            same name, or another dtype, sample other text: never served from the cache).
        screen: how the LM head may be read for the top k (`lm_topk.sampling_head`: "auto", "bf16", "off"); the
            samples do not depend on it (not part of the cache key). Off where the model's generation config makes
            HF add logits processors of its own.
    """
    if not spec.prompts:
        raise ValueError("no prompts given; expected at least one seed prompt")
    path = _cache_path("generated", {"model": model_id, "fingerprint": weight_fingerprint(model),
                                     "dtype": str(model.dtype), "sampler": "top_k_processor", **asdict(spec)})
    if cache and path.exists():
        logger.info("Reusing generated data from %s", path)
        return _load(path)
    tokenizer = _left_padding(tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.sampling_seed)
    chunks, masks = [], []
    sampler = TopKSampler(spec.temperature, spec.top_k)
    screen = screen if _scores_untouched(model) else "off"  # other processors could reach past the top k
    try:
        with sampling_head(model, spec.top_k, screen):
            _generate_batches(model, tokenizer, spec, sampler, chunks, masks)
    finally:
        torch.random.set_rng_state(generator_state)
    corpus = _stack(chunks, masks, tokenizer.pad_token_id, {"kind": "generated", **asdict(spec)})
    if cache:
        _save(path, corpus)
    return corpus


# generation settings that make HF add logits processors before ours; where one is set, the LM head's screen for
# the top k (`lm_topk.sampling_head`) stays off, as such a processor could move a token from outside the top k in
SCORE_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                  "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "sequence_bias",
                  "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
                  "exponential_decay_length_penalty", "guidance_scale", "renormalize_logits", "watermarking_config")


def _scores_untouched(model: PreTrainedModel) -> bool:
    """Whether HF's `generate` with the model's generation config adds no logits processor of its own (every
    setting in `SCORE_SETTINGS` at `GenerationConfig`'s default)."""
    config, default = getattr(model, "generation_config", None) or GenerationConfig(), GenerationConfig()
    return all(getattr(config, name, None) == getattr(default, name, None) for name in SCORE_SETTINGS)


def _generate_batches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: GenerationSpec,
                      sampler: TopKSampler, chunks: list[Tensor], masks: list[Tensor]) -> None:
    """Sample the corpus's sequences in batches of `spec.generation_batch_size`, appending ids and masks."""
    step = spec.generation_batch_size
    for start in tqdm(range(0, spec.num_sequences, step), desc="Generating data", unit="batch"):
        count = min(step, spec.num_sequences - start)
        prompts = [spec.prompts[(start + i) % len(spec.prompts)] for i in range(count)]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **enc, do_sample=False, logits_processor=LogitsProcessorList([sampler]),
                max_new_tokens=spec.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        mask = torch.cat([enc["attention_mask"], _after_eos(ids[:, enc["input_ids"].shape[1]:], tokenizer)], 1)
        chunks.append(ids.cpu())
        masks.append(mask.cpu())


def text_corpus(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int = 256, source: str = "text"
) -> Corpus:
    """Teacher-forced data from plain text: tokenized and cut into windows of `seq_len` tokens."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
    if len(ids) < 2:
        raise ValueError(f"{source}: the text holds {len(ids)} tokens; need at least 2")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    tensors = [torch.tensor(w).unsqueeze(0) for w in windows]
    masks = [torch.ones_like(t) for t in tensors]
    return _stack(tensors, masks, tokenizer.pad_token_id or 0, {"kind": "text", "source": source})


def read_text_files(paths: list[str | Path]) -> list[str]:
    """Passages of UTF-8 text: a `.jsonl` file gives one passage per record and a `.csv` file one per row (the values
    that hold a space, i.e. prose rather than ids, labels or answer letters, joined by spaces); any other file is
    one passage. Empty, non-UTF-8 or malformed files are refused with the file named."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist (expected a UTF-8 text, .jsonl or .csv file)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {path} is not UTF-8 ({err.reason} at byte {err.start})") from None
        if not text.strip():
            raise ValueError(f"text file {path} is empty")
        passages = _record_passages(path, text) if path.suffix in (".jsonl", ".csv") else [text]
        if not passages:
            raise ValueError(f"text file {path} holds no prose (no value with a space in any record)")
        texts.extend(passages)
    return texts


def _record_passages(path: Path, text: str) -> list[str]:
    """One passage per JSON line / CSV row: its prose values, in order."""
    if path.suffix == ".csv":
        records = list(csv.reader(io.StringIO(text)))
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not a JSON record ({err.msg})") from None
    passages = (" ".join(v.strip() for v in _strings(r) if " " in v.strip()) for r in records)
    return [p for p in passages if p]


def _strings(value) -> list[str]:
    """Every string inside a JSON value (or a CSV row), depth first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def token_frequencies(corpus: Corpus, vocab_size: int) -> Tensor:
    """`(vocab_size,)` count of each token id among the real tokens of `corpus`."""
    real = corpus.input_ids[corpus.attention_mask.bool()]
    return torch.bincount(real, minlength=vocab_size)[:vocab_size]


def draft_vocabulary(corpus: Corpus, vocab_size: int, size: int, always: list[int] | None = None) -> Tensor:
    """The `size` most frequent token ids of `corpus` (ties broken by lower id), plus `always` (e.g. EOS) first."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size {size} must lie in 1..{vocab_size}")
    counts = token_frequencies(corpus, vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / (2 * vocab_size)  # stable tie break: lower id first
    for token in always or []:
        counts[token] = float("inf")
    return counts.topk(size).indices.sort().values


def concat_corpora(a: Corpus, b: Corpus, pad_id: int) -> Corpus:
    """Both corpora's sequences in one (left padded to the wider one)."""
    return _stack([a.input_ids, b.input_ids], [a.attention_mask, b.attention_mask], pad_id,
                  {"kind": "mixed", "parts": [a.source, b.source]})


def _after_eos(new_ids: Tensor, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """Mask `(batch, new)` that keeps generated tokens up to and including the first EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return torch.ones_like(new_ids)
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=new_ids.device)
    is_eos = torch.isin(new_ids, eos_ids).long()
    seen_before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
    return (seen_before == 0).long()


def _stack(chunks: list[Tensor], masks: list[Tensor], pad_id: int, source: dict) -> Corpus:
    """Left-pad a list of `(b_i, t_i)` tensors into one `(sum b_i, max t_i)` corpus."""
    width = max(c.shape[1] for c in chunks)
    ids = torch.cat([torch.nn.functional.pad(c, (width - c.shape[1], 0), value=pad_id) for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0), value=0) for m in masks])
    ids = ids.masked_fill(mask == 0, pad_id)
    return Corpus(ids, mask, source)


def _left_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` that pads on the left (the caller's tokenizer is left as it was)."""
    if tokenizer.padding_side == "left" and tokenizer.pad_token is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cache_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "data" / f"{kind}-{digest}.safetensors"


def _save(path: Path, corpus: Corpus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"input_ids": corpus.input_ids.contiguous(), "attention_mask": corpus.attention_mask.contiguous()},
              partial, metadata={"source": json.dumps(corpus.source, default=str)})
    partial.replace(path)


def _load(path: Path) -> Corpus:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        source = json.loads((f.metadata() or {}).get("source", "{}"))
    return Corpus(tensors["input_ids"], tensors["attention_mask"], source)
