"""``python -m orthograd_fast.cli``: the ``orthograd-fast`` command, which lives in
``orthograd_fast.unlearning.cli``."""
import sys

from .unlearning.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
