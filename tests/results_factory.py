"""Build a realistic fake results Dataset (the sweep's schema) for report tests.

The numbers are plausible for MNIST-like data scaled to [0, 1]: J falls with k,
*random* init ends with a higher J, more iterations and more empty-cluster
relocations than *data* init, accuracy rises with k. Cells named in `failed` or
`pending` get absurd values (as a half-written or stale cell might hold) so a
test can check that the report ignores them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kmclust.sweep import schema

DIGITS = tuple(str(d) for d in range(10))
SIDE = 28
ABSURD = 1e9

Cell = tuple[int, str, int]


def _prototypes(class_names: Sequence[str]) -> np.ndarray:
    """One blurred 28×28 glyph per class (its first character), values in [0, 1]."""
    font = ImageFont.load_default(size=22)
    out = np.zeros((len(class_names), SIDE, SIDE), dtype=np.float32)
    for i, name in enumerate(class_names):
        img = Image.new("L", (SIDE, SIDE), 0)
        ImageDraw.Draw(img).text((SIDE / 2, SIDE / 2), name[:1], fill=255, font=font, anchor="mm")
        out[i] = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32) / 255.0
    return out


def make_results(
    ks: Iterable[int] = range(5, 9),
    inits: Sequence[str] = ("random", "data"),
    seeds: int = 3,
    max_iter: int = 12,
    failed: Iterable[Cell] = (),
    pending: Iterable[Cell] = (),
    *,
    class_names: Sequence[str] = DIGITS,
    n_train: int = 1000,
    n_test: int = 4000,
    dataset: str = "fake-mnist",
    rng_seed: int = 0,
) -> xr.Dataset:
    """Return a results Dataset with dims k × init × seed obeying the sweep's schema.

    Every variable of kmclust.sweep.schema is present; those this factory does not
    simulate keep their fill value.
    """
    ks = [int(k) for k in ks]
    inits = list(inits)
    seed_ids = list(range(seeds))
    nk, ni, ns, nc = len(ks), len(inits), seeds, max(ks)
    n_classes = len(class_names)
    rng = np.random.default_rng(rng_seed)
    protos = _prototypes(class_names)
    grid = (nk, ni, ns)

    extent = {"cluster": nc, "iteration": max_iter, "y": SIDE, "x": SIDE}
    arrays = schema.empty(grid, extent, ("y", "x"))  # every variable at its fill value
    data = {name: arr for name, (_, arr) in arrays.items()}
    v = {
        name: data[name]
        for name in (
            "jclust",
            "mean_distance",
            "train_accuracy",
            "test_accuracy",
            "nmi",
            "ari",
            "acc",
            "seconds",
        )
    }
    n_iter, n_reloc, converged = data["n_iter"], data["n_relocated"], data["converged"]
    sizes, labels = data["cluster_size"], data["cluster_label"]
    cents, hist = data["centroids"], data["jclust_history"]
    status, error = data["status"], data["error"]
    status[...] = "done"

    for a, k in enumerate(ks):
        for b, init in enumerate(inits):
            is_random = init == "random"
            for s in seed_ids:
                j = 44.0 * (k / 5.0) ** -0.15 + (0.6 if is_random else 0.0) + rng.normal(0, 0.25)
                v["jclust"][a, b, s] = j
                v["mean_distance"][a, b, s] = 0.985 * np.sqrt(j) + rng.normal(0, 0.01)
                it = rng.normal((0.7 if is_random else 0.5) * max_iter, 0.15 * max_iter)
                n_iter[a, b, s] = int(np.clip(round(it), 2, max_iter))
                converged[a, b, s] = n_iter[a, b, s] < max_iter
                n_reloc[a, b, s] = rng.poisson(0.3 * k if is_random else 0.02 * k)
                train = 0.45 + 0.25 * (1 - np.exp(-(k - 5) / 8)) - (0.01 if is_random else 0)
                train += rng.normal(0, 0.01)
                v["train_accuracy"][a, b, s] = train
                data["purity"][a, b, s] = train  # majority labels: purity is train accuracy
                v["test_accuracy"][a, b, s] = (
                    train - 0.03 + rng.normal(0, 0.01) if n_test else np.nan
                )
                v["nmi"][a, b, s] = 0.40 + 0.01 * (k - 5) + rng.normal(0, 0.01)
                v["ari"][a, b, s] = 0.30 + 0.005 * (k - 5) + rng.normal(0, 0.01)
                if k == n_classes:
                    v["acc"][a, b, s] = 0.53 + rng.normal(0, 0.02)
                v["seconds"][a, b, s] = rng.uniform(0.5, 3.0)
                # label-free indices: on digits, none has a sharp optimum
                data["davies_bouldin"][a, b, s] = 2.6 - 0.03 * k + rng.normal(0, 0.04)
                data["calinski_harabasz"][a, b, s] = 160.0 / np.sqrt(k) + rng.normal(0, 1.5)
                data["silhouette"][a, b, s] = 0.07 - 0.002 * k + rng.normal(0, 0.004)
                lab = np.concatenate([rng.permutation(n_classes), rng.integers(0, n_classes, k)])[
                    :k
                ]
                size = rng.multinomial(n_train, rng.dirichlet(np.full(k, 5.0))).astype(float)
                img = protos[lab] * rng.uniform(0.6, 0.9, (k, 1, 1)).astype(np.float32)
                img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
                if is_random and rng.random() < 0.3:  # an empty cluster (kept as is, not zeroed)
                    size[-1], lab[-1] = 0.0, -1
                sizes[a, b, s, :k], labels[a, b, s, :k], cents[a, b, s, :k] = size, lab, img
                t = np.arange(n_iter[a, b, s])
                h = j * (1 + (0.5 if is_random else 0.2) * np.exp(-t / 2.0))
                hist[a, b, s, : t.size] = h - (h[-1] - j)

    ks_index, init_index = {k: i for i, k in enumerate(ks)}, {n: i for i, n in enumerate(inits)}
    for cells, state in ((failed, "failed"), (pending, "pending")):
        for k, init, s in cells:
            c = (ks_index[k], init_index[init], s)
            status[c], error[c] = (
                state,
                ("RuntimeError: simulated failure" if state == "failed" else ""),
            )
            for arr in data.values():
                if arr.dtype.kind == "f":
                    arr[c] = ABSURD
                elif arr.dtype.kind == "i":
                    arr[c] = 99999
            labels[c], cents[c] = 7, 1e6

    data_vars = {name: (dims, data[name]) for name, (dims, _) in arrays.items()}
    config = {
        "dataset": dataset,
        "k": ks,
        "inits": inits,
        "seeds": seed_ids,
        "train_per_class": n_train // n_classes,
        "tol": 1e-6,
        "max_iter": max_iter,
        "data_seed": 0,
    }
    attrs = {
        schema.RESULTS_MARK: schema.SCHEMA_VERSION,
        "config": json.dumps(config),
        "dataset": dataset,
        "fingerprint": "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "class_names": list(class_names),
        "n_train": n_train,
        "n_test": n_test,
        "versions": json.dumps(
            {"kmclust": "0.1.0", "numpy": np.__version__, "xarray": xr.__version__}
        ),
        "started": "2026-01-02T10:00:00+00:00",
        "finished": "2026-01-02T10:42:17+00:00",
    }
    coords = {
        "k": ks,
        "init": np.array(inits, dtype=object),
        "seed": seed_ids,
        "cluster": np.arange(nc),
        "y": np.arange(SIDE),
        "x": np.arange(SIDE),
        "iteration": np.arange(max_iter),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
