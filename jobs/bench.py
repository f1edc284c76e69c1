#!/usr/bin/env python
"""Benchmark kmclust against scikit-learn and dask-ml on Fashion-MNIST.

A shim: the code is `kmclust bench` (kmclust/commands/bench.py).
"""

import sys

from kmclust.cli import run_main
from kmclust.commands.bench import main

if __name__ == "__main__":
    sys.exit(run_main(main))
