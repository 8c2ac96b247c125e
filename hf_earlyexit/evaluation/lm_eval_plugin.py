"""Registration of the `ee-hf` lm-eval model type, and `hf-earlyexit eval` (lm-eval with our defaults)."""

from __future__ import annotations

import sys

MODEL_NAME = "ee-hf"
TARGET = "hf_earlyexit.evaluation.lm_eval_model:EarlyExitLM"


def register() -> None:
    """Add `ee-hf` to lm-eval's model registry (lazily: the model module is imported only when used).

    lm-eval imports its built-in models only while the registry is empty, so they are imported first; otherwise
    registering ours would hide `--model hf` and the rest.
    """
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def run_eval(argv: list[str]) -> None:
    """`lm_eval` with `--model ee-hf` (unless given), then the exit report table."""
    register()
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if "--model" not in argv:
        argv = ["--model", MODEL_NAME, *argv]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
