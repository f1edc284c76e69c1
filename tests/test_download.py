"""Downloading from a real HTTP server on 127.0.0.1: good, corrupted, garbage and dead mirrors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import logging
import re
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import kmclust.data.download as download
from kmclust.cli import run_main
from kmclust.commands.stage import main as stage_main
from kmclust.data.download import download_files
from kmclust.data.idx import write_idx
from kmclust.data.sources import IDX_FILES
from kmclust.data.stores import open_images, stage
from kmclust.errors import DataError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # keep test output clean
        self.server.requests.append(self.path)


@pytest.fixture
def server(tmp_path: Path):
    """Serve tmp_path/www on 127.0.0.1; yields (base URL, root dir, list of request paths)."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def mirrors(server):
    """Garbage, empty (404), corrupted (one flipped byte) and good mirrors, one directory each."""
    base, root, requests = server
    rng = np.random.default_rng(0)
    sizes = {"images": (20, 28, 28), "labels": (20,)}
    good, bad, corrupt = root / "good", root / "bad", root / "corrupt"
    for directory in (good, bad, corrupt):
        directory.mkdir()
    (root / "empty").mkdir()
    checksums = {}
    for images, labels in IDX_FILES.values():
        for base_name, kind in ((images, "images"), (labels, "labels")):
            name = base_name + ".gz"
            high = 256 if kind == "images" else 10
            write_idx(good / name, rng.integers(0, high, sizes[kind], dtype=np.uint8))
            (bad / name).write_bytes(b"<html>not the file</html>")
            data = bytearray((good / name).read_bytes())
            data[-10] ^= 0xFF  # one flipped byte near the end, as from a damaged transfer
            (corrupt / name).write_bytes(bytes(data))
            checksums[name] = hashlib.sha256((good / name).read_bytes()).hexdigest()
    return {
        "good": f"{base}/good/",
        "bad": f"{base}/bad/",
        "empty": f"{base}/empty/",
        "corrupt": f"{base}/corrupt/",
        "dir": good,
        "checksums": checksums,
        "requests": requests,
    }


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_garbage_mirror_is_rejected_and_the_next_one_used(
    tmp_path: Path, mirrors: dict, caplog
) -> None:
    dest = tmp_path / "dl"
    with caplog.at_level(logging.WARNING, logger="kmclust.data.download"):
        paths = download_files(
            dest, mirrors["checksums"], [mirrors["bad"], _closed_port_url(), mirrors["good"]]
        )
    assert sorted(paths) == sorted(mirrors["checksums"])
    for name in mirrors["checksums"]:
        assert (dest / name).read_bytes() == (mirrors["dir"] / name).read_bytes()
    assert sum("checksum mismatch" in r.message for r in caplog.records) == 4
    assert sorted(p.name for p in dest.iterdir()) == sorted(mirrors["checksums"])  # no .part files


def test_all_mirrors_failing_is_a_data_error(tmp_path: Path, mirrors: dict) -> None:
    dest = tmp_path / "dl"
    with pytest.raises(DataError) as info:
        download_files(dest, mirrors["checksums"], [mirrors["bad"], mirrors["empty"]])
    message = str(info.value)
    assert "could not download train-images-idx3-ubyte.gz" in message
    assert "checksum mismatch" in message and "HTTP 404" in message and "\n" not in message
    assert list(dest.iterdir()) == []


def test_a_corrupted_file_is_refused_by_hash_and_nothing_cached(
    tmp_path: Path, mirrors: dict
) -> None:
    name = "t10k-images-idx3-ubyte.gz"
    dest = tmp_path / "dl"
    with pytest.raises(DataError) as info:
        download_files(dest, {name: mirrors["checksums"][name]}, [mirrors["corrupt"]])
    message = str(info.value)
    assert message.startswith(f"could not download {name} from any mirror: ")
    assert "checksum mismatch" in message and "\n" not in message
    assert list(dest.iterdir()) == []  # neither the file nor a temporary one


def test_stage_refuses_a_corrupted_download_in_one_error_line(
    tmp_path: Path, mirrors: dict, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(download, "MNIST_MIRRORS", (mirrors["corrupt"],))
    monkeypatch.setattr(download, "MNIST_SHA256", mirrors["checksums"])
    dest, out = tmp_path / "dl", tmp_path / "m.zarr"
    argv = ["mnist", "--download", "--from", str(dest), "--out", str(out)]
    assert run_main(stage_main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: could not download ") and "checksum mismatch" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert list(dest.iterdir()) == [] and not out.exists()


def test_a_missing_file_on_the_first_mirror_falls_back_to_the_second(
    tmp_path: Path, mirrors: dict, caplog
) -> None:
    dest = tmp_path / "dl"
    with caplog.at_level(logging.WARNING, logger="kmclust.data.download"):
        paths = download_files(dest, mirrors["checksums"], [mirrors["empty"], mirrors["good"]])
    assert paths == {name: dest / name for name in mirrors["checksums"]}
    for name in mirrors["checksums"]:
        assert (dest / name).read_bytes() == (mirrors["dir"] / name).read_bytes()
        assert f"/empty/{name}" in mirrors["requests"] and f"/good/{name}" in mirrors["requests"]
    assert sum("HTTP 404" in r.message for r in caplog.records) == 4


def test_verified_files_are_not_fetched_again(tmp_path: Path, mirrors: dict) -> None:
    dest = tmp_path / "dl"
    download_files(dest, mirrors["checksums"], [mirrors["good"]])
    n = len(mirrors["requests"])
    download_files(
        dest, mirrors["checksums"], [mirrors["bad"]]
    )  # would fail if it fetched anything
    assert len(mirrors["requests"]) == n


def test_a_damaged_local_copy_is_replaced(tmp_path: Path, mirrors: dict) -> None:
    dest = tmp_path / "dl"
    dest.mkdir()
    name = "t10k-labels-idx1-ubyte.gz"
    (dest / name).write_bytes(b"damaged")
    download_files(dest, {name: mirrors["checksums"][name]}, [mirrors["good"]])
    assert (dest / name).read_bytes() == (mirrors["dir"] / name).read_bytes()


def test_oversized_download_is_cut_off(tmp_path: Path, mirrors: dict) -> None:
    name = "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match="more than 100 bytes"):
        download_files(
            tmp_path / "dl", {name: mirrors["checksums"][name]}, [mirrors["good"]], max_bytes=100
        )
    assert list((tmp_path / "dl").iterdir()) == []


def test_stage_mnist_with_download(tmp_path: Path, mirrors: dict, monkeypatch) -> None:
    monkeypatch.setattr(download, "MNIST_MIRRORS", (mirrors["bad"], mirrors["good"]))
    monkeypatch.setattr(download, "MNIST_SHA256", mirrors["checksums"])
    out = stage("mnist", tmp_path / "m.zarr", from_dir=tmp_path / "dl", download=True)
    ds = open_images(out)
    assert ds.sizes["sample"] == 40 and (ds.attrs["n_train"], ds.attrs["n_test"]) == (20, 20)
    assert ds.attrs["sha256"] == mirrors["checksums"]


def test_pinned_table_is_well_formed() -> None:
    expected = {base + ".gz" for pair in IDX_FILES.values() for base in pair}
    assert set(download.MNIST_SHA256) == expected == set(download.MNIST_SIZES)
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in download.MNIST_SHA256.values())
    assert all(m.startswith("https://") and m.endswith("/") for m in download.MNIST_MIRRORS)


def test_on_a_terminal_a_bar_is_drawn_and_ended(tmp_path: Path, mirrors: dict, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    name = "train-images-idx3-ubyte.gz"
    download_files(
        tmp_path / "dl", {name: mirrors["checksums"][name]}, [mirrors["empty"], mirrors["good"]]
    )
    assert err.getvalue().count("\n") == 1 and err.getvalue().endswith("\n")  # one bar, for the 200
    assert err.getvalue().split("\r")[-1].startswith("100%|")
