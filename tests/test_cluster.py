"""kmclust.cluster: cluster.yaml validation and real connections on 127.0.0.1.

Clusters here are real: worker processes (LocalCluster with processes), a
`dask scheduler` + `dask worker` started as subprocesses, and TLS with
self-signed certificates. Every test checks that no child process outlives it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask.config
import psutil
import pytest
from distributed import LocalCluster, Security

from kmclust.cluster import connect, describe, find_config, load_profiles
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
        ("profiles:\n  p: {module: distributed, class: LocalCluster, kwargs: [1]}\n",
         "kwargs must be a mapping"),
        ("profiles:\n  p: {module: distributed, class: LocalCluster, kwargs: {}, kwarg: 1}\n",
         "unknown keys ['kwarg']"),
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
    path = write(tmp_path, """
profiles:
  nomod: {module: no_such_module_xyz, class: X, kwargs: {}}
  nocls: {module: distributed, class: NoSuchCluster, kwargs: {}}
""")
    with pytest.raises(ConfigError, match="'nomod'.*no_such_module_xyz"):
        with connect("nomod", path):
            pass
    with pytest.raises(ConfigError, match="'nocls'.*NoSuchCluster"):
        with connect("nocls", path):
            pass


def test_wrong_kwarg_is_caught_before_starting(tmp_path):
    # SpecCluster has no **kwargs: the signature check rejects it without processes.
    path = write(tmp_path, """
profiles:
  spec: {module: distributed, class: SpecCluster, kwargs: {n_wrkers: 2}}
""")
    with pytest.raises(ConfigError, match="'spec'.*'n_wrkers'"):
        with connect("spec", path):
            pass


def test_wrong_kwarg_of_local_cluster_names_profile_and_kwarg(tmp_path):
    # LocalCluster forwards unknown kwargs to its workers, which fail to start.
    path = write(tmp_path, ONE_WORKER.replace("memory_limit: 1GiB", "memory_limit: 1GiB, n_wrkers: 1"))
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
        try:
            family += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
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
        procs.append(subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            [str(DASK), "worker", address, "--host", "127.0.0.1", "--nworkers", "1",
             "--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard"],
            stdout=log, stderr=subprocess.STDOUT))
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
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      protocol="tls://", security=security, dashboard_address="127.0.0.1:0",
                      memory_limit="1GiB") as cluster:
        yield cluster, security


@pytest.fixture
def pem_files(tmp_path, tls_cluster):
    """The TLS cluster's CA, client cert and key written as PEM files."""
    _, security = tls_cluster
    files = {}
    for key, name in (("tls_ca_file", "ca.pem"), ("tls_client_cert", "client.pem"),
                      ("tls_client_key", "client-key.pem")):
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
    with dask.config.set({"distributed.comm.tls.ca-file": str(pem_files["tls_ca_file"]),
                          "distributed.comm.tls.client.cert": str(pem_files["tls_client_cert"]),
                          "distributed.comm.tls.client.key": str(pem_files["tls_client_key"])}):
        with connect(address, timeout=10) as client:
            assert client.submit(sum, [1, 2]).result() == 3


def test_tls_address_with_profile_certificates(tmp_path, tls_cluster, pem_files):
    cluster, _ = tls_cluster
    address = cluster.scheduler_address
    path = write(tmp_path, f"""
profiles:
  remote:
    address: {address}
    require_encryption: true
    security:
      tls_ca_file: {pem_files['tls_ca_file']}
      tls_client_cert: {pem_files['tls_client_cert']}
      tls_client_key: {pem_files['tls_client_key']}
""")
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
    path = write(tmp_path, f"""
profiles:
  strict: {{address: "tcp://127.0.0.1:{port}", require_encryption: true}}
""")
    with pytest.raises(ConfigError, match="'strict' requires encryption"):
        with connect("strict", path):
            pass
    with dask.config.set({"distributed.comm.require-encryption": True}):
        with pytest.raises(ConfigError, match="requires encryption"):
            with connect(f"tcp://127.0.0.1:{port}"):
                pass


def test_secure_local_profile_uses_tls_only(tmp_path):
    path = write(tmp_path, """
profiles:
  secure:
    module: distributed
    class: LocalCluster
    require_encryption: true
    security: {temporary: true}
    kwargs: {n_workers: 1, threads_per_worker: 1, processes: true,
             host: 127.0.0.1, dashboard_address: "127.0.0.1:0", memory_limit: 1GiB}
""")
    with connect("secure", path) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert all(w.startswith("tls://") for w in client.run(os.getpid))
        assert client.submit(sum, [1, 2]).result() == 3
        with pytest.raises(SchedulerError):
            with connect(address.replace("tls://", "tcp://"), timeout=3):
                pass


def test_encryption_profile_with_plain_protocol_is_refused(tmp_path):
    path = write(tmp_path, """
profiles:
  mixed:
    module: distributed
    class: LocalCluster
    require_encryption: true
    security: {temporary: true}
    kwargs: {n_workers: 0, processes: true, protocol: "tcp://",
             host: 127.0.0.1, dashboard_address: "127.0.0.1:0"}
""")
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
