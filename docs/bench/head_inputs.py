"""What a head reads: held-out agreement of three head inputs trained side by side on the same data (issue 18).

- `context`: today's context heads at exits 4 and 8 (a trainable copy of the layer after the exit over the exit's
  hidden states, then a norm, a rank-64 adapter and the frozen LM head's rows of a 16k draft vocabulary).
- `side`: the same heads, whose block input also carries the full model's last-layer state of the previous position
  `f(t-1)` (what a DSSD round's first draft could read: the verify pass computed it): `h_k(t) + rms(h_k(t)) ·
  P(f(t-1) / rms)`, `P` zero at the start, `f` dropped at a random half of the positions in training (drafts after a
  round's first have none). Measured with `f` everywhere (`side, f given`) and nowhere (`side, f missing`).
- `eagle`: a drafter that reads no exit at all, as EAGLE's draft layer: `f(t-1)` and the embedding of token `t`,
  mixed by a zero-started `2d → d` map onto `f(t-1)`, into a trainable copy of the model's last layer, then the same
  norm / adapter / LM-head rows; trained on the top-k targets plus the normalised squared error of its output against
  `f(t)`, so that later drafts can read its own output. Measured with the true `f(t-1)` (a round's first draft) and
  with its own predicted features at every position (`eagle, own features`: a lower bound for later drafts).

Each variant trains for `--steps` steps of 8 rows on the model's own generations from the paper's 5 seed prompts
plus teacher-forced text (the shipped recipe's files, quarter size by default), top-64 distillation, learning rate
1e-3 with 50 warm-up steps and a cosine decay, bf16 autocast. Agreement is teacher-forced top-1 agreement with the
full model on the `agreement` command's held-out files (first 8,192 tokens) and on the model's greedy continuations
(64 tokens) of 8 unseen prose prompts (`PROMPTS`, or `--prompt_file`).

    python docs/bench/head_inputs.py --data ../shared/data --output docs/bench/head_inputs_xeon.json
"""

from __future__ import annotations

import argparse
import glob
import json
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from hf_earlyexit.evaluation.agreement import continuations
from hf_earlyexit.modeling.base_earlyexit import EMBEDDED, load_base_model, load_tokenizer
from hf_earlyexit.modeling.modeling_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.training.data import (
    Corpus,
    GenerationSpec,
    draft_vocabulary,
    read_prompt_file,
    read_text_files,
    text_corpus,
)
from hf_earlyexit.training.features import SparseTargets
from hf_earlyexit.training.lm_topk import final_topk
from hf_earlyexit.training.losses import linear_topk_loss
from hf_earlyexit.training.pipeline import TrainJob, build_corpus

EXITS = [4, 8]
# unseen prose prompts for the greedy continuations (neither training data nor the bench's prompt sets)
PROMPTS = [
    "The history of the printing press begins in", "When the storm finally passed, the villagers",
    "A good way to learn a new language is", "The committee met on Tuesday to discuss",
    "In the morning light, the old harbour", "Photosynthesis is the process by which",
    "She opened the letter and read the first line:", "The main difference between a virus and a bacterium is",
]


def rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def previous(x: Tensor) -> Tensor:
    """`x` `(batch, seq, d)` moved one position right: position `t` holds `x[t-1]` (zeros at the first)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def zero_linear(n_in: int, n_out: int) -> nn.Linear:
    linear = nn.Linear(n_in, n_out, bias=False)
    nn.init.zeros_(linear.weight)
    return linear


@torch.no_grad()
def backbone_view(model: EarlyExitForCausalLM, corpus: Corpus, k: int, batch_size: int = 8) -> dict[str, Tensor]:
    """Each exit's hidden states, the last layer's output `last` (bf16), the model's top `k` (ids, log-probs)."""
    parts = []
    for start in tqdm(range(0, len(corpus), batch_size), desc="Backbone pass", unit="batch"):
        ids, mask = corpus.input_ids[start:start + batch_size], corpus.attention_mask[start:start + batch_size]
        hidden, last = model.backbone_hidden(ids, attention_mask=mask)
        values, top_ids, lse = final_topk(model.engine, last, k, "auto")
        parts.append({**{f"h{j}": h.to(torch.bfloat16) for j, h in enumerate(hidden)}, "last": last.to(torch.bfloat16),
                      "ids": top_ids.to(torch.int32), "logp": (values - lse[..., None]).to(torch.float16)})
    view = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    view.update(input_ids=corpus.input_ids, mask=corpus.attention_mask, top=view["ids"][..., 0].long())
    return view


class Variant:
    """One way of feeding the heads, with its own heads, extra maps and optimiser."""

    def __init__(self, name: str, model: EarlyExitForCausalLM, extra: nn.Module | None, extra_lr: float,
                 steps: int) -> None:
        self.name, self.model, self.extra = name, model, extra
        groups = [{"params": [p for head in model.exit_heads for p in head.parameters() if p.requires_grad]}]
        if extra is not None:
            groups.append({"params": list(extra.parameters()), "lr": extra_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3)
        self.schedule = get_scheduler("cosine", self.optimizer, num_warmup_steps=50, num_training_steps=steps)
        self.embed = model.get_input_embeddings()

    def features(self, j: int, view: dict, rows, given: Tensor) -> Tensor:
        """Head `j`'s block outputs over `rows` of `view`; `given` `(rows, seq)`: where `f(t-1)` may be read."""
        head, mask = self.model.exit_heads[j], view["mask"][rows]
        if self.name == "eagle":
            return head.features(self.eagle_input(previous(view["last"][rows].float()), view["input_ids"][rows]),
                                 mask)
        hidden = view[f"h{j}"][rows].float()
        if self.name == "side":
            f = previous(view["last"][rows].float())
            hidden = hidden + rms(hidden).detach() * self.extra[j]((f / rms(f)) * given[..., None])
        return head.features(hidden, mask)

    def eagle_input(self, f_prev: Tensor, ids: Tensor) -> Tensor:
        e = self.embed(ids).float()
        return f_prev + rms(f_prev).detach() * self.extra[0](torch.cat([f_prev / rms(f_prev), e / rms(e)], -1))

    def step(self, view: dict, rows: Tensor, given: Tensor, reg: float) -> float:
        mask = view["mask"][rows]
        target = SparseTargets(view["ids"][rows].long(), view["logp"][rows].float())
        loss = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for j, head in enumerate(self.model.exit_heads):
                out = self.features(j, view, rows, given)
                loss = loss + linear_topk_loss(head, out, target, mask)
                if self.name == "eagle":  # its output should be f(t), which its next draft reads
                    f = view["last"][rows].float()
                    error = ((out.float() - f) / rms(f)).pow(2).mean(-1)
                    loss = loss + reg * (error * mask).sum() / mask.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach())

    @torch.no_grad()
    def agreement(self, view: dict, keep: Tensor) -> dict[str, list[float]]:
        rows = slice(None)
        out = {}
        if self.name == "eagle":
            head = self.model.exit_heads[0]
            feats = self.features(0, view, rows, None)
            for label in ("f given", "own features"):
                agree = head.to_token_ids(head.logits_from(feats).argmax(-1)) == view["top"]
                out[label] = [float(agree[keep].float().mean())]
                feats = head.features(self.eagle_input(previous(feats.float()), view["input_ids"]), view["mask"])
            return out
        settings = {"": True} if self.name == "context" else {"f given": True, "f missing": False}
        for label, present in settings.items():
            given = torch.full(view["mask"].shape, present)
            row = []
            for j, head in enumerate(self.model.exit_heads):
                logits = head.logits_from(self.features(j, view, rows, given))
                row.append(float((head.to_token_ids(logits.argmax(-1)) == view["top"])[keep].float().mean()))
            out[label] = row
        return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="the offline benchmark copies (../shared/data)")
    parser.add_argument("--prompt_file", default=None, help="unseen prompts for the continuations (default: PROMPTS)")
    parser.add_argument("--num_sequences", type=int, default=192)
    parser.add_argument("--max_text_tokens", type=int, default=86016)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--variants", nargs="+", default=["context", "side", "eagle"])
    parser.add_argument("--side_lr", type=float, default=5e-5, help="learning rate of the side input's map")
    parser.add_argument("--eagle_lr", type=float, default=1e-4, help="learning rate of the eagle input's map")
    parser.add_argument("--eagle_reg", type=float, default=1.0, help="weight of the eagle feature loss")
    parser.add_argument("--output", default=None)
    return parser.parse_args()


def training_corpus(args: argparse.Namespace, base, tokenizer) -> Corpus:
    """The recipe's sources: own generations from the paper's seed prompts, then the recipe's text files."""
    d = args.data
    files = [f"{d}/arc/ARC-Challenge-Test.jsonl", f"{d}/arc/ARC-Challenge-Dev.jsonl",
             *sorted(glob.glob(f"{d}/mmlu/test/*.csv")), *sorted(glob.glob(f"{d}/mmlu/dev/*.csv")),
             f"{d}/hellaswag/hellaswag_val_dev_split.jsonl"]
    job = TrainJob(output_dir="unused", text_files=files, max_text_tokens=args.max_text_tokens)
    spec = GenerationSpec(num_sequences=args.num_sequences, max_new_tokens=128, generation_batch_size=48)
    return build_corpus(job, spec, base, tokenizer, EMBEDDED)


def held_out_real(data: str, tokenizer) -> Corpus:
    """The held-out real text as `hf-earlyexit agreement` reads it: WinoGrande dev (second half), PIQA valid and
    ARC-Easy dev under `data`, in windows of 128 tokens, the first 64 windows (8,192 tokens)."""
    passages = read_text_files([f"{data}/winogrande/dev_second_half.jsonl", f"{data}/piqa/valid.jsonl",
                                f"{data}/arc/ARC-Easy-Dev.jsonl"])
    real = text_corpus(tokenizer, passages, seq_len=128, source="held-out")
    return Corpus(real.input_ids[:64], real.attention_mask[:64], real.source)


def held_out(args: argparse.Namespace, probe: EarlyExitForCausalLM, tokenizer) -> dict[str, tuple[dict, Tensor]]:
    """`{kind: (backbone view, positions to count)}` for the held-out real text and the greedy continuations."""
    real = held_out_real(args.data, tokenizer)
    prompts = list(read_prompt_file(args.prompt_file)) if args.prompt_file else PROMPTS
    cont, scored = continuations(probe, tokenizer, prompts, 64)
    return {"real text": (backbone_view(probe, real, 1), real.attention_mask.bool()),
            "continuations": (backbone_view(probe, cont, 1), scored & cont.attention_mask.bool())}


def make_variant(name: str, heads, d_model: int, args: argparse.Namespace) -> Variant:
    """Variant `name` with fresh heads (`heads(exits, context_init)`) and its extra map."""
    if name == "context":
        return Variant(name, heads(EXITS, "next"), None, 0.0, args.steps)
    if name == "side":
        maps = nn.ModuleList([zero_linear(d_model, d_model) for _ in EXITS])
        return Variant(name, heads(EXITS, "next"), maps, args.side_lr, args.steps)
    if name == "eagle":
        maps = nn.ModuleList([zero_linear(2 * d_model, d_model)])
        return Variant(name, heads([EXITS[0]], "last"), maps, args.eagle_lr, args.steps)
    raise ValueError(f"variant {name!r} is not one of context, side, eagle")


def train(variant: Variant, view: dict, rows: int, steps: int, reg: float) -> None:
    """`steps` steps of 8 random rows; every variant draws the same rows and the same dropped `f` positions."""
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc=f"Training {variant.name}", unit="step"):
        batch = torch.randint(0, rows, (8,), generator=generator)
        given = torch.rand(view["mask"][batch].shape, generator=generator) < 0.5
        variant.step(view, batch, given, reg)


def main() -> None:
    args = parse_args()
    base, tokenizer = load_base_model(EMBEDDED, dtype=torch.float32), load_tokenizer(EMBEDDED)
    corpus = training_corpus(args, base, tokenizer)
    _, train_part = corpus.split(0.1)
    draft = draft_vocabulary(corpus, base.config.get_text_config().vocab_size, 16384, [tokenizer.eos_token_id])

    def heads(exits: list[int], init: str) -> EarlyExitForCausalLM:
        torch.manual_seed(0)
        model = EarlyExitForCausalLM.from_base(base, exit_layers=exits, head="context", context_init=init,
                                               adapter_rank=64, draft_token_ids=draft, tokenizer=tokenizer)
        model.backbone.eval()
        return model

    probe = heads(EXITS, "next")
    t0 = time.time()
    view = backbone_view(probe, train_part, 64)
    held = held_out(args, probe, tokenizer)
    seconds = {"backbone": time.time() - t0}
    result = {"train_tokens": train_part.num_tokens, "steps": args.steps, "exits": EXITS, "args": vars(args),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "agreement": {}}
    for name in args.variants:
        variant = make_variant(name, heads, base.config.get_text_config().hidden_size, args)
        t0 = time.time()
        train(variant, view, len(train_part), args.steps, args.eagle_reg)
        seconds[name] = time.time() - t0
        for kind, (data, keep) in held.items():
            for label, row in variant.agreement(data, keep).items():
                result["agreement"].setdefault(kind, {})[f"{name}, {label}" if label else name] = row
    result["seconds"] = seconds
    for kind, rows in result["agreement"].items():
        print(f"\n{kind} (exit 4 / 8; eagle: one drafter)")
        for label, row in rows.items():
            print(f"  {label:28s} " + " / ".join(f"{a:.3f}" for a in row))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
