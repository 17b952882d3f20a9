"""The PostgreSQL engine at its edges: the URL, secrets, schemas, U+0000, waiting for the write lock, a server
that goes away. Each against the throwaway cluster of the suite (a real PostgreSQL)."""
from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.audit import records as r
from gateway.audit.log import append
from gateway.cli import cli
from gateway.errors import ConfigError, DatabaseUnavailable
from gateway.store import postgresql
from gateway.store import db as store_db
from gateway.store.db import connect, transaction

CST = _dt.timezone(_dt.timedelta(hours=8))


def test_a_password_is_never_shown(pg_cluster: Any) -> None:
    assert postgresql.redact("postgresql://gw:pw@h/db?password=hunter2&sslmode=require") == \
        "postgresql://gw:***@h/db?password=***&sslmode=require"
    url = pg_cluster.url("gw", password="hunter2-SECRET")  # trust authentication: the password is not needed
    shown = CliRunner().invoke(cli, ["db", "status", "--db", url])
    assert shown.exit_code == 0 and "hunter2" not in shown.output and "password=***" in shown.output
    down = CliRunner().invoke(cli, ["db", "status", "--db", "postgresql://gw:hunter2@127.0.0.1:1/x?password=hunter2"])
    assert down.exit_code == 1 and "hunter2" not in down.output and "cannot connect" in down.output


def test_url_parameters_reach_libpq_as_given(pg_cluster: Any) -> None:
    db = connect(pg_cluster.url("gw", options="-c%20statement_timeout%3D1234",
                                application_name="lab%26sslmode%3Drequire"))
    assert db.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
    assert db.execute("SELECT current_setting('application_name')").fetchone()[0] == "lab&sslmode=require"
    assert db.execute("SHOW lock_timeout").fetchone()[0] == f"{postgresql.LOCK_TIMEOUT_S}s"
    assert db.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == \
        f"{postgresql.IDLE_IN_TRANSACTION_S // 60}min"
    db.close()
    with pytest.raises(ConfigError, match="not a valid PostgreSQL address"):
        connect(pg_cluster.url("gw", no_such_parameter="1"))


def test_schema_names(pg_cluster: Any) -> None:
    with pytest.raises(ConfigError, match="lower-case letters"):
        connect(pg_cluster.url("gw", schema="A1"))
    db = connect(pg_cluster.url("gw", schema="select"))  # a reserved word is quoted, not refused
    assert db.execute("SELECT current_schema()").fetchone()[0] == "select"
    db.close()
    with pytest.raises(ConfigError, match="no schema 'never_made'"):
        connect(pg_cluster.url("gw", schema="never_made"), readonly=True)
    check = connect(pg_cluster.url("gw"))
    assert check.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'never_made'").fetchone()[0] == 0
    check.close()


def test_nul_is_kept_as_a_stand_in_and_the_audit_chain_is_the_same_on_both_engines(
        tmp_path: Any, pg_url: str) -> None:
    pg = connect(pg_url)
    pg.execute("CREATE TABLE t (v TEXT)")
    pg.execute("INSERT INTO t VALUES (?)", ["a\x00b"])
    assert pg.execute("SELECT v FROM t").fetchone()[0] == "a\ufffdb"
    lite = connect(tmp_path / "gw.db")
    me = r.Party.member("12511921MB0001003C")
    heads = []
    for db in (lite, pg):
        entry = append(db, r.exchange("received", at=_dt.datetime(2026, 12, 4, 9, 0, tzinfo=CST), gateway=me,
                                      peer=r.Party.member("bad\x00name"), bundle_hash="sha256:" + "0" * 64))
        heads.append(entry.hash)
    assert heads[0] == heads[1]
    pg.close()
    lite.conn.close()


def test_a_writer_waits_for_the_lock_only_so_long(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgresql, "LOCK_TIMEOUT_S", 1)
    holder, waiter = connect(pg_url), connect(pg_url)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with transaction(holder):
            held.set()
            release.wait(10)
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    started = time.monotonic()
    with pytest.raises(store_db.OperationalError):
        with transaction(waiter):
            pass
    assert time.monotonic() - started < 5
    release.set()
    thread.join()
    with transaction(waiter):  # free again once the holder is done
        pass
    holder.close()
    waiter.close()


def test_the_first_error_is_the_one_raised_when_the_server_ends_the_connection(pg_url: str) -> None:
    db, admin = connect(pg_url), connect(pg_url)
    pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
    with pytest.raises(store_db.OperationalError) as raised:
        with transaction(db):
            admin.execute("SELECT pg_terminate_backend(?)", [pid])
            db.execute("SELECT 1")
    assert "terminat" in str(raised.value).lower()
    admin.close()


def test_a_server_that_is_not_there_is_one_line() -> None:
    with pytest.raises(DatabaseUnavailable, match="cannot connect to the PostgreSQL database"):
        connect("postgresql://gw@127.0.0.1:1/x")
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", "postgresql://gw@127.0.0.1:1/x"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("tamper", [
    "ALTER TABLE audit_log ENABLE REPLICA TRIGGER audit_log_no_delete",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_delete",
    "CREATE OR REPLACE FUNCTION audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
    "DROP TRIGGER audit_key_no_update ON audit_key; CREATE TRIGGER audit_key_no_update BEFORE UPDATE ON audit_key"
    " FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse('x')",
])
def test_a_guard_the_owner_made_harmless_is_found(pg_url: str, tamper: str) -> None:
    """The role that owns the audit tables can disable a guard, make it replica-only, or keep its name and change
    what it does: verify finds each."""
    from gateway.audit.verify import verify

    db = connect(pg_url)
    me = r.Party.member("12511921MB0001003C")
    for i in range(3):
        append(db, r.exchange("received", at=_dt.datetime(2026, 12, 4, 9, i, tzinfo=CST), gateway=me, peer=me,
                              bundle_hash=f"sha256:{i:064x}"))
    assert verify(db).ok
    db.executescript(tamper)
    report = verify(db)
    assert not report.ok
    assert any("guards were removed, disabled or changed" in f.message for f in report.findings)
    db.close()


def test_placeholders_are_found_only_outside_quotes_comments_and_bodies(pg_url: str) -> None:
    assert postgresql.translate("SELECT ? /* ? */, '?%', \"?\", $$ ?% $$, $f$ ? $f$ -- ?") == \
        "SELECT %s /* ? */, '?%%', \"?\", $$ ?%% $$, $f$ ? $f$ -- ?"
    db = connect(pg_url)
    row = db.execute("SELECT ?::int /* ? */, '?%', $$ ?% $$, ?::text -- ?", [7, "x"]).fetchone()
    assert tuple(row) == (7, "?%", " ?% ", "x")
    db.close()


def test_a_pipeline_opens_a_new_connection_after_the_server_ended_its_own(
        tmp_path: Any, pg_url: str, clock: Any) -> None:
    """A PostgreSQL restart or failover ends every session: the next message of the thread gets a new connection
    (the one that met the broken connection fails cleanly, and is stored once when sent again)."""
    from gateway.bench.inputs import oru_batch
    from gateway.pipeline import Pipeline, Status

    from gateway.config import load_settings

    pipeline = Pipeline(load_settings(environ={}, overrides={"data_dir": str(tmp_path), "database": pg_url,
                                                             "issuer_uscc": "12511921MB0001003C"}), clock=clock)
    first, second = oru_batch(2, seed=41)
    assert pipeline.ingest(first, "hl7v2", channel="mllp")[0].status is Status.STORED
    admin = connect(pg_url)
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(pipeline.ingest(second, "hl7v2", channel="mllp")[0].status)
            break
        except store_db.OperationalError:
            outcomes.append("connection lost")
    assert outcomes[-1] is Status.STORED, outcomes
    assert admin.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    pipeline.close()
    admin.close()


def test_the_tables_and_columns_a_schema_holds_are_read_from_the_catalog_as_information_schema_has_them(
        pg_url: str) -> None:
    """``schema.columns`` and the read models' ``tables`` answer what ``information_schema`` answers (a view, a
    column dropped, a name in another case, an index, no such table), from the catalog itself: information_schema
    reads every schema's relations, and slows with every member schema a regional database holds (a start-up asks
    several times)."""
    from gateway.store import schema
    from gateway.store.store import Store
    from gateway.store.views import ReadModels

    store = Store.open(pg_url)
    db = store.db
    db.execute('CREATE TABLE "Mixed" ("Col" integer, other text)')
    db.execute("CREATE VIEW counted AS SELECT 1 AS one, 'x' AS two")
    db.execute("ALTER TABLE messages DROP COLUMN attempts")
    other = connect(pg_url.replace("schema=", "schema=x"))  # (another schema: never answered for this one)
    other.execute("CREATE TABLE messages (elsewhere integer)")
    other.close()
    tables = {str(r[0]) for r in db.execute("SELECT table_name FROM information_schema.tables"
                                            " WHERE table_schema = current_schema()").fetchall()}
    assert {"messages", "Mixed", "counted"} <= tables
    assert ReadModels(db).tables() == tables
    for name in sorted(tables) + ["mixed", "MESSAGES", "messages_status", "no_such_table"]:
        expected = {str(r[0]) for r in db.execute("SELECT column_name FROM information_schema.columns WHERE"
                                                  " table_schema = current_schema() AND table_name = ?",
                                                  [name]).fetchall()}
        assert schema.columns(db, name) == expected, name
    assert "attempts" not in schema.columns(db, "messages") and "elsewhere" not in schema.columns(db, "messages")
    store.close()


def test_the_throwaway_cluster_tries_another_port_when_its_own_is_taken_before_postgresql_binds_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' PostgreSQL picks a free port and PostgreSQL binds it later: a port another program took meanwhile
    is one more try on another port, not a failed run."""
    import socket

    from gateway.store import pgcluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        picks = iter([busy, pgcluster._free_port()])
        monkeypatch.setattr(pgcluster, "_free_port", lambda: next(picks))
        try:
            cluster = pgcluster.Cluster().start()
        except pgcluster.ClusterError as exc:
            if "not installed" in str(exc) and not os.environ.get("CI"):
                pytest.skip(f"PostgreSQL: {exc}")
            raise
        try:
            assert cluster.port != busy
            db = connect(cluster.url("postgres"))
            assert db.execute("SELECT 1").fetchone()[0] == 1
            db.close()
        finally:
            cluster.stop()
