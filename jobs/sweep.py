#!/usr/bin/env python
"""Run the k × init × seed k-means grid on Dask and write results + report.

A shim: the code is `kmclust sweep` (kmclust/commands/sweep.py).
"""

import sys

from kmclust.cli import run_main
from kmclust.commands.sweep import main

if __name__ == "__main__":
    sys.exit(run_main(main))
