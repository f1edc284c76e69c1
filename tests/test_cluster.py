"""kmclust.cluster: cluster.yaml validation and real connections on 127.0.0.1.

Clusters here are real: worker processes (LocalCluster with processes), a
`dask scheduler` + `dask worker` started as subprocesses, and TLS with
self-signed certificates. Every test checks that no child process outlives it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import LocalCluster, Security

from kmclust.cluster.connect import connect, describe
from kmclust.cluster.profiles import find_config, load_profiles, profile_storage_options
from kmclust.errors import ConfigError, SchedulerError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "cluster.yaml"
DASK = Path(sys.executable).with_name("dask")
LOOPBACK = {"127.0.0.1", "::1"}

ONE_WORKER = """
profiles:
  tiny:
    module: distributed
    class: LocalCluster
    kwargs: {n_workers: 1, threads_per_worker: 1, processes: true,
             host: 127.0.0.1, dashboard_address: "127.0.0.1:0", memory_limit: 1GiB}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    """Block until something listens on 127.0.0.1:port (a scheduler subprocess has started).

    connect() reports a refused connection at once instead of retrying until
    its timeout, so a test starts the job only once its scheduler listens.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def descendants() -> set[int]:
    """Child processes of this interpreter, minus multiprocessing's resource tracker.

    The tracker is started by the first spawned worker and lives as long as
    this interpreter, by design; everything else must end with its cluster.
    """
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid != tracker and "resource_tracker" not in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves a child process of this interpreter running."""
    before = descendants()
    yield
    new = [psutil.Process(pid) for pid in descendants() - before if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(new, timeout=15)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"processes left running: {[p.cmdline() for p in alive]}"


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket and bound UDP socket of pids."""
    out = []
    for pid in pids:
        for c in psutil.Process(pid).net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                out.append((pid, c.laddr.ip, c.laddr.port))
    return out


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


# ---------------------------------------------------------------- config files


def test_shipped_profiles_validate_and_local_is_loopback():
    profiles = load_profiles(SHIPPED)
    local = profiles["local"]
    assert (local["module"], local["class"]) == ("distributed", "LocalCluster")
    assert local["kwargs"]["host"] == "127.0.0.1"
    assert local["kwargs"]["dashboard_address"].startswith("127.0.0.1:")
    assert profiles["secure-local"]["require_encryption"] is True


def test_default_config_is_cwd_then_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(None) == SHIPPED  # a fresh clone run from anywhere
    own = write(tmp_path, ONE_WORKER)
    assert find_config(None).resolve() == own.resolve()
    assert find_config(tmp_path / "x.yaml") == tmp_path / "x.yaml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("profiles: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("other: 1\n", "'profiles'"),
        ("profiles:\n  p: {module: distributed, kwargs: {}}\n", "lacks class"),
        (
            "profiles:\n  p: {module: distributed, class: LocalCluster, kwargs: [1]}\n",
            "kwargs must be a mapping",
        ),
        (
            "profiles:\n  p: {module: distributed, class: LocalCluster, kwargs: {}, kwarg: 1}\n",
            "unknown keys ['kwarg']",
        ),
    ],
)
def test_bad_config_file_names_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_profiles(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        with connect("local", missing):
            pass
    assert str(missing) in str(err.value)


def test_unknown_scheduler_lists_known_profiles(tmp_path):
    path = write(tmp_path, ONE_WORKER)
    with pytest.raises(ConfigError) as err:
        with connect("no-such-profile", path):
            pass
    msg = str(err.value)
    assert "no-such-profile" in msg and "tiny" in msg and "local" in msg


def test_unknown_module_or_class_names_the_profile(tmp_path):
    path = write(
        tmp_path,
        """
profiles:
  nomod: {module: no_such_module_xyz, class: X, kwargs: {}}
  nocls: {module: distributed, class: NoSuchCluster, kwargs: {}}
""",
    )
    with pytest.raises(ConfigError, match="'nomod'.*no_such_module_xyz"):
        with connect("nomod", path):
            pass
    with pytest.raises(ConfigError, match="'nocls'.*NoSuchCluster"):
        with connect("nocls", path):
            pass


STORAGE = """
profiles:
  s3:
    module: distributed
    class: LocalCluster
    kwargs: {}
    storage_options:
      key: ${KMCLUST_T_KEY}
      secret: "pre-${KMCLUST_T_SECRET}-post"
      client_kwargs: {endpoint_url: "${KMCLUST_T_ENDPOINT}", region_name: eu-west-1}
      anon: false
  remote:
    address: tcp://127.0.0.1:8786
    storage_options: {endpoint_url: "http://127.0.0.1:9000"}
"""


def test_profiles_carry_storage_options_expanded_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, STORAGE)
    monkeypatch.setenv("KMCLUST_T_KEY", "AKIA-from-env")
    monkeypatch.setenv("KMCLUST_T_SECRET", "s3cr3t-from-env")
    monkeypatch.setenv("KMCLUST_T_ENDPOINT", "http://127.0.0.1:9001")
    assert load_profiles(path)["s3"]["storage_options"]["key"] == "${KMCLUST_T_KEY}"  # kept
    assert profile_storage_options("s3", path) == {
        "key": "AKIA-from-env",
        "secret": "pre-s3cr3t-from-env-post",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9001", "region_name": "eu-west-1"},
        "anon": False,
    }
    remote = {"endpoint_url": "http://127.0.0.1:9000"}
    assert profile_storage_options("remote", path) == remote
    assert profile_storage_options("tcp://127.0.0.1:8786", path) == remote  # its address
    assert profile_storage_options("tcp://127.0.0.1:8787", path) == {}
    assert profile_storage_options("local", path) == {}  # the built-in default
    assert profile_storage_options("no-such-profile", path) == {}  # connect() refuses it


def test_an_unset_variable_is_named_and_no_value_shown(tmp_path, monkeypatch):
    path = write(tmp_path, STORAGE)
    monkeypatch.setenv("KMCLUST_T_KEY", "AKIA-from-env")
    monkeypatch.delenv("KMCLUST_T_SECRET", raising=False)
    with pytest.raises(ConfigError) as err:
        profile_storage_options("s3", path)
    msg = str(err.value)
    assert str(path) in msg and "'s3'" in msg and "storage_options.secret" in msg
    assert "${KMCLUST_T_SECRET}" in msg and "not set" in msg
    assert "AKIA-from-env" not in msg and "KMCLUST_T_KEY" not in msg
    assert profile_storage_options("remote", path)  # other profiles are unaffected


@pytest.mark.parametrize("value", ["[key, secret]", '"key=AKIA0 secret=s3cr3t-in-yaml"', "3"])
@pytest.mark.parametrize("kind", ["cluster", "address"])
def test_storage_options_must_be_a_mapping(tmp_path, value, kind):
    head = (
        "module: distributed, class: LocalCluster, kwargs: {}"
        if kind == "cluster"
        else "address: tcp://127.0.0.1:8786"
    )
    path = write(tmp_path, f"profiles:\n  p: {{{head}, storage_options: {value}}}\n")
    with pytest.raises(ConfigError) as err:
        load_profiles(path)
    msg = str(err.value)
    assert str(path) in msg and "'p'" in msg and "storage_options must be a mapping" in msg
    assert "s3cr3t" not in msg and "AKIA0" not in msg


def test_shipped_s3_example_is_local_plus_storage_options(monkeypatch):
    profiles = load_profiles(SHIPPED)
    local, example = profiles["local"], profiles["s3-example"]
    assert "storage_options" not in local and profile_storage_options("local", SHIPPED) == {}
    assert {k: example[k] for k in ("module", "class", "kwargs")} == local
    monkeypatch.delenv("KMCLUST_S3_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{KMCLUST_S3_KEY\}, which is not set"):
        profile_storage_options("s3-example", SHIPPED)
    monkeypatch.setenv("KMCLUST_S3_KEY", "AKIA-example")
    monkeypatch.setenv("KMCLUST_S3_SECRET", "example-secret")
    got = profile_storage_options("s3-example", SHIPPED)
    assert (got["key"], got["secret"]) == ("AKIA-example", "example-secret")


def test_wrong_kwarg_is_caught_before_starting(tmp_path):
    # SpecCluster has no **kwargs: the signature check rejects it without processes.
    path = write(
        tmp_path,
        """
profiles:
  spec: {module: distributed, class: SpecCluster, kwargs: {n_wrkers: 2}}
""",
    )
    with pytest.raises(ConfigError, match="'spec'.*'n_wrkers'"):
        with connect("spec", path):
            pass


def test_wrong_kwarg_of_local_cluster_names_profile_and_kwarg(tmp_path):
    # LocalCluster forwards unknown kwargs to its workers, which fail to start.
    path = write(
        tmp_path, ONE_WORKER.replace("memory_limit: 1GiB", "memory_limit: 1GiB, n_wrkers: 1")
    )
    with pytest.raises(ConfigError) as err:
        with connect("tiny", path):
            pass
    assert "'tiny'" in str(err.value) and "'n_wrkers'" in str(err.value)


# ---------------------------------------------------------------- local clusters


def test_local_profile_runs_tasks_in_worker_processes(tmp_path, caplog):
    path = write(tmp_path, ONE_WORKER)
    caplog.set_level("INFO", logger="kmclust.cluster")
    with connect("tiny", path) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        pids = client.run(os.getpid)
        assert len(pids) == 1
        (worker_pid,) = pids.values()
        assert worker_pid != os.getpid()
        assert worker_pid in descendants()  # a real process spawned by this one
        line = describe(client)
        assert client.scheduler.address in line and client.dashboard_link in line
        assert "1 worker," in line and "1 threads" in line
        link = client.dashboard_link
    assert client.status == "closed"
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == "zombie"
    assert any(link in r.getMessage() for r in caplog.records)


def test_local_profile_listens_on_loopback_only():
    """The shipped `local` profile: every listening socket of us and our children is loopback."""
    with connect("local", SHIPPED) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        socks = listening_sockets({os.getpid()} | descendants())
        ports = {port for _, _, port in socks}
        # Non-vacuous: the scheduler and the dashboard are among the sockets seen.
        assert port_of(client.scheduler.address) in ports
        assert port_of(client.dashboard_link.rsplit("/", 1)[0]) in ports
        assert len(client.run(os.getpid)) == 2
        exposed = [s for s in socks if s[1] not in LOOPBACK]
        assert not exposed, f"sockets not on loopback: {exposed}"


def test_local_falls_back_to_builtin_spec(tmp_path):
    path = write(tmp_path, ONE_WORKER)  # no `local` profile in this file
    with connect("local", path) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result() == 3


# ---------------------------------------------------------------- running schedulers


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate subprocesses and everything they spawned (nanny → worker)."""
    family = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family += psutil.Process(p.pid).children(recursive=True)
    for p in reversed(procs):  # workers first, so they do not wait for a lost scheduler
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture
def dask_subprocess_cluster(tmp_path):
    """`dask scheduler` + `dask worker` as real subprocesses on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = (tmp_path / "dask.log").open("w")
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(DASK),
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dashboard-address",
                    "127.0.0.1:0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    str(DASK),
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "1GiB",
                    "--no-dashboard",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for_port(port)
        yield address, procs
    finally:
        _stop(procs)
        log.close()


@pytest.mark.slow
def test_connect_to_subprocess_scheduler(dask_subprocess_cluster):
    address, procs = dask_subprocess_cluster
    with connect(address, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [1, 2]).result() == 3
        (worker_pid,) = client.run(os.getpid).values()
        worker_family = {c.pid for c in psutil.Process(procs[1].pid).children(recursive=True)}
        assert worker_pid in worker_family | {procs[1].pid}
        assert "1 worker," in describe(client)
    # connect() does not own a scheduler it only connected to: it keeps running.
    assert procs[0].poll() is None and procs[1].poll() is None


def test_unreachable_address_fails_within_bound(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SchedulerError) as err:
        with connect(address, timeout=2):
            pass
    # A liveness bound (the brief's "< 30 s"), not a performance measurement.
    assert time.monotonic() - start < 30
    assert str(err.value).startswith(f"could not reach Dask scheduler at {address} within 2s")


def test_not_an_address_nor_profile(tmp_path):
    with pytest.raises(ConfigError, match="known profiles"):
        with connect("http://127.0.0.1:8786", write(tmp_path, ONE_WORKER)):
            pass


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_cluster():
    """A TLS-only LocalCluster (self-signed, Security.temporary) with one worker process."""
    security = Security.temporary()
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        protocol="tls://",
        security=security,
        dashboard_address="127.0.0.1:0",
        memory_limit="1GiB",
    ) as cluster:
        yield cluster, security


@pytest.fixture
def pem_files(tmp_path, tls_cluster):
    """The TLS cluster's CA, client cert and key written as PEM files."""
    _, security = tls_cluster
    files = {}
    for key, name in (
        ("tls_ca_file", "ca.pem"),
        ("tls_client_cert", "client.pem"),
        ("tls_client_key", "client-key.pem"),
    ):
        (tmp_path / name).write_text(getattr(security, key))
        files[key] = tmp_path / name
    return files


@pytest.fixture(autouse=True, scope="module")
def _module_processes_gone():
    """The module-scoped TLS cluster is checked separately once the module ends."""
    before = descendants()
    yield
    new = [psutil.Process(p) for p in descendants() - before if psutil.pid_exists(p)]
    _, alive = psutil.wait_procs(new, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_tls_address_with_dask_config_certificates(tls_cluster, pem_files):
    cluster, _ = tls_cluster
    address = cluster.scheduler_address
    assert address.startswith("tls://127.0.0.1:")
    with dask.config.set(
        {
            "distributed.comm.tls.ca-file": str(pem_files["tls_ca_file"]),
            "distributed.comm.tls.client.cert": str(pem_files["tls_client_cert"]),
            "distributed.comm.tls.client.key": str(pem_files["tls_client_key"]),
        }
    ):
        with connect(address, timeout=10) as client:
            assert client.submit(sum, [1, 2]).result() == 3


def test_tls_address_with_profile_certificates(tmp_path, tls_cluster, pem_files):
    cluster, _ = tls_cluster
    address = cluster.scheduler_address
    path = write(
        tmp_path,
        f"""
profiles:
  remote:
    address: {address}
    require_encryption: true
    security:
      tls_ca_file: {pem_files["tls_ca_file"]}
      tls_client_cert: {pem_files["tls_client_cert"]}
      tls_client_key: {pem_files["tls_client_key"]}
""",
    )
    with connect("remote", path) as client:
        assert client.submit(sum, [1, 2]).result() == 3
    with connect(address, path) as client:  # same address → that profile's certificates
        assert client.submit(sum, [1, 2]).result() == 3


def test_tls_address_without_certificates_is_a_config_error(tls_cluster):
    with pytest.raises(ConfigError, match="needs TLS certificates"):
        with connect(tls_cluster[0].scheduler_address):
            pass


def test_plain_tcp_client_cannot_reach_tls_scheduler(tls_cluster):
    plain = tls_cluster[0].scheduler_address.replace("tls://", "tcp://")
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="could not reach Dask scheduler at tcp://"):
        with connect(plain, timeout=3):
            pass
    assert time.monotonic() - start < 30  # liveness bound, not a timing measurement


def test_profile_requiring_encryption_refuses_tcp(tmp_path):
    port = free_port()
    path = write(
        tmp_path,
        f"""
profiles:
  strict: {{address: "tcp://127.0.0.1:{port}", require_encryption: true}}
""",
    )
    with pytest.raises(ConfigError, match="'strict' requires encryption"):
        with connect("strict", path):
            pass
    with dask.config.set({"distributed.comm.require-encryption": True}):
        with pytest.raises(ConfigError, match="requires encryption"):
            with connect(f"tcp://127.0.0.1:{port}"):
                pass


def test_secure_local_profile_uses_tls_only(tmp_path):
    path = write(
        tmp_path,
        """
profiles:
  secure:
    module: distributed
    class: LocalCluster
    require_encryption: true
    security: {temporary: true}
    kwargs: {n_workers: 1, threads_per_worker: 1, processes: true,
             host: 127.0.0.1, dashboard_address: "127.0.0.1:0", memory_limit: 1GiB}
""",
    )
    with connect("secure", path) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert all(w.startswith("tls://") for w in client.run(os.getpid))
        assert client.submit(sum, [1, 2]).result() == 3
        with pytest.raises(SchedulerError):
            with connect(address.replace("tls://", "tcp://"), timeout=3):
                pass


def test_encryption_profile_with_plain_protocol_is_refused(tmp_path):
    path = write(
        tmp_path,
        """
profiles:
  mixed:
    module: distributed
    class: LocalCluster
    require_encryption: true
    security: {temporary: true}
    kwargs: {n_workers: 0, processes: true, protocol: "tcp://",
             host: 127.0.0.1, dashboard_address: "127.0.0.1:0"}
""",
    )
    with pytest.raises(ConfigError, match="'mixed' requires encryption.*tcp://"):
        with connect("mixed", path):
            pass


def test_local_workers_keep_adaptive_malloc_unless_the_user_sets_it(tmp_path, monkeypatch):
    """distributed's MALLOC_TRIM_THRESHOLD_=65536 (page faults on every large array) is dropped for
    local workers; a value the user chose in dask config is kept."""
    import dask

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    path = write(tmp_path, ONE_WORKER)
    with connect("tiny", path) as client:
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 123456}):
        with connect("tiny", path) as client:
            assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == ["123456"]


# ---------------------------------------------------------------- bad input: one error line


SWEEP = REPO / "jobs" / "sweep.py"
#: A one-cell sweep: a scheduler problem is the only thing that can go wrong.
ONE_CELL = ("--k", "5", "--seeds", "1", "--init", "data", "--no-report")
HTTP_REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def run_sweep(store: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """jobs/sweep.py on a one-cell grid as a subprocess; (result, wall seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(SWEEP),
            "--dataset",
            str(store),
            *ONE_CELL,
            "--out",
            str(tmp_path / "r.zarr"),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, the last stderr line is `error: …` naming every needle, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


@contextmanager
def fake_server(*replies: bytes | None) -> Iterator[str]:
    """A TCP server on 127.0.0.1 in a thread; yields its tcp:// address.

    The n-th connection is sent replies[n] (the last one for all later
    connections; None: nothing) and kept open until the server stops.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.05)
    stop, conns = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            reply = replies[min(len(conns), len(replies) - 1)]
            conns.append(conn)
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        sock.close()


def dask_like_greeting() -> bytes:
    """A message framed as a Dask scheduler's first one (length, frame count, lengths, frames)."""
    import msgpack

    body = msgpack.packb({"compression": None, "python": [3, 11, 7], "pickle-protocol": 5})
    frames = struct.pack("Q", 1) + struct.pack("Q", len(body)) + body
    return struct.pack("Q", len(frames)) + frames


@pytest.fixture
def http_server(tmp_path):
    """`python -m http.server` on a free 127.0.0.1 port; yields its tcp:// address."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


NOT_A_CLUSTER = """
profiles:
  printer: {module: builtins, class: print, kwargs: {}}
  shell: {module: os, class: system, kwargs: {command: "touch MARKER"}}
  odict: {module: collections, class: OrderedDict, kwargs: {}}
  function: {module: os.path, class: join, kwargs: {a: x}}
"""


@pytest.mark.parametrize("name", ["printer", "shell", "odict", "function"])
def test_profile_class_must_be_a_dask_cluster(tmp_path, name):
    marker = tmp_path / "pwned"
    path = write(tmp_path, NOT_A_CLUSTER.replace("MARKER", str(marker)))
    with pytest.raises(ConfigError, match=f"'{name}'.* is not a Dask cluster class"):
        with connect(name, path, timeout=5):
            pass
    assert not marker.exists()  # os.system was never called


LOCAL_NONSENSE = [
    ("n_workers: -3", "n_workers must be a whole number ≥ 0"),
    ("n_workers: 1.5", "n_workers must be a whole number ≥ 0"),
    ("n_workers: true", "n_workers must be a whole number ≥ 0"),
    ("n_workers: 0", "n_workers: 0 starts no workers"),
    ("n_workers: 1, threads_per_worker: 0", "threads_per_worker must be a whole number ≥ 1"),
    ("n_workers: 1, memory_limit: lots", "memory_limit 'lots' is not a size"),
    ("n_workers: 1, memory_limit: -3", "memory_limit must not be negative"),
    ("n_workers: 1, processes: maybe", "processes must be true or false"),
]


@pytest.mark.parametrize(("kwargs", "expected"), LOCAL_NONSENSE)
def test_local_cluster_nonsense_is_refused_before_starting(tmp_path, kwargs, expected):
    path = write(
        tmp_path,
        f"""
profiles:
  bad: {{module: distributed, class: LocalCluster, kwargs: {{{kwargs}, host: 127.0.0.1}}}}
""",
    )
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"'bad': {expected}"):
        with connect("bad", path, timeout=5):
            pass
    assert time.monotonic() - start < 5  # nothing was started (the fixture checks no processes)


def test_adapt_with_maximum_zero_is_refused(tmp_path):
    path = write(
        tmp_path,
        """
profiles:
  never: {module: distributed, class: LocalCluster, adapt: {maximum: 0}, kwargs: {n_workers: 0}}
""",
    )
    with pytest.raises(ConfigError, match="'never': adapt with a maximum of 0"):
        load_profiles(path)


def test_cluster_whose_workers_never_come_fails_after_the_timeout(tmp_path):
    """A SpecCluster without workers (a batch queue that never starts them) waited forever."""
    path = write(
        tmp_path,
        """
profiles:
  empty:
    module: distributed
    class: SpecCluster
    kwargs:
      scheduler: {cls: distributed.Scheduler,
                  options: {host: 127.0.0.1, dashboard_address: "127.0.0.1:0"}}
      workers: {}
""",
    )
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="'empty': no worker joined .* within 2s"):
        with connect("empty", path, timeout=2):
            pass
    assert 2 <= time.monotonic() - start < 15


def test_adapt_from_zero_workers_does_not_wait_and_scales_up(tmp_path):
    path = write(
        tmp_path,
        """
profiles:
  elastic:
    module: distributed
    class: LocalCluster
    adapt: {minimum: 0, maximum: 1}
    kwargs: {n_workers: 0, threads_per_worker: 1, processes: true, host: 127.0.0.1,
             dashboard_address: "127.0.0.1:0", memory_limit: 1GiB}
""",
    )
    with connect("elastic", path, timeout=2) as client:
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3  # a worker came on demand


def test_refused_connection_fails_fast():
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SchedulerError, match="ConnectionRefusedError"):
        with connect(address, timeout=30):
            pass
    assert time.monotonic() - start < 5  # distributed alone retries for 33 s


def test_silent_port_waits_the_timeout_given_and_says_so():
    with fake_server(None) as address:
        start = time.monotonic()
        with pytest.raises(SchedulerError) as err:
            with connect(address, timeout=3):
                pass
        elapsed = time.monotonic() - start
    assert f"could not reach Dask scheduler at {address} within 3s" in str(err.value)
    assert 2.9 <= elapsed < 5, elapsed  # was timeout + 5 s


@pytest.mark.parametrize("kind", ["answers HTTP at once", "greets like Dask, then HTTP"])
def test_server_answering_http_is_not_a_dask_scheduler(kind):
    """distributed read 'HTTP/1.1' as a frame length and asked numpy for 3.07 EiB."""
    replies = (
        (HTTP_REPLY,) if kind == "answers HTTP at once" else (dask_like_greeting(), HTTP_REPLY)
    )
    with fake_server(*replies) as address:
        start = time.monotonic()
        with pytest.raises(SchedulerError, match="is not a Dask scheduler"):
            with connect(address, timeout=10):
                pass
        assert time.monotonic() - start < 5


def test_http_server_is_not_a_dask_scheduler(http_server):
    with pytest.raises(SchedulerError, match="is not a Dask scheduler") as err:
        with connect(http_server, timeout=10):
            pass
    assert "<!DOCTYPE" in str(err.value) or "HTTP/" in str(err.value)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, 0, True, "10"])
def test_timeout_must_be_positive_and_finite(tmp_path, timeout):
    with pytest.raises(ConfigError, match="timeout must be a positive, finite number"):
        with connect("tiny", write(tmp_path, ONE_WORKER), timeout=timeout):
            pass


def test_profile_connect_timeout_must_be_finite(tmp_path):
    path = write(
        tmp_path,
        ONE_WORKER.replace("class: LocalCluster", "class: LocalCluster\n    connect_timeout: .nan"),
    )
    with pytest.raises(ConfigError, match="connect_timeout must be a positive number"):
        load_profiles(path)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("tcp://127.0.0.1", "needs a port"), ("tcp://127.0.0.1:99999", "is not a TCP port")],
)
def test_address_without_a_usable_port_is_a_config_error(address, expected):
    with pytest.raises(ConfigError, match=expected):
        with connect(address, timeout=5):
            pass


CLI_PROFILES = (
    NOT_A_CLUSTER
    + """
  negative: {module: distributed, class: LocalCluster, kwargs: {n_workers: -3, host: 127.0.0.1}}
  nothreads: {module: distributed, class: LocalCluster,
              kwargs: {n_workers: 1, threads_per_worker: 0, host: 127.0.0.1}}
"""
)


@pytest.mark.parametrize(
    ("profile", "needle"),
    [
        ("printer", "'printer': builtins.print is not a Dask cluster class"),
        ("shell", "'shell': os.system is not a Dask cluster class"),
        ("odict", "'odict': collections.OrderedDict is not a Dask cluster class"),
        ("negative", "'negative': n_workers must be a whole number ≥ 0, not -3"),
        ("nothreads", "'nothreads': threads_per_worker must be a whole number ≥ 1, not 0"),
    ],
)
def test_sweep_with_a_nonsense_profile_ends_in_one_error_line(
    mnist_subset_store, tmp_path, profile, needle
):
    marker = tmp_path / "pwned"
    config = write(tmp_path, CLI_PROFILES.replace("MARKER", str(marker)), "profiles.yaml")
    proc, seconds = run_sweep(
        mnist_subset_store,
        tmp_path,
        "--scheduler",
        profile,
        "--cluster-config",
        str(config),
        "--timeout",
        "3",
    )
    assert_one_error(proc, needle)
    assert seconds < 60 and not marker.exists() and not (tmp_path / "r.zarr").exists()


def test_sweep_against_a_refused_port_ends_fast(mnist_subset_store, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    proc, seconds = run_sweep(
        mnist_subset_store, tmp_path, "--scheduler", address, "--timeout", "30"
    )
    assert_one_error(proc, address, "ConnectionRefusedError")
    assert seconds < 20  # was 33 s: distributed retries a refusal for timeout + 3 s


def test_sweep_against_a_silent_port_states_the_timeout(mnist_subset_store, tmp_path):
    with fake_server(None) as address:
        proc, _ = run_sweep(mnist_subset_store, tmp_path, "--scheduler", address, "--timeout", "3")
    assert_one_error(proc, f"{address} within 3s")


def test_sweep_against_an_http_server_says_it_is_not_a_scheduler(
    mnist_subset_store, tmp_path, http_server
):
    proc, seconds = run_sweep(
        mnist_subset_store, tmp_path, "--scheduler", http_server, "--timeout", "10"
    )
    assert_one_error(proc, http_server, "is not a Dask scheduler")
    assert seconds < 60


def test_sweep_against_a_server_answering_http_at_once(mnist_subset_store, tmp_path):
    """The user's case: an ArrayMemoryError traceback (3.07 EiB) instead of an error line."""
    with fake_server(HTTP_REPLY) as address:
        proc, seconds = run_sweep(
            mnist_subset_store, tmp_path, "--scheduler", address, "--timeout", "10"
        )
    assert_one_error(proc, address, "is not a Dask scheduler", "HTTP/1.1")
    assert seconds < 60
