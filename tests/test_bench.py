"""jobs/bench.py and benchmarks/ on tiny inputs: the harness runs and its figures are sane.

No timing asserts: only that every mode runs, that kmclust reaches the same
fixed points as scikit-learn (an independent implementation) from the same
initial centroids, that figures are positive and the record is written
where asked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, grid, history, iteration, job, scale
from kmclust.data import sources
from kmclust.data import stores as datasets
from kmclust.errors import DataError
from kmclust.lloyd.init import cell_seed

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "bench.py"


def _job_module():
    spec = importlib.util.spec_from_file_location("bench_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Set in this process by distributed's nanny once any test has started a LocalCluster: inherited,
#: they would run the job's scikit-learn single-threaded (its float32 inertia then rounds
#: differently: 1.26e-6 off, not ≤ 1e-6).
LEAKED_BY_NANNY = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _run_job(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The job as a user runs it.

    A given ``env`` as is; else this process's, without the nanny's thread caps.
    """
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in LEAKED_BY_NANNY}
    return subprocess.run(
        [sys.executable, str(JOB), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def _table_row(out: str, tool: str) -> dict[str, str]:
    """The markdown table row of ``tool`` keyed by the header cells."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == tool:
            return dict(zip(headers, cells))
    raise AssertionError(f"no row {tool!r} in:\n{out}")


def test_grid_matches_sklearn_fixed_points(fashion_store: Path, tmp_path: Path) -> None:
    record = tmp_path / "B.md"
    before = (ROOT / "BENCHMARKS.md").read_bytes() if (ROOT / "BENCHMARKS.md").exists() else None
    proc = _run_job(
        "grid",
        "--rows",
        "2000",
        "--k",
        "5:6",
        "--seeds",
        "1",
        "--schedulers",
        "threads",
        "--store-dir",
        str(fashion_store.parent),
        "--record",
        str(record),
    )
    assert proc.returncode == 0, proc.stderr
    km, sk = _table_row(proc.stdout, "kmclust[threads]"), _table_row(proc.stdout, "sklearn")
    assert float(km["max rel. J diff"]) <= 1e-6
    assert float(km["same, vs float64 J, equal labels"]) <= 1e-9  # same fixed points, J in float64
    assert km["runs with other labels"] == "0"
    assert float(km["max rel. J diff vs sklearn float64"]) <= 1e-6
    assert km["runs with other labels than sklearn float64"] == "0"
    assert _table_row(proc.stdout, "sklearn float64")["runs with other labels"] == "0"
    assert km["Lloyd iterations"] == sk["Lloyd iterations"]  # same fixed points, same path
    assert int(sk["Lloyd iterations"].replace(",", "")) >= 4  # 4 runs, at least one iteration each
    assert float(km["wall s"]) > 0 and float(km["useful GFLOP/s"]) > 0
    assert re.search(r"roofline .*: [0-9.]+ GFLOP/s", proc.stdout)
    text = record.read_text()
    assert text.startswith("# Benchmarks") and "grid — Fashion-MNIST, 4 runs" in text
    assert "load average" in text and "| kmclust[threads] |" in text
    after = (ROOT / "BENCHMARKS.md").read_bytes() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before, "--record must keep the repository's BENCHMARKS.md untouched"
    # the real job ran on the same grid (its own store of the same rows), start to exit
    job = _table_row(proc.stdout, grid.JOB)
    assert float(job["wall s"]) > 0 and float(job["CPU s"]) > 0
    assert int(job["Lloyd iterations"].replace(",", "")) >= 4
    assert re.search(r"job wall / kmclust\[threads\] wall = [0-9.]+", proc.stdout)
    assert re.search(r"\(fit \+ held-out predict\) wall / job wall = [0-9.]+", proc.stdout)


def test_job_command_is_the_grid() -> None:
    g = job.JobGrid(ks=(5, 7), inits=("data",), seeds=(0, 1, 2), max_iter=9, report=False)
    cmd = job.job_command(g, Path("/s.zarr"), Path("/o.zarr"))
    assert cmd[1] == str(ROOT / "jobs" / "sweep.py")
    args = dict(zip(cmd[2::2], cmd[3::2]))
    assert args["--k"] == "5,7" and args["--seeds"] == "3" and args["--tol"] == "0"
    assert args["--max-iter"] == "9" and args["--dataset"] == "/s.zarr" and cmd[-1] == "--no-report"
    assert job.seeds_arg((4, 9)) == "4,9"
    with pytest.raises(DataError):
        job.seeds_arg((4,))


@pytest.mark.parametrize("prune", [False, True])
def test_grid_library_agrees_with_own_sklearn_loop(fashion_store: Path, prune: bool) -> None:
    """Iteration totals reported for sklearn equal a loop run here, from centroids drawn here."""
    from sklearn.cluster import KMeans

    from kmclust.lloyd.init import init_centroids

    cfg = grid.GridConfig(
        store_dir=fashion_store.parent,
        ks=(5,),
        inits=("data",),
        seeds=(0, 1),
        rows=1500,
        prune=prune,
        job=False,
        cluster=common.ClusterSpec(("threads",)),
    )
    out = grid.run_grid(cfg)
    x = datasets.load_images(datasets.open_images(fashion_store))[:1500]
    xf = x.astype(np.float32) / np.float32(255)
    total = 0
    for s in cfg.seeds:
        c = init_centroids(x, 5, "data", cell_seed(s, 5, "data")) / 255
        total += KMeans(5, init=c.astype(np.float32), n_init=1, tol=0, max_iter=100).fit(xf).n_iter_
    tools = out.figures["tools"]
    km = tools["kmclust[threads]" if prune else "kmclust[threads, no prune]"]
    assert tools["sklearn"]["iterations"] == total == km["iterations"]
    assert km["max_rel_j_diff"] <= 1e-6 and km["runs_labels_differ"] == 0
    assert km["roofline_share"] > 0


def _grid_config(*args: str):
    """The grid's config as `jobs/bench.py grid ARGS` makes it."""
    from kmclust.commands import bench

    return bench._config(bench.build_parser().parse_args(["grid", *args]))


def test_large_k_preset_expands_and_explicit_options_win() -> None:
    cfg = _grid_config("--large-k")
    assert (cfg.ks, cfg.inits, cfg.seeds) == ((256, 512, 1024), ("data",), (0, 1, 2))
    assert not cfg.job and cfg.faiss and cfg.float64 and cfg.max_iter == 100
    assert _grid_config("--large-k", "--job").job
    mixed = _grid_config("--large-k", "--k", "8,16", "--init", "random")
    assert (mixed.ks, mixed.inits, mixed.seeds, mixed.job) == (
        (8, 16),
        ("random",),
        (0, 1, 2),
        False,
    )
    plain = _grid_config()
    assert plain.ks == tuple(range(5, 21)) and plain.inits == ("random", "data") and plain.job
    off = _grid_config("--no-job", "--no-faiss")
    assert not off.job and not off.faiss


def test_grid_faiss_loop_reaches_its_own_fixed_points(fashion_store: Path) -> None:
    """faiss's J, labels and centroids against float64 numpy on its own output; its row beside
    the others, and its labels against scikit-learn float64's from the same centroids."""
    pytest.importorskip("faiss")
    from benchmarks.peers import FAISS

    args = ["--large-k", "--k", "8,16", "--seeds", "2", "--rows", "1500"]
    cfg = _grid_config(*args, "--schedulers", "threads", "--store-dir", str(fashion_store.parent))
    out = grid.run_grid(cfg)
    x = datasets.load_images(datasets.open_images(fashion_store))[:1500]
    x = x.astype(np.float64) / 255
    fits = out.figures["tools"][FAISS]["fits"]
    assert [f.centroids.shape[0] for f in fits] == [8, 8, 16, 16]
    for f in fits:
        c = f.centroids.astype(np.float64)
        d2 = np.stack([((x - z) ** 2).sum(axis=1) for z in c], axis=1)  # brute force, float64
        j64 = d2[np.arange(x.shape[0]), f.labels].sum()
        assert abs(f.inertia - j64) <= 1e-5 * j64  # faiss's float32 distances, summed
        top2 = np.sort(d2, axis=1)[:, :2]
        clear = top2[:, 1] - top2[:, 0] > 1e-4 * top2[:, 1]
        assert (f.labels[clear] == d2.argmin(axis=1)[clear]).all()
        for cluster in range(c.shape[0]):  # a fixed point: each centroid its members' mean
            members = x[f.labels == cluster]
            assert np.allclose(c[cluster], members.mean(axis=0), atol=1e-5)
    table = out.table
    header = table.splitlines()[0]
    assert "| speed-up vs faiss |" in header and "| CPU-time ratio vs faiss |" in header
    fa, km = _table_row(table, FAISS), _table_row(table, "kmclust[threads]")
    assert fa["runs with other labels than sklearn float64"] == "0"
    sk64 = _table_row(table, "sklearn float64")
    assert fa["Lloyd iterations"] == sk64["Lloyd iterations"]  # faiss ran float64's counts
    assert float(fa["wall s"]) > 0 and float(fa["CPU s"]) > 0 and fa["speed-up vs faiss"] == "1"
    assert float(km["speed-up vs faiss"]) > 0 and float(km["CPU-time ratio vs faiss"]) > 0
    assert grid.JOB not in out.figures["tools"]  # the preset skips the job
    assert any(
        re.search(r"kmclust\[threads\] peak RSS .*: driver [0-9.]+ GiB", n) for n in out.notes
    )


def test_iteration_every_tool_positive(fashion_store: Path) -> None:
    cfg = iteration.IterationConfig(
        store_dir=fashion_store.parent,
        ks=(5,),
        iterations=2,
        rows=3000,
        repeats=1,
        cluster=common.ClusterSpec(("threads",)),
    )
    out = iteration.run_iteration(cfg)
    per_iter = out.figures["per_iteration"]
    expected = {"sklearn lloyd", "sklearn elkan", "kmclust[threads]", "kmclust[threads] float32"}
    expected |= {f"{iteration.ESTIMATOR} lloyd", f"{iteration.ESTIMATOR} elkan"}
    if importlib.util.find_spec("dask_ml") is not None:
        expected.add("dask-ml[threads]")
    if importlib.util.find_spec("faiss") is not None:
        expected |= {iteration.FAISS, iteration.FAISS_SUB}
    assert set(per_iter) == expected
    for tool in expected:
        assert per_iter[tool][5] > 0 and out.figures["cpu_per_iteration"][tool][5] > 0
        assert out.figures["n_iter"][tool][5] == 2  # tol=0: nobody stops early on 3,000 images
    assert "| 5 |" in out.table


def test_blobs_times_every_tool_and_kmclust_reaches_sklearns_fixed_point() -> None:
    from benchmarks import blobs

    cfg = blobs.BlobsConfig(shapes=((2, 4), (20, 6)), rows=2000, repeats=1)
    out = blobs.run_blobs(cfg)
    tools = {blobs.REFERENCE, "sklearn lloyd", "sklearn elkan", f"{blobs.ESTIMATOR} lloyd"}
    tools |= {f"{blobs.ESTIMATOR} elkan"} | ({blobs.FAISS} if out.figures["faiss"] else set())
    assert set(out.figures["seconds"]) == tools
    for tool in tools:
        for shape in ("2x4", "20x6"):
            assert out.figures["seconds"][tool][shape] > 0
            if tool.startswith(blobs.ESTIMATOR):  # the exact fixed point, as float64 sklearn's
                assert out.figures["agree"][tool][shape] == 1.0, (tool, shape)
                # scikit-learn may count one more (the iteration that finds nothing changed)
                ref = out.figures["n_iter"][blobs.REFERENCE][shape]
                assert ref - 1 <= out.figures["n_iter"][tool][shape] <= ref
    assert "| 20 | 6 |" in out.table


@pytest.mark.parametrize("shapes", ["2x", "0x4", "axb", ""])
def test_blobs_rejects_bad_shapes(shapes: str) -> None:
    from kmclust.commands import bench
    from kmclust.errors import ConfigError

    with pytest.raises(ConfigError, match="--shapes"):
        bench._shapes(shapes)


@pytest.mark.slow
def test_iteration_cli_on_local_cluster(fashion_store: Path, tmp_path: Path) -> None:
    proc = _run_job(
        "iteration",
        "--rows",
        "3000",
        "--k",
        "5",
        "--iterations",
        "2",
        "--repeats",
        "1",
        "--schedulers",
        "local",
        "--store-dir",
        str(fashion_store.parent),
        "--record",
        str(tmp_path / "B.md"),
    )
    assert proc.returncode == 0, proc.stderr
    row = _table_row(proc.stdout, "5")
    wall, cpu = re.fullmatch(
        r"([0-9.e+-]+) \(([0-9.e+-]+)\)", row["kmclust[local] ms/iter (CPU)"]
    ).groups()
    assert float(wall) > 0 and float(cpu) > 0
    assert "worker BLAS: openblas" in proc.stdout


@pytest.mark.slow
def test_scale_streams_and_persists(fashion_store: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "stores"
    store_dir.mkdir()
    (store_dir / "fashion-mnist.zarr").symlink_to(fashion_store)
    cfg = scale.ScaleConfig(
        store_dir=store_dir,
        rows=12_000,
        k=4,
        seeds=2,
        iterations=2,
        chunk_rows=4_000,
        subset_rows=6_000,
        cluster=common.ClusterSpec(("local",), memory_limit="1GiB"),
    )
    out = scale.run_scale(cfg)
    fig = out.figures
    assert fig["rows"] == 12_000 and fig["runs"] == 2
    for label in ("streamed from zarr", "persisted in memory"):
        assert len(fig[label]["passes"]) == 3  # 2 iterations + the final evaluation pass
        assert fig[label]["rows_runs_per_s"] > 0 and fig[label]["peak_worker_rss"] > 0
    assert datasets.open_images(store_dir / "synthetic-12000.zarr").attrs["rows"] == 12_000
    assert scale.synthetic_store(cfg) == store_dir / "synthetic-12000.zarr"  # reused, not restaged


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path / "absent")
    from kmclust.cli import run_main

    code = run_main(
        _job_module().main,
        ["grid", "--store-dir", str(tmp_path), "--record", str(tmp_path / "B.md")],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"]
    assert not (tmp_path / "B.md").exists()


def test_clean_env_removes_only_openblas_tuning() -> None:
    env = {
        "PATH": "/bin",
        "OPENBLAS_CORETYPE": "Haswell",
        "OPENBLAS_L2_SIZE": "1048576",
        "OMP_NUM_THREADS": "1",
    }
    out = common.clean_env(env)
    assert out is not None
    assert {k: v for k, v in out.items() if k != common.UNSET_MARK} == {
        "PATH": "/bin",
        "OMP_NUM_THREADS": "1",
    }
    assert "OPENBLAS_CORETYPE=Haswell" in out[common.UNSET_MARK]
    assert common.clean_env({"PATH": "/bin"}) is None


def test_unset_openblas_env_reexecutes_once(tmp_path: Path) -> None:
    """Only the child gets OPENBLAS_CORETYPE (this test's own environment is untouched)."""
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    proc = _run_job(
        "grid",
        "--unset-openblas-env",
        "--rows",
        "0",
        "--store-dir",
        str(tmp_path),
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("re-running without OPENBLAS_CORETYPE=Haswell") == 1
    assert "error: --rows must be ≥ 1" in proc.stderr


def test_sse64_is_squared_distance_to_assigned_centroid() -> None:
    x = np.array([[0, 0], [3, 4], [6, 8]], dtype=np.uint8)
    c = np.array([[0.0, 0.0], [6.0, 8.0]])
    assert grid.sse64(x, c, np.array([0, 0, 1]), block=2) == 25.0


def test_record_appends_dated_sections(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    outcome = history.Outcome(
        "grid",
        "grid — test",
        {},
        history.markdown_table(["a", "b"], [[1, 2.5]]),
        ["a note"],
        {"nproc": 2, "cpu": "CPU", "blas": ["openblas x"], "loadavg": (1.0, 2.0, 3.0)},
    )
    history.record(path, outcome, "python jobs/bench.py grid")
    history.record(path, outcome, "python jobs/bench.py grid")
    text = path.read_text()
    assert text.count("# Benchmarks") == 1 and text.count("— grid — test") == 2
    assert "| 1 | 2.5 |" in text and "- a note" in text and "before: 1.00 / 2.00 / 3.00" in text


def test_record_lands_in_history_below_the_summary(tmp_path: Path) -> None:
    """A record goes to the History part (the file's last section), never above the summary."""
    outcome = history.Outcome("scale", "scale — test", {}, "| a |\n|---|\n| 1 |", [], {})
    kept = tmp_path / "kept.md"
    kept.write_text("# Benchmarks\n\n## Current figures\n\nsummary\n\n## History\n\nold\n")
    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n\n## Current figures\n\nsummary\n")
    for path in (kept, bare):
        history.record(path, outcome, "python jobs/bench.py scale")
        text = path.read_text()
        assert text.count("## History") == 1
        assert text.index("## Current figures") < text.index("## History")
        assert text.index("## History") < text.index("### ") < text.index("— scale — test")
