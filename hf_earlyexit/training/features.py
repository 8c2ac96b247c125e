"""The frozen backbone's view of a corpus, kept on disk: per exit hidden states and the model's top-k next tokens.

Head training reads only what the backbone computes from the corpus (each exit's hidden states, the model's next-token
distribution, its top token), and the backbone never changes, so one teacher-forced pass writes it all into
safetensors shards and every later epoch, and every later run with other head settings (rank, loss, learning rates,
head type), reads the shards instead of running the backbone. Shards are written one at a time and atomically, so an
interrupted pass resumes at the first missing shard, and a corpus larger than memory streams through.

The model's distribution is stored as its top `k` token ids and log-probabilities per position (top-k distillation):
a 262k-way distribution per token would take 1 MB; the top 64 take 384 bytes and hold nearly all of the mass. The
pass reads them through `lm_topk.final_topk`: on CPUs with native bfloat16 products it screens the LM head in
bf16 and keeps float32 logits of the exact top k, with the normaliser (log-sum-exp over the vocabulary) to bf16
rounding (≤ 0.05 on real text; top-k distillation renormalises the top k, so the heads' targets do not move). On
the embedded model that made the pass 1.5x faster on an AMD EPYC (2 threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..modeling.base_earlyexit import weight_fingerprint
from ..modeling.modeling_earlyexit import EarlyExitForCausalLM
from .data import Corpus
from .lm_topk import final_topk

logger = logging.getLogger(__name__)

MANIFEST = "features.json"
FORMAT = 1


@dataclass
class SparseTargets:
    """The model's next-token distribution as its top `k` tokens: `ids` `(..., k)` long (full-vocabulary ids) and
    `logp` `(..., k)` float32 log-probabilities."""

    ids: Tensor
    logp: Tensor

    def __getitem__(self, index) -> SparseTargets:
        return SparseTargets(self.ids[index], self.logp[index])


def store_key(model: EarlyExitForCausalLM, corpus: Corpus, k: int) -> dict:
    """Everything the stored features depend on: the base weights, the exits, the corpus's tokens, `k`, the dtype."""
    digest = hashlib.sha256()
    digest.update(corpus.input_ids.numpy().tobytes())
    digest.update(corpus.attention_mask.numpy().tobytes())
    return {"format": FORMAT, "base": model.config.base_model_name_or_path,
            "fingerprint": weight_fingerprint(model.backbone), "exit_layers": list(model.config.exit_layers),
            "dtype": str(model.dtype), "k": k, "corpus": digest.hexdigest()[:24],
            "rows": len(corpus), "width": corpus.input_ids.shape[1]}


class FeatureStore:
    """Shards of backbone features for one corpus in `folder` (see the module docstring).

    Each shard `shard-NNNNN.safetensors` holds `rows` corpus rows: `hidden.{j}` `(rows, seq, hidden)` per exit (the
    model's dtype), `topk_ids` `(rows, seq, k)` int32, `topk_logp` `(rows, seq, k)` float16, `top` `(rows, seq)`
    int32 and `mask` `(rows, seq)` uint8.
    """

    def __init__(self, folder: Path, key: dict, shard_rows: int) -> None:
        self.folder, self.key, self.shard_rows = Path(folder), key, shard_rows

    @property
    def num_rows(self) -> int:
        return self.key["rows"]

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors"

    @classmethod
    @torch.no_grad()
    def build(cls, model: EarlyExitForCausalLM, corpus: Corpus, folder: str | Path, k: int = 64,
              batch_size: int = 8, shard_rows: int = 256) -> FeatureStore:
        """Write (or finish writing) the features of `corpus` into `folder`; refuses a folder made for other data."""
        if k < 1:
            raise ValueError(f"k={k!r} must be a positive number of teacher tokens per position")
        folder = Path(folder)
        key = store_key(model, corpus, k)
        manifest = folder / MANIFEST
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            if stored["key"] != key:
                old = stored["key"]
                diffs = sorted(name for name in set(key) | set(old) if key.get(name) != old.get(name))
                raise ValueError(f"{folder} holds features of other data or another model (differs in {diffs}); "
                                 "use another folder")
            shard_rows = stored["shard_rows"]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({"key": key, "shard_rows": shard_rows}, indent=1))
        store = cls(folder, key, shard_rows)
        missing = [i for i in range(store.num_shards) if not store.shard_path(i).exists()]
        if missing:
            logger.info("Backbone pass over %d rows into %s (%d shards to write)", len(corpus), folder, len(missing))
        for index in tqdm(missing, desc="Teacher pass (features to disk)", unit="shard", disable=not missing):
            rows = range(index * shard_rows, min((index + 1) * shard_rows, len(corpus)))
            parts = [_features(model, corpus, torch.arange(s, min(s + batch_size, rows.stop)), k)
                     for s in range(rows.start, rows.stop, batch_size)]
            tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
            partial = store.shard_path(index).with_suffix(".partial")
            save_file(tensors, partial)
            partial.replace(store.shard_path(index))
        return store

    def shards(self) -> Iterator[dict[str, Tensor]]:
        """Every shard, in order, as a dict of tensors."""
        for index in range(self.num_shards):
            yield self.read(index)

    def read(self, index: int, rows: Tensor | None = None) -> dict[str, Tensor]:
        """Shard `index` (or only its `rows`, shard-local indices) as a dict of tensors."""
        out = {}
        with safe_open(self.shard_path(index), "pt") as f:
            for name in f.keys():
                if rows is None:
                    out[name] = f.get_tensor(name)
                else:
                    out[name] = f.get_slice(name)[int(rows.min()): int(rows.max()) + 1][rows - rows.min()]
        return out


def _features(model: EarlyExitForCausalLM, corpus: Corpus, rows: Tensor, k: int, screen: str = "auto"
              ) -> dict[str, Tensor]:
    """The backbone's features of corpus `rows`, at the corpus's full width (left padding kept); the model's top `k`
    through `lm_topk.final_topk` (`screen`: its LM-head screen)."""
    ids, mask = corpus.input_ids[rows].to(model.device), corpus.attention_mask[rows].to(model.device)
    hidden, last = model.backbone_hidden(ids, attention_mask=mask)
    values, top_ids, lse = final_topk(model.engine, last, k, screen)  # (batch, seq, k) x 2, (batch, seq)
    top_logp = values - lse.unsqueeze(-1)  # (batch, seq, k)
    out = {f"hidden.{j}": h.cpu() for j, h in enumerate(hidden)}
    out.update(topk_ids=top_ids.to(torch.int32).cpu(), topk_logp=top_logp.to(torch.float16).cpu(),
               top=top_ids[..., 0].to(torch.int32).cpu(), mask=mask.to(torch.uint8).cpu())
    return out
