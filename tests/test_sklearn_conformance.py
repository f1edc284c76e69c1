"""scikit-learn's own KMeans tests, run against kmclust.KMeans.

The INSTALLED scikit-learn's ``sklearn/cluster/tests/test_k_means.py`` is run by
pytest in a subprocess with a plugin that puts ``kmclust.KMeans`` in place of
``sklearn.cluster.KMeans`` before the test module is imported (its
``from sklearn.cluster import KMeans`` then binds kmclust's class). Nothing of
scikit-learn's file is copied here. Tests that do not exercise the estimator
class are deselected (see ``DESELECTED``); the rest are *applicable*. The test
prints ``passed / applicable`` and the failures, and fails when fewer than
``FLOOR`` pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sklearn

#: what was reached (issue 20 asks for at least 156 of 168): every applicable test, 29 of them
#: weight-dependent (158 pass on an engine without ``sample_weight``)
FLOOR = 168
APPLICABLE = 168
MODULE = "sklearn.cluster.tests.test_k_means"

#: Deselected, by reason: they test something other than the estimator class KMeans.
DESELECTED = {
    # MiniBatchKMeans: another estimator (every parametrisation with it, and its own tests)
    "MiniBatchKMeans": "param",
    "test_minibatch_": "prefix",
    # the k_means / kmeans_plusplus functions (functions, not the estimator)
    "test_k_means_function": "name",
    "test_kmeans_plusplus_": "prefix",
    # scikit-learn's private Cython helpers (_k_means_common, _mini_batch_step, ...)
    "test_relocate_empty_clusters": "name",
    "test_euclidean_distance": "name",
    "test_inertia": "name",
    "test_is_same_clustering": "name",
}

#: Tests that pass ``sample_weight`` (counted apart: on dense input they need the engine's
#: weighted path, ``driver.lloyd(..., sample_weight=w)``).
WEIGHTED = (
    "test_kmeans_results",
    "test_dense_sparse",
    "test_kmeans_empty_cluster_relocated",
    "test_sample_weight_unchanged",
    "test_scaled_weights",
    "test_weighted_vs_repeated",
    "test_unit_weights_vs_no_weights",
    "test_sample_weight_init",
    "test_sample_weight_zero",
)

PLUGIN = """
import sklearn.cluster
import kmclust

RULES = {rules!r}


def pytest_configure(config):
    sklearn.cluster.KMeans = kmclust.KMeans


def _deselected(item):
    name = item.name
    func = name.split("[")[0]
    for key, kind in RULES.items():
        if kind == "param" and "[" in name and key in name:
            return True
        if kind == "prefix" and func.startswith(key):
            return True
        if kind == "name" and func == key:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if not _deselected(i)]
    gone = [i for i in items if _deselected(i)]
    items[:] = keep
    config.hook.pytest_deselected(items=gone)
"""


def _run(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Run scikit-learn's file with kmclust.KMeans; (passed test ids, failed id → first line)."""
    (tmp_path / "kmclust_conformance.py").write_text(
        textwrap.dedent(PLUGIN.format(rules=DESELECTED))
    )
    xml = tmp_path / "junit.xml"
    env = dict(
        os.environ,
        PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        SKLEARN_RUN_FLOAT32_TESTS="1",  # else float32 cases are skipped
    )
    site = Path(sklearn.__file__).parent
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "kmclust_conformance",
        "-p",
        "no:cacheprovider",
        "-q",
        "--rootdir",
        str(site),
        "-c",
        os.devnull,
        f"--junitxml={xml}",
        "-W",
        "ignore::DeprecationWarning",
        "--pyargs",
        MODULE,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert xml.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    passed, failed = [], {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        bad = case.find("failure")
        for other in ("error", "skipped"):  # a skipped test did not pass
            bad = case.find(other) if bad is None else bad
        if bad is None:
            passed.append(name)
        else:
            failed[name] = (bad.get("message") or "").splitlines()[0][:160]
    return passed, failed


@pytest.mark.slow
def test_scikit_learn_kmeans_suite_passes_against_kmclust(tmp_path: Path) -> None:
    passed, failed = _run(tmp_path)
    applicable = len(passed) + len(failed)
    print(f"\nscikit-learn {sklearn.__version__} test_k_means.py against kmclust.KMeans:")
    print(f"{len(passed)} passed / {applicable} applicable")
    weighted = [t for t in passed + list(failed) if t.split("[")[0] in WEIGHTED]
    print(f"weight-dependent: {len([t for t in weighted if t in passed])} passed / {len(weighted)}")
    for name, why in sorted(failed.items()):
        print(f"  FAILED {name}: {why}")
    assert applicable == APPLICABLE, f"{applicable} applicable tests, expected {APPLICABLE}"
    assert len(passed) >= FLOOR, f"{len(passed)} of {applicable} passed; floor {FLOOR}"
