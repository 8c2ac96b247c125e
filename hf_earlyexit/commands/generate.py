"""`hf-earlyexit generate`: early-exit (or DSSD) text, with each token coloured by the exit it left from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..loading import ModelArgs
from ..modeling.options_earlyexit import BATCH_EXITS, DEFAULT_MAX_DRAFT, EXIT_POLICIES, KV_FILLS, MODES, DecodingOptions

# one colour per exit (shallow to deep), the full model uncoloured
EXIT_COLOURS = ("\033[92m", "\033[96m", "\033[93m", "\033[95m", "\033[94m", "\033[91m")
RESET = "\033[0m"


@dataclass
class GenerateArgs(ModelArgs):
    """Generate text with early exits and print where each token left."""

    dtype: str = field(default="bfloat16", metadata={"help": "base model dtype", "choices": ["float32", "bfloat16"]})
    prompt: list[str] | None = field(default=None, metadata={"help": "prompt(s) to continue (also positional)"})
    eps: float = field(default=0.9, metadata={"help": "accuracy target ε in [0, 1]; 1.0 = plain decoding"})
    mode: str = field(default="early_exit", metadata={
        "help": "early_exit (lossy), dssd (lossless self-speculative decoding) or plain", "choices": list(MODES)})
    # decoding options left unset take DecodingOptions' defaults; one set for another mode is refused by name
    kv_fill: str | None = field(default=None, metadata={
        "help": "early_exit: KV cache of skipped layers (default: recompute)", "choices": list(KV_FILLS)})
    batch_exit: str | None = field(default=None, metadata={
        "help": "early_exit with several prompts: step (every row rides along to the step's deepest exit; "
                "default) or row (each row runs only the layers up to its own exit)", "choices": list(BATCH_EXITS)})
    exit_policy: str | None = field(default=None, metadata={
        "help": "auto: only exits that pay at this ε (default); all: every exit", "choices": list(EXIT_POLICIES)})
    max_draft: int | None = field(default=None, metadata={
        "help": f"dssd: most tokens drafted per round (default: {DEFAULT_MAX_DRAFT})"})
    lookup: int | None = field(default=None, metadata={
        "help": "dssd: also draft by prompt lookup of n-grams up to this size (default: 0, off)"})

    def options(self) -> DecodingOptions:
        """The decoding options these arguments ask for (validated: a bad or misplaced option is named)."""
        return DecodingOptions.build(mode=self.mode, eps=None if self.mode == "plain" else self.eps,
                                     kv_fill=self.kv_fill, batch_exit=self.batch_exit, exit_policy=self.exit_policy,
                                     max_draft=self.max_draft,
                                     lookup=self.lookup)

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sampling: keep the k most likely tokens"})
    top_p: float = field(default=1.0, metadata={"help": "sampling: nucleus mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    colour: bool = field(default=False, metadata={"help": "colour each token by the exit it left from"})


def _generation_kwargs(args, tokenizer) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
              "pad_token_id": tokenizer.pad_token_id}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kwargs


def colour_tokens(tokenizer, token_ids: list[int], exits: list[int], num_exits: int) -> str:
    """The text of `token_ids`, each token wrapped in the ANSI colour of the exit it left from."""
    pieces = []
    for token, exit_index in zip(token_ids, exits, strict=True):
        if exit_index < 0:
            continue
        text = tokenizer.decode([token], skip_special_tokens=True)
        colour = EXIT_COLOURS[exit_index % len(EXIT_COLOURS)] if exit_index < num_exits else ""
        pieces.append(f"{colour}{text}{RESET}" if colour else text)
    return "".join(pieces)


def colour_legend(exit_layers: list[int]) -> str:
    names = [f"{EXIT_COLOURS[j % len(EXIT_COLOURS)]}exit@{layer}{RESET}" for j, layer in enumerate(exit_layers)]
    return "colours: " + " ".join(names) + " full model (plain)"


def run_generate(args: GenerateArgs) -> None:
    prompts = args.prompt or []
    if not prompts:
        raise ValueError("give a prompt: hf-earlyexit generate --eps 0.9 \"The capital of France is\"")
    options = args.options()  # before the model loads: a bad option costs nothing
    model, tokenizer = args.load()
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = _generation_kwargs(args, tokenizer)
    torch.manual_seed(args.seed)
    model.reset_exit_stats()
    start = time.perf_counter()
    if options.mode == "plain":
        sequences, exits = model.generate(**inputs, decoding=options, **kwargs), None
    else:
        out = model.generate(**inputs, decoding=options, return_dict_in_generate=True, **kwargs)
        sequences, exits = out.sequences, out.exit_index
    seconds = time.perf_counter() - start
    width = inputs["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        new = sequences[row, width:].tolist()
        if args.colour and exits is not None:
            text = colour_tokens(tokenizer, new, exits[row].tolist(), model.config.num_exits)
        else:
            text = tokenizer.decode(new, skip_special_tokens=True)
        print(f"{prompt}{text}\n")
    if args.colour and exits is not None:
        print(colour_legend(model.config.exit_layers))
    generated = int((sequences[:, width:] != tokenizer.pad_token_id).sum())
    settings = ", ".join(f"{k} {v}" for k, v in options.as_kwargs().items() if k != "mode")
    print(f"{generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tok/s), mode {options.mode}"
          + (f", {settings}" if settings else ""))
    if options.mode != "plain":
        print(model.exit_stats.summary())
