"""Unlabelled data through sweep and report: a folder of PNGs without class folders.

The label metrics (accuracy, NMI, ARI, purity, Hungarian accuracy, majority
labels) are absent from the results, not NaN-filled; J, the cluster sizes and
the label-free indices are checked against numpy and scikit-learn on the pixels
read back with Pillow; the report says the data are unlabelled, draws no
accuracy figure and still chooses k with the label-free indices.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

from kmclust.data.stores import stage

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep.py"
REPORT = ROOT / "jobs" / "report.py"
LABEL_VARS = ("train_accuracy", "test_accuracy", "nmi", "ari", "acc", "purity", "cluster_label")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """600 digits as 8 × 8 grayscale PNGs in one folder (no class folders: unlabelled)."""
    root = tmp_path_factory.mktemp("pngs") / "digits"
    root.mkdir()
    images = (load_digits().images[:600] * 255 / 16).round().astype(np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img, mode="L").save(root / f"img{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def store(folder: Path, tmp_path_factory) -> Path:
    return stage("images", tmp_path_factory.mktemp("stores") / "unlabelled.zarr", from_dir=folder)


def pixels(folder: Path) -> dict[str, np.ndarray]:
    """The PNGs as Pillow reads them, by file name."""
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def cli(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_train_per_class_is_refused_for_unlabelled_data(store, tmp_path):
    out = tmp_path / "r.zarr"
    args = ["--dataset", str(store), "--out", str(out), "--k", "3", "--seeds", "1"]
    proc = cli(SWEEP, *args, "--scheduler", "threads", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "unlabelled" in errors[0] and "--train all" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["threads", "local"])  # local: runs spread over workers
def test_sweep_and_report_of_unlabelled_images(folder, store, tmp_path, scheduler):
    out = tmp_path / "r.zarr"
    args = ["--dataset", str(store), "--out", str(out), "--k", "3,5,8", "--seeds", "2"]
    args += ["--init", "random,k-means++", "--train", "all", "--scheduler", scheduler]
    proc = cli(SWEEP, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("batches over the workers" in proc.stderr) == (scheduler == "local"), proc.stderr
    ds = xr.open_zarr(out).load()
    assert ds.attrs["labelled"] is False
    for name in LABEL_VARS:
        assert name not in ds, f"{name} is in the results of unlabelled data"

    # every done cell against numpy / scikit-learn on the pixels Pillow reads
    staged = xr.open_zarr(store)
    rows = np.stack(list(pixels(folder).values()))
    assert sorted(map(bytes, rows.reshape(len(rows), -1))) == sorted(
        map(bytes, staged.images.values.reshape(len(rows), -1))
    ), "the store holds other pixels than the PNGs"
    x = staged.images.values.reshape(len(rows), -1).astype(np.float64) / 255.0
    for k in ds.k.values:
        for init in ds.init.values:
            for seed in ds.seed.values:
                cell = ds.sel(k=k, init=init, seed=seed)
                assert cell.status.values.item() == "done"
                c = cell.centroids.values.reshape(ds.sizes["cluster"], -1)[:k].astype(np.float64)
                d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
                labels = d.argmin(1)
                np.testing.assert_allclose(float(cell.jclust), d.min(1).mean(), rtol=1e-5)
                np.testing.assert_array_equal(
                    cell.cluster_size.values[:k], np.bincount(labels, minlength=k)
                )
                want = davies_bouldin_score(x, labels)
                np.testing.assert_allclose(float(cell.davies_bouldin), want, rtol=1e-6)
                want = calinski_harabasz_score(x, labels)
                np.testing.assert_allclose(float(cell.calinski_harabasz), want, rtol=1e-6)

    report = tmp_path / "r-report"
    text = (report / "REPORT.md").read_text()
    assert "**unlabelled**" in text and "None: the data are unlabelled" in text
    assert "## Choosing k" in text and "Davies–Bouldin (lowest) k =" in text
    assert "accuracy" not in " ".join(p.name for p in report.glob("*.png"))
    assert "test accuracy" not in text.split("## Choosing k")[0].split("## Results")[1]
    # the report command reads the same store again
    again = cli(REPORT, str(out), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    with Image.open(next((tmp_path / "again").glob("representatives_*.png"))) as img:
        assert img.size[0] > 0
