#!/usr/bin/env python
"""Stage an MNIST-like source into a chunked zarr store.

A shim: the code is `kmclust stage` (kmclust/commands/stage.py).
"""

import sys

from kmclust.cli import run_main
from kmclust.commands.stage import main

if __name__ == "__main__":
    sys.exit(run_main(main))
