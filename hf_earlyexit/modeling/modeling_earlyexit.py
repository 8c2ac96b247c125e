"""`EarlyExitForCausalLM`: a frozen HF causal LM plus exit heads (portable: torch, transformers, safetensors).

A saved folder holds only what the heads own: `config.json` (with `auto_map`, the base model id + revision, exits,
head type, metric, thresholds, format version), `exit_heads.safetensors`, the tokenizer, these portable files and a
model card (layout and Hub upload: `hub_earlyexit.py`). Loading pulls the base weights from the recorded
id/revision (or the embedded default, or the folder's own `base/` copy when it was saved merged) and checks that the
heads fit them.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .architectures_earlyexit import arch_spec
from .base_earlyexit import (
    EMBEDDED,
    canonical_name,
    check_local_path,
    embedded_revision,
    load_base_model,
    load_tokenizer,
    record_name,
    weight_fingerprint,
)
from .configuration_earlyexit import EarlyExitConfig, UnsupportedFormatError, folder_format
from .costs_earlyexit import CostModel
from .decoding_earlyexit import early_exit_generate
from .engine_earlyexit import ContextLayer, LayerEngine
from .exits_earlyexit import fit_thresholds
from .folder_earlyexit import (
    BASE_SUBFOLDER,
    CALIBRATION_FILE,
    HEADS_FILE,
    HeadsMismatchError,
    check_compatible,
    check_extra_file_name,
    check_revision,
    clean_stale_staging,
    load_recorded_base,
    make_staging,
    read_calibration,
    read_heads,
    recover_backup,
    replace_dir,
    resolved_commit,
)
from .heads_earlyexit import ExitHead, build_head, context_block
from .hub_earlyexit import check_pushable, check_repo_id, upload_heads_folder, write_card
from .metrics_earlyexit import gates_from_stats
from .options_earlyexit import OPTION_NAMES, DecodingOptions, check_eps
from .speculative_earlyexit import dssd_generate
from .stats_earlyexit import ExitStats
from .storage_earlyexit import decode_blocks, encode_change

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_earlyexit.EarlyExitConfig",
    "AutoModel": "modeling_earlyexit.EarlyExitForCausalLM",
    "AutoModelForCausalLM": "modeling_earlyexit.EarlyExitForCausalLM",
}
# keyword arguments of `from_pretrained` that locate files rather than configure the base model
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "subfolder")
_DROPPED_KWARGS = (
    "trust_remote_code", "code_revision", "_from_auto", "_from_pipeline", "_commit_hash", "adapter_kwargs",
)


@dataclass
class EarlyExitOutput(ModelOutput):
    """Output of `EarlyExitForCausalLM.forward`.

    Attributes:
        logits: `(batch, seq, vocab)` the full model's logits.
        exit_logits: one `(batch, seq, head_vocab)` per exit, in `config.exit_layers` order.
        exit_hidden_states: one `(batch, seq, hidden)` raw layer output per exit (when asked).
    """

    logits: Tensor | None = None
    exit_logits: tuple[Tensor, ...] | None = None
    exit_hidden_states: tuple[Tensor, ...] | None = None


class EarlyExitForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen decoder-only causal LM (`backbone`) with exit heads after `config.exit_layers`.

    Args:
        config: the heads' config; `config.text_config` describes the base model.
        backbone: the loaded base model. When `None`, one is built (randomly initialised) from `text_config`.
        draft_token_ids: `(draft_vocab_size,)` token ids of the heads' draft vocabulary; when `None` with a
            `draft_vocab_size` set, the first ids (a saved folder's buffer overwrites them on load).
    """

    config_class = EarlyExitConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self, config: EarlyExitConfig, backbone: PreTrainedModel | None = None, draft_token_ids: Tensor | None = None
    ) -> None:
        super().__init__(config)
        arch_spec(config.text_config.model_type)  # unsupported architectures fail here, naming the supported ones
        if backbone is None:
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_config(config.text_config)
        self.backbone = backbone.requires_grad_(False)
        self.engine = LayerEngine(backbone)
        parts = self.engine.parts
        draft_ids = draft_token_ids
        if draft_ids is None and config.draft_vocab_size is not None:
            draft_ids = torch.arange(config.draft_vocab_size)
        if draft_ids is not None:
            draft_ids = draft_ids.to(parts.lm_head.weight.device)
        softcap = getattr(config.text_config, "final_logit_softcapping", None)
        self.heads = nn.ModuleList(
            build_head(
                config.head_type, parts.norm, parts.lm_head, draft_ids, softcap,
                init=config.head_init, rank=config.adapter_rank,
                init_std=getattr(config.text_config, "initializer_range", 0.02),
                block=self._context_block(k, m) if config.head_type == "context" else None,
            )
            for m, k in enumerate(config.exit_layers)
        )
        contexts = []
        for head, k in zip(self.heads, config.exit_layers, strict=True):
            if head.has_context:
                head.bind(self.engine, len(contexts))
                contexts.append(ContextLayer(head.block, source=k, copies=self._context_copies(k)))
        self.engine.set_context_layers(contexts)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.calibration_stats: dict[str, Tensor] | None = None  # per head and token: score, agreement
        self.exit_stats = ExitStats(exit_layers=list(config.exit_layers), num_layers=self.engine.num_layers)
        # how `generate()` decodes when a call names no decoding option (e.g. a pipeline that passes HF arguments
        # only): set it to a `DecodingOptions` to change the default mode
        self.decoding = DecodingOptions()
        self._costs: tuple[tuple, CostModel] | None = None

    def _context_copies(self, k: int) -> int:
        """The model layer the block of a context head at exit `k` copies (`config.context_init`)."""
        return k if self.config.context_init == "next" else self.engine.num_layers - 1

    def _context_block(self, k: int, m: int) -> nn.Module:
        """The block of the `m`-th context head (exit `k`): it writes cache slot `L + m`, after the model's own."""
        parts = self.engine.parts
        return context_block(parts.layers[self._context_copies(k)], parts.spec.attn, self.engine.num_layers + m,
                             rank=self.config.context_rank)

    def _block_origins(self) -> dict[str, Tensor]:
        """Each matrix of the context heads' full blocks (its `self.heads` state key) -> the same matrix of the model
        layer the block copies: what `block_delta_bits` stores changes from."""
        parts = self.engine.parts
        return {
            f"{m}.block.{name}": weight
            for m, (head, k) in enumerate(zip(self.heads, self.config.exit_layers, strict=True)) if head.has_context
            for name, weight in parts.layers[self._context_copies(k)].named_parameters() if weight.dim() == 2
        }

    # -- building and loading ----------------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base: str | PreTrainedModel = EMBEDDED,
        exit_layers: list[int] | None = None,
        head: str = EarlyExitConfig.head_type,
        *,
        head_init: str = EarlyExitConfig.head_init,
        context_init: str = EarlyExitConfig.context_init,
        context_rank: int | None = None,
        adapter_rank: int | None = None,
        draft_token_ids: Tensor | list[int] | None = None,
        draft_vocab_size: int | None = None,
        metric: str = EarlyExitConfig.metric,
        eps: float = EarlyExitConfig.eps,
        heads_dtype: str = EarlyExitConfig.heads_dtype,
        block_delta_bits: int | None = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **base_kwargs,
    ) -> EarlyExitForCausalLM:
        """Attach new (untrained) exit heads to a base model.

        Args:
            base: a loaded HF causal LM, a Hub id, a local path or `"embedded"`.
            exit_layers: exit after these decoder layers (1..L-1); default: exits at regular intervals.
            head: `"paper"`, `"shared"` or `"context"` (`context_init`: which layer the block copies;
                `context_rank`: train low-rank deltas on the block's projections instead of a full copy).
            draft_token_ids: restrict heads to these token ids (e.g. the most frequent ones).
            draft_vocab_size: without `draft_token_ids`, restrict heads to the first `draft_vocab_size` ids.
            heads_dtype: how saved folders store the head weights (`"float32"`, or `"bfloat16"`: half the bytes).
            block_delta_bits: context heads with full blocks: saved folders store each block weight as its change
                from the layer it copies, in 3..8 bits (`None`: whole, in `heads_dtype`).
        """
        if isinstance(base, str):
            name = record_name(base)  # a local folder by its absolute path: the heads load from anywhere
            if tokenizer is None:
                tokenizer = load_tokenizer(base, revision)
            revision = embedded_revision() if base == EMBEDDED else resolved_commit(name, revision, base_kwargs)
            base = load_base_model(name, revision, dtype=dtype, **base_kwargs)
        else:
            name, known_revision = canonical_name(base)
            revision = revision or known_revision
            base.requires_grad_(False)
        if draft_token_ids is not None:
            draft_token_ids = torch.as_tensor(draft_token_ids, dtype=torch.long)
            draft_vocab_size = len(draft_token_ids)
        config = EarlyExitConfig(
            base_model_name_or_path=name, base_revision=revision, text_config=base.config.to_dict(),
            exit_layers=exit_layers, head_type=head, head_init=head_init, context_init=context_init,
            context_rank=context_rank,
            adapter_rank=adapter_rank,
            draft_vocab_size=draft_vocab_size, metric=metric, eps=eps, base_fingerprint=weight_fingerprint(base),
            heads_dtype=heads_dtype, block_delta_bits=block_delta_bits,
        )
        if draft_token_ids is not None:
            _check_token_ids(draft_token_ids, config.text_config.vocab_size)
        model = cls(config, backbone=base, draft_token_ids=draft_token_ids)
        model.tokenizer = tokenizer
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args,
        config: EarlyExitConfig | None = None,
        base_model: PreTrainedModel | None = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        base_model_revision: str | None = None,
        ignore_base_mismatch: bool = False,
        **kwargs,
    ) -> EarlyExitForCausalLM:
        """Load saved heads (a folder or a Hub repo id) and their base model, or attach them to `base_model`.

        Args:
            pretrained_model_name_or_path: heads folder or Hub repo id (`"user/repo"`).
            base_model: a loaded base model you already hold; default: the one the heads record (id + revision), or
                the folder's own `base/` copy when it was pushed merged.
            revision: revision of the heads repo.
            base_model_revision: load the base at this revision instead of the recorded one (a mismatch error
                unless `ignore_base_mismatch`).
            ignore_base_mismatch: turn a different base revision or weight fingerprint into a warning (heads built
                for another shape still fail).
            kwargs: hub arguments (`token`, `cache_dir`, ...) apply to heads and base; the rest go to the base's
                `from_pretrained`.
        """
        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args!r}")
        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        for key in _DROPPED_KWARGS:
            kwargs.pop(key, None)
        source = str(pretrained_model_name_or_path)
        check_local_path(source, "heads folder")
        if config is None:
            config = read_config(source, revision, hub)
        state = read_heads(source, revision=revision, **hub)
        if base_model is None:
            base_model = load_recorded_base(
                config, source, revision, hub, base_model_revision, ignore_base_mismatch, dtype=dtype, **kwargs
            )
        else:
            check_revision(config, canonical_name(base_model)[1], ignore_base_mismatch)
        check_compatible(config, base_model, ignore_base_mismatch=ignore_base_mismatch)
        model = cls(config, backbone=base_model)
        model.load_heads_state(state, source)
        model.calibration_stats = read_calibration(source, revision=revision, **hub)
        check_calibration(model.calibration_stats, config.num_exits, source)
        return model.eval()

    def load_heads_state(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load head weights (as saved by `save_pretrained`), with errors that name the bad entry."""
        if self.config.block_delta_bits is not None:
            try:
                state = decode_blocks(state, self._block_origins(), self.config.block_delta_bits)
            except ValueError as err:
                raise HeadsMismatchError(f"heads in {source}: {err}") from None
        expected = self.heads.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise HeadsMismatchError(
                f"heads in {source} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise HeadsMismatchError(
                    f"head tensor {key!r} in {source} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[key].shape)} for this base model"
                )
            if key.endswith("token_ids"):  # the draft vocabulary: ids the base model's vocabulary has, once each
                try:
                    _check_token_ids(tensor, self.config.text_config.vocab_size)
                except ValueError as err:
                    raise HeadsMismatchError(f"head tensor {key!r} in {source}: {err}") from None
        self.heads.load_state_dict(state, strict=True)

    # -- saving ------------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        overwrite: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        extra_files: dict[str, Path] | None = None,
        merged: bool = False,
        repo_id: str | None = None,
        **kwargs,
    ) -> None:
        """Write the heads folder atomically: config.json (+ auto_map), exit_heads.safetensors, tokenizer, code and
        the model card `README.md`.

        Refuses a non-empty `save_directory` unless `overwrite=True`; on any failure nothing is left behind and the
        previous contents stay (or the error names where they are). Staging folders of killed saves are removed.
        `extra_files` (name -> existing file) are copied in too (logs, plots, `bench.json`, `eval_results.json`,
        which the card reports; a `README.md` among them replaces the rendered card): names are relative paths
        inside the folder, never the heads' own files or tensor files. `merged=True` also writes a
        full copy of the base model under `base/` (large; loading then needs no other base). `repo_id` names the
        Hub repo in the card's usage snippets.
        """
        target = Path(save_directory)
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True is not handled by save_pretrained; call model.push_to_hub(repo_id)")
        extra_files = {check_extra_file_name(name): Path(source) for name, source in (extra_files or {}).items()}
        for name, source in extra_files.items():
            if not source.is_file():
                raise FileNotFoundError(f"extra_files[{name!r}]: {source} is not a file")
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} is a file, not a folder; remove it or choose another path")
        if target.parent.is_dir():
            recover_backup(target)  # an interrupted save's previous contents go back first: never lost
            clean_stale_staging(target)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging(target)
        try:
            config = self._write_folder(staging, tokenizer or self.tokenizer, merged)
            for name, source in extra_files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / name)
            write_card(staging, config, repo_id)
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_folder(self, folder: Path, tokenizer: PreTrainedTokenizerBase | None, merged: bool) -> EarlyExitConfig:
        config = copy.deepcopy(self.config)
        config.auto_map = dict(AUTO_MAP)
        config.format_version = folder_format(config)
        config.base_subfolder = BASE_SUBFOLDER if merged else None
        config.save_pretrained(folder)
        if merged:
            self.backbone.save_pretrained(folder / BASE_SUBFOLDER)
        stored = getattr(torch, config.heads_dtype)  # floating weights in the config's storage dtype; ids stay ints
        origins = self._block_origins() if config.block_delta_bits is not None else {}
        state = {}
        for key, value in self.heads.state_dict().items():
            if key in origins:  # a block matrix: its change from the layer the block copies, quantised
                state |= encode_change(key, value.float() - origins[key].float(), config.block_delta_bits)
            else:
                state[key] = (value.to(stored) if value.is_floating_point() else value).detach().contiguous().cpu()
        save_file(state, folder / HEADS_FILE, metadata={"format": "pt"})
        if self.calibration_stats:
            save_file(self.calibration_stats, folder / CALIBRATION_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for source in sorted(Path(__file__).parent.glob("*_earlyexit.py")):
            shutil.copyfile(source, folder / source.name)
        return config

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        force: bool = False,
        merged: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        extra_files: dict[str, Path] | None = None,
    ):
        """Upload the heads folder (as `save_pretrained` writes it, with its model card) to the Hub in one commit.

        Args:
            repo_id: `"user/name"` or `"org/name"`; created (with `private`) when it does not exist.
            revision: branch to commit to (created when absent).
            force: push heads that were never trained (refused otherwise).
            merged: also upload a full copy of the base model under `base/` (off: only the heads' own files go up,
                never base weights).
            extra_files: name -> file to include (`bench.json`, `eval_results.json` feed the card's results).

        Returns:
            huggingface_hub's `CommitInfo`.
        """
        check_repo_id(repo_id)
        check_pushable(self.config, force)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "heads"
            self.save_pretrained(folder, tokenizer=tokenizer, extra_files=extra_files, merged=merged, repo_id=repo_id)
            return upload_heads_folder(
                folder, repo_id, private=private, token=token, revision=revision, commit_message=commit_message,
                create_pr=create_pr, merged=merged,
            )

    # -- running -----------------------------------------------------------------------------------------------

    def get_base_model(self) -> PreTrainedModel:
        """The unmodified HF causal LM the heads are attached to."""
        return self.backbone

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> EarlyExitOutput:
        """One pass through the base model, reading every exit on the way.

        Args:
            input_ids: `(batch, seq)`; left or right padding marked by `attention_mask` `(batch, seq)`.
            output_hidden_states: also return each exit's raw hidden states.
        """
        _check_mask(input_ids, attention_mask)
        exit_hidden, logits = self.backbone_states(input_ids, attention_mask)
        return EarlyExitOutput(
            logits=logits,
            exit_logits=tuple(head(hidden, attention_mask) for head, hidden in zip(self.heads, exit_hidden,
                                                                                      strict=True)),
            exit_hidden_states=exit_hidden if output_hidden_states else None,
        )

    def backbone_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The frozen base model's side of `forward`: each exit's raw hidden states `(batch, seq, hidden)` and the
        full model's logits `(batch, seq, vocab)`, without running any head."""
        exit_hidden, last = self.backbone_hidden(input_ids, attention_mask)
        return exit_hidden, self.engine.final_logits(last)  # (batch, seq, vocab)

    def backbone_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None
                        ) -> tuple[tuple[Tensor, ...], Tensor]:
        """`backbone_states` before the final norm and LM head: each exit's raw hidden states and the last
        layer's `(batch, seq, hidden)`, for callers that read the LM head their own way (the teacher pass)."""
        state = self.engine.start(input_ids, attention_mask)
        exit_hidden = tuple(self.engine.run_to(state, layer) for layer in self.config.exit_layers)
        return exit_hidden, self.engine.run_to(state, self.num_layers)

    def generate(self, inputs: Tensor | None = None, *, decoding: DecodingOptions | None = None,
                 drafters: tuple = (), **kwargs):
        """Generate token ids; every HF `generate()` argument applies (lengths, sampling, stopping, streamers, ...).

        Args:
            decoding: how to decode (a `DecodingOptions`); default `model.decoding` (plain decoding unless set).
            kwargs: HF `generate()` arguments, and decoding options by name, which update `decoding`: `mode`
                (`"plain"`, `"early_exit"`, `"dssd"`; `"early_exit"` when only `eps` is given), `eps`,
                `exit_policy`, `kv_fill` (early exit), `max_draft`, `lookup`, `adaptive_draft` (DSSD). An option
                for another mode than the call's is refused, naming it.
            drafters: DSSD: factories `(DecodeRun) -> Drafter` of drafters of your own (the contract of
                `drafters_earlyexit.py`), asked before prompt lookup and the heads.

        With `return_dict_in_generate=True`, an early-exit or DSSD call returns `EarlyExitGenerateOutput` (HF's
        output plus `exit_stats` and the exit of each token); `model.exit_stats` accumulates over calls until
        `reset_exit_stats()`.
        """
        _check_mask(inputs if inputs is not None else kwargs.get("input_ids"), kwargs.get("attention_mask"))
        given = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        options = DecodingOptions.build(decoding or self.decoding, **given)
        if drafters and options.mode != "dssd":
            raise ValueError(f"drafters apply to mode='dssd', not mode={options.mode!r}")
        if options.mode == "plain":
            return self.backbone.generate(inputs, **kwargs)
        self.thresholds_for(self.config.eps if options.eps is None else options.eps)  # calibrated? before any work
        if options.mode == "early_exit":
            return early_exit_generate(self, inputs, options, **kwargs)
        return dssd_generate(self, inputs, options, drafters, **kwargs)

    def reset_exit_stats(self) -> None:
        """Start counting exits and work afresh (`model.exit_stats`)."""
        self.exit_stats = ExitStats(exit_layers=list(self.config.exit_layers), num_layers=self.engine.num_layers)

    def thresholds_for(self, eps: float) -> list[float | None]:
        """Per-exit thresholds at accuracy target `eps` (`None`: that exit never fires); `eps=1` never exits.

        From the calibrated grid when `eps` is on it, else derived from the stored calibration statistics.
        """
        eps = check_eps(eps)  # a number in [0, 1], named when it is not (text, True, NaN)
        if float(eps) == 1.0:
            return [None] * self.config.num_exits
        grid = self.config.thresholds or {}
        if f"{float(eps):g}" in grid:
            return list(grid[f"{float(eps):g}"])
        if not self.calibration_stats:
            raise ValueError(f"eps={eps!r}: these heads are not calibrated (run `hf-earlyexit calibrate`)")
        stats = self.calibration_stats
        fit = (self.config.calibration or {}).get("fit", "per_head")  # folders from before the cascade fit
        if "aligned" not in stats:
            fit = "per_head"
        exits = range(self.config.num_exits)
        return fit_thresholds([stats[f"score.{j}"] for j in exits], [stats[f"agree.{j}"] for j in exits],
                              float(eps), fit)

    def scoring_gates_for(self, eps: float, delta: float) -> tuple[float, ...] | None:
        """Per exit, the confidence a scored position leaving there must also reach for a log-likelihood to read the
        head (`gate_for_eps`): the head's log-probability of the scored token within `delta` nats of the full
        model's at rate ≥ `eps` on the calibration tokens. `None`: the calibration statistics hold no log-probability
        errors (calibrated before they were recorded) or `delta` is infinite, so no gates."""
        return gates_from_stats(self.calibration_stats, self.config.num_exits, float(check_eps(eps)), delta)

    @property
    def costs(self) -> CostModel:
        """The per-token cost model of this model's layers, heads and LM head (built again when dtype or device
        change)."""
        weight = self.engine.parts.lm_head.weight
        key = (weight.dtype, weight.device)
        if self._costs is None or self._costs[0] != key:
            self._costs = (key, CostModel(self))
        return self._costs[1]

    def cost_table(self) -> list[dict[str, int]]:
        """Per-token cost of stopping at each exit vs running the full model (weight multiply-adds and bytes)."""
        return self.costs.table()

    @property
    def exit_heads(self) -> list[ExitHead]:
        return list(self.heads)


def read_config(source: str, revision: str | None, hub: dict) -> EarlyExitConfig:
    """The heads' `config.json`, with a bad field named together with the folder it came from."""
    try:
        return EarlyExitConfig.from_pretrained(source, revision=revision, **hub)
    except UnsupportedFormatError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"config.json of the heads in {source} is invalid: {err}") from err


def check_calibration(stats: dict[str, Tensor] | None, num_exits: int, source: str) -> None:
    """Calibration statistics must hold, per exit `j`, `score.{j}` and `agree.{j}`: 1-D and of equal length."""
    if stats is None:
        return
    expected = [f"{kind}.{j}" for j in range(num_exits) for kind in ("score", "agree")]
    missing = [key for key in expected if key not in stats]
    if missing:
        raise ValueError(f"calibration file {CALIBRATION_FILE} in {source} lacks {missing[:4]} (it holds "
                         f"{sorted(stats)[:6]}); expected score.j and agree.j for each of the {num_exits} exits: "
                         "calibrate again (hf-earlyexit calibrate)")
    lengths = {key: tuple(stats[key].shape) for key in expected}
    for j in range(num_exits):
        score, agree = lengths[f"score.{j}"], lengths[f"agree.{j}"]
        if len(score) != 1 or score != agree:
            raise ValueError(f"calibration file {CALIBRATION_FILE} in {source}: score.{j} {score} and agree.{j} "
                             f"{agree} must be 1-D of equal length")
    for j in range(num_exits):
        if f"error.{j}" in stats and tuple(stats[f"error.{j}"].shape) != lengths[f"score.{j}"]:
            raise ValueError(f"calibration file {CALIBRATION_FILE} in {source}: error.{j} "
                             f"{tuple(stats[f'error.{j}'].shape)} must have the shape of score.{j} "
                             f"{lengths[f'score.{j}']}")
    if "aligned" in stats and len({lengths[f"score.{j}"] for j in range(num_exits)}) > 1:
        raise ValueError(f"calibration file {CALIBRATION_FILE} in {source} is marked aligned but its exits hold "
                         f"different token counts {[lengths[f'score.{j}'][0] for j in range(num_exits)]}")


def _check_mask(input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
    if input_ids is None or attention_mask is None or not hasattr(attention_mask, "shape"):
        return
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected the shape of input_ids, "
                         f"{tuple(input_ids.shape)} (batch, sequence)")


def _check_token_ids(token_ids: Tensor, vocab: int) -> None:
    if token_ids.dim() != 1 or len(token_ids) == 0:
        raise ValueError(f"draft_token_ids must be a non-empty 1-D list of ids, got shape {tuple(token_ids.shape)}")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
        low, high = int(token_ids.min()), int(token_ids.max())
        raise ValueError(f"draft_token_ids must lie in 0..{vocab - 1}, got ids from {low} to {high}")
    if len(set(token_ids.tolist())) != len(token_ids):
        raise ValueError("draft_token_ids contains duplicates")
