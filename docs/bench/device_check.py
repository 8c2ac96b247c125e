"""Early exit and DSSD on an accelerator, before timing anything there: the six tiny families of the tests, context
heads with thresholds at each head's median confidence, batch 1 and a left-padded batch of 4.

For each family it prints whether ε = 1 and DSSD at ε = 0.5 give plain greedy's tokens on the device (they must in
fp32 unless the device's kernels round differently for different shapes: then the first differing position is
printed), and whether early exit at ε = 0.5 ran with tokens leaving at the heads. Usage, from the checkout's root:

    python docs/bench/device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_decoding import GREEDY, set_median_thresholds  # noqa: E402
from tiny import ARCHS, batch, tiny_model  # noqa: E402

from hf_earlyexit import EarlyExitForCausalLM  # noqa: E402

NEW = 12


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    if a.shape != b.shape:
        return 0
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else int(diff[:, 1].min())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failures = 0
    for arch in ARCHS:
        model = EarlyExitForCausalLM.from_base(tiny_model(arch), exit_layers=[1, 2], head="context", adapter_rank=4)
        set_median_thresholds(model, quantile=0.3)  # on the CPU, before the move
        model.to(device)
        for lengths in ([7], [9, 5, 7, 3]):
            ids, mask = (t.to(device) for t in batch(lengths))
            plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, mode="plain", **GREEDY)
            results = {}
            for label, kwargs in (("eps=1", {"eps": 1.0}), ("dssd eps=0.5", {"mode": "dssd", "eps": 0.5}),
                                  ("early exit eps=0.5", {"eps": 0.5})):
                model.reset_exit_stats()
                got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs, **GREEDY)
                exited = sum(model.exit_stats.exit_counts[:-1]) / max(1, model.exit_stats.tokens)  # at a head
                results[label] = (first_difference(got, plain), exited)
            lossless_ok = results["eps=1"][0] is None and results["dssd eps=0.5"][0] is None
            failures += not lossless_ok
            print(f"{arch:12s} batch {len(lengths)}: " + "; ".join(
                f"{label}: {'same as plain' if first is None else f'differs at position {first}'}, exited {ex:.2f}"
                for label, (first, ex) in results.items()))
    print("all lossless runs equal plain greedy" if not failures else f"{failures} lossless runs differ")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
