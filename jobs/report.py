#!/usr/bin/env python
"""Draw the figures and REPORT.md of a sweep's results store.

A shim: the code is `kmclust report` (kmclust/commands/report.py).
"""

import sys

from kmclust.cli import run_main
from kmclust.commands.report import main

if __name__ == "__main__":
    sys.exit(run_main(main))
