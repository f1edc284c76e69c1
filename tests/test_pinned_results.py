"""Pinned results: today's numbers on a small grid, bit for bit, as a guard for refactors.

The sweep (``run_sweep`` on dask's threaded scheduler, the job's ``--scheduler threads``
path) is run on the ``mnist_subset_store`` fixture for a small grid (k = 5, 10, 20 ×
4 initialisations × 2 seeds, 100 training images per digit) and every cell is compared,
exactly, with ``tests/pinned/small_grid.json``: jclust, mean_distance, accuracies (float64,
stored as ``float.hex``), n_iter, n_relocated, converged, status, the first k cluster sizes
and the first k centroids (sha256 of their float32 bytes in (cluster, y, x) order,
C-contiguous, little-endian, plus their exact sum). A second, smaller pin
(``tests/pinned/engine_lloyd.json``) holds ``lloyd`` run directly on the same training
rows from fixed initial centroids. Values are read back through ``xr.open_zarr`` with
``.sel(k=, init=, seed=)`` only, so the test does not depend on where code lives. All
mismatches are reported in one assertion message.

Results must also be bit-identical whatever the grouping: the grid is run a second time
with other run groups, threads and row chunks (``GROUPING_CHECK``) and must give the same
values as the pinned run (``PINNED_RUN``).

Repinning: ``KMCLUST_REPIN=1 .venv/bin/pytest tests/test_pinned_results.py`` recomputes the
pins with the current code, rewrites the JSON files (recording ``git rev-parse HEAD`` and
any uncommitted changes under ``kmclust/``) and then FAILS on purpose, saying what it
rewrote, so a repin never passes silently. Repinning is legitimate only when a change of
results is intended and explained (in the commit message that updates the JSON); a
refactor, a move of modules or an engine optimisation must never need it. Never repin
to make this test pass. Repin from a tree without uncommitted changes under ``kmclust/``,
so that the recorded commit is the code that computed the pins.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from kmclust.lloyd.driver import lloyd
from kmclust.sweep.config import SweepConfig
from kmclust.sweep.run import run_sweep

ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).resolve().parent / "pinned"
GRID_PINS = PINNED / "small_grid.json"
ENGINE_PINS = PINNED / "engine_lloyd.json"
REPIN = os.environ.get("KMCLUST_REPIN") == "1"
STORE = "<mnist_subset_store fixture>"  # the dataset entry of the pinned config

KS = (5, 10, 20)
INITS = ("random", "data", "k-means++", "k-means||")
SEEDS = (0, 1)
TRAIN_PER_CLASS = 100
# the pinned run, and a run of other groups, threads and row chunks that must give the same bits
PINNED_RUN = {"parallel": 2, "num_workers": 2, "chunk_rows": None}
GROUPING_CHECK = {"parallel": 1, "num_workers": 3, "chunk_rows": 300}
FLOATS = ("jclust", "mean_distance", "test_accuracy", "train_accuracy")
INTS = ("n_iter", "n_relocated")
NUMERIC = (*FLOATS, *INTS, "converged", "cluster_size", "centroids")
# the engine pin: (first row, k) of each initial centroid set, taken from the training rows
ENGINE_INITS = ((0, 10), (100, 5), (200, 20))
ENGINE_THREADS = 2


# ---------------------------------------------------------------- helpers


def _hex(v: float) -> str:
    return float(v).hex()


def _int_or_hex(v: float) -> int | str:
    """An integral float as int (readable), anything else as exact hex."""
    v = float(v)
    return int(v) if math.isfinite(v) and v == int(v) else v.hex()


def _array_pin(a: np.ndarray, dtype: str) -> dict:
    """sha256 of ``a``'s bytes as C-contiguous ``dtype`` plus its exact sum (float hex)."""
    b = np.ascontiguousarray(a, dtype=dtype)
    return {
        "sha256": hashlib.sha256(b.tobytes()).hexdigest(),
        "sum": _hex(math.fsum(b.astype(np.float64).ravel().tolist())),
        "shape": list(b.shape),
    }


def _no_distributed_client() -> None:
    """Fail if a distributed Client is the default: the pins are of the threaded scheduler."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return
    pytest.fail(
        f"a distributed Client is active ({client}); the pins are of dask's threaded scheduler"
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.rstrip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def _provenance() -> dict:
    """Which code computed the pins: HEAD and any uncommitted changes of the package."""
    dirty = _git("status", "--porcelain", "--", "kmclust", "pyproject.toml")
    return {
        "git_head": _git("rev-parse", "HEAD").strip(),
        "uncommitted_kmclust_changes": dirty.splitlines() if dirty else [],
    }


def _versions() -> dict:
    import numba
    import zarr

    return {m.__name__: m.__version__ for m in (np, dask, xr, zarr, numba)}


def _check_or_repin(path: Path, got: dict, about: str) -> None:
    """Compare ``got`` with the pins in ``path`` (all mismatches in one message), or repin."""
    if REPIN:
        PINNED.mkdir(exist_ok=True)
        doc = {"about": about, "computed_by": _provenance(), "versions": _versions(), **got}
        path.write_text(_format(doc))
        pytest.fail(
            f"KMCLUST_REPIN=1: rewrote {path.relative_to(ROOT)} with the current results "
            "(legitimate only for an intended, explained change of results; "
            "rerun without KMCLUST_REPIN to check)"
        )
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} missing; create it with KMCLUST_REPIN=1")
    pinned = json.loads(path.read_text())
    where = f"pinned at {pinned.get('computed_by', {}).get('git_head', '?')}"
    problems = [
        line
        for key in got
        if key != "cells"
        for line in _diff_value(key, pinned.get(key), got[key])
    ]
    problems += _diff_cells(pinned.get("cells", {}), got["cells"])
    if problems:
        raise AssertionError(
            f"{len(problems)} difference(s) from {path.relative_to(ROOT)} "
            f"({where}), pinned -> now:\n" + "\n".join(problems)
        )


def _format(doc: dict) -> str:
    """Indented JSON with every list of scalars on one line (readable diffs)."""
    text = json.dumps(doc, indent=1)
    return (
        re.sub(
            r"\[\s+([^\[\]{}]*?)\s+\]",
            lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
            text,
        )
        + "\n"
    )


def _dump(v: object) -> str:
    return json.dumps(v, sort_keys=True)


def _explain(v: object) -> str:
    """A value for a message: float hex strings also as decimals."""
    if isinstance(v, str) and v.startswith(("0x", "-0x")):
        return f"{v} ({float.fromhex(v)!r})"
    return repr(v)


def _diff_value(name: str, a: object, b: object) -> list[str]:
    """The line describing how ``a`` (pinned) differs from ``b`` (now), if it does."""
    if _dump(a) == _dump(b):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        sub = ", ".join(
            f"{s} {_explain(a.get(s))} -> {_explain(b.get(s))}"
            for s in sorted(set(a) | set(b))
            if _dump(a.get(s)) != _dump(b.get(s))
        )
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        sub = ", ".join(
            f"[{i}] {_explain(x)} -> {_explain(y)}"
            for i, (x, y) in enumerate(zip(a, b))
            if _dump(x) != _dump(y)
        )
    else:
        sub = f"{_explain(a)} -> {_explain(b)}"
    return [f"{name}: {sub}"]


def _diff_cells(pinned: dict, got: dict) -> list[str]:
    """One line per differing field of every cell (and per missing or extra cell)."""
    lines = [f"{c}: pinned, not computed now" for c in pinned if c not in got]
    lines += [f"{c}: computed now, not pinned" for c in got if c not in pinned]
    for cell in (c for c in pinned if c in got):
        a, b = pinned[cell], got[cell]
        for field in sorted(set(a) | set(b)):
            lines += _diff_value(f"{cell} {field}", a.get(field), b.get(field))
    return lines


# ---------------------------------------------------------------- the sweep


def _config(store: Path, chunk_rows: int | None = None) -> SweepConfig:
    return SweepConfig(
        dataset=str(store),
        train_per_class=TRAIN_PER_CLASS,
        ks=KS,
        inits=INITS,
        seeds=SEEDS,
        chunk_rows=chunk_rows,
    )


def _config_pin(config: SweepConfig) -> dict:
    """The fields that determine the numbers (the store path replaced by a placeholder)."""
    names = (
        "train_per_class",
        "ks",
        "inits",
        "seeds",
        "data_seed",
        "tol",
        "max_iter",
        "chunk_rows",
    )
    pin = {"dataset": STORE, "store_chunk_rows": 1000}
    for name in names:
        v = getattr(config, name)
        pin[name] = list(v) if isinstance(v, tuple) else v
    return pin


def _cell_pins(ds: xr.Dataset, k: int, init: str, seed: int) -> dict:
    """Every pinned value of one cell, JSON-able and exact."""
    cell = ds.sel(k=k, init=init, seed=seed)
    pin: dict = {name: _hex(cell[name].values) for name in FLOATS}
    pin.update({name: int(cell[name].values) for name in INTS})
    pin["converged"] = bool(cell["converged"].values)
    pin["status"] = str(np.asarray(cell["status"].values).item())
    sizes = cell["cluster_size"].transpose("cluster").isel(cluster=slice(0, k)).values
    pin["cluster_size"] = [_int_or_hex(v) for v in sizes]
    cents = cell["centroids"].transpose("cluster", "y", "x").isel(cluster=slice(0, k)).values
    pin["centroids"] = _array_pin(cents, "<f4")
    return pin


def _sweep_pins(
    store: Path, out: Path, parallel: int, num_workers: int, chunk_rows: int | None
) -> dict:
    """Run the grid on the threaded scheduler and read every cell back from the store."""
    _no_distributed_client()
    config = _config(store, chunk_rows)
    with dask.config.set(scheduler="threads", num_workers=num_workers):
        outcome = run_sweep(config, out, parallel=parallel)
    assert not outcome.failed, outcome.failed
    ds = xr.open_zarr(out).compute()
    cells = {f"{k}/{i}/{s}": _cell_pins(ds, k, i, s) for k in KS for i in INITS for s in SEEDS}
    dtypes = {name: str(ds[name].dtype) for name in NUMERIC}
    run = {"scheduler": "threads", "parallel": parallel, "num_workers": num_workers}
    return {"config": _config_pin(config), "run": run, "dtypes": dtypes, "cells": cells}


@pytest.fixture(scope="module")
def grid(mnist_subset_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pinned run (PINNED_RUN)."""
    return _sweep_pins(
        mnist_subset_store, tmp_path_factory.mktemp("pinned") / "grid.zarr", **PINNED_RUN
    )


def test_sweep_small_grid_matches_pins(grid: dict) -> None:
    _check_or_repin(
        GRID_PINS,
        grid,
        "kmclust sweep on the mnist_subset_store fixture; see "
        "tests/test_pinned_results.py (keys: k/init/seed)",
    )


def test_sweep_same_bits_whatever_the_grouping(
    grid: dict, mnist_subset_store: Path, tmp_path: Path
) -> None:
    other = _sweep_pins(mnist_subset_store, tmp_path / "grouping.zarr", **GROUPING_CHECK)
    problems = _diff_value("dtypes", grid["dtypes"], other["dtypes"])
    problems += _diff_cells(grid["cells"], other["cells"])
    if problems:
        raise AssertionError(
            f"{len(problems)} difference(s), {PINNED_RUN} -> "
            f"{GROUPING_CHECK}:\n" + "\n".join(problems)
        )


# ---------------------------------------------------------------- the engine


def _training_rows(store: Path) -> np.ndarray:
    """The sweep's training sample, drawn here as the sweep draws it (uint8, (1000, 784))."""
    ds = xr.open_zarr(store)
    labels = np.asarray(ds["labels"].values).astype(np.int64)
    is_train = np.asarray(ds["split"].values).astype(object) == "train"
    rng = np.random.default_rng(0)
    picks = [
        rng.choice(np.flatnonzero(is_train & (labels == c)), TRAIN_PER_CLASS, replace=False)
        for c in np.unique(labels[is_train])
    ]
    rows = np.sort(np.concatenate(picks))
    images = np.asarray(ds["images"].values)
    return images.reshape(images.shape[0], -1)[rows]


def test_engine_lloyd_matches_pins(mnist_subset_store: Path) -> None:
    _no_distributed_client()
    x = _training_rows(mnist_subset_store)
    inits = [x[start : start + k] / 255.0 for start, k in ENGINE_INITS]
    with dask.config.set(scheduler="threads", num_workers=ENGINE_THREADS):
        results = lloyd(
            da.from_array(x, chunks=(250, -1)), inits, scale=1 / 255, return_labels=True
        )
    cells = {}
    for (start, k), r in zip(ENGINE_INITS, results):
        cells[f"rows{start}+{k}"] = {
            "error": r.error,
            "jclust": _hex(r.jclust),
            "mean_distance": _hex(r.mean_distance),
            "n_iter": int(r.n_iter),
            "converged": bool(r.converged),
            "n_relocated": int(r.n_relocated),
            "history": [_hex(v) for v in r.history],
            "centroids": _array_pin(r.centroids, "<f8"),
            "labels": _array_pin(r.labels, "<i8"),
        }
    got = {
        "setup": {
            "rows": _array_pin(x, "u1"),
            "inits": [list(i) for i in ENGINE_INITS],
            "call": "lloyd(dask (250-row chunks), [rows[s:s+k] / 255.0], scale=1/255, "
            "return_labels=True), defaults otherwise, threaded scheduler, "
            f"num_workers={ENGINE_THREADS}",
        },
        "cells": cells,
    }
    _check_or_repin(
        ENGINE_PINS,
        got,
        "kmclust.lloyd.driver.lloyd on the sweep's training rows of "
        "the mnist_subset_store fixture; see tests/test_pinned_results.py",
    )
