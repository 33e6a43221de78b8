"""``python -m microtrain`` (and ``torchrun -m microtrain``) is the same as the ``microtrain`` command."""

import sys

from microtrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
