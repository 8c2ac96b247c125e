"""`python -m hf_earlyexit ...` (and `accelerate launch -m hf_earlyexit train ...`): the `hf-earlyexit` command."""

import sys

from .commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
