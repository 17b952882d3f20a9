"""`gateway recognize` and `gateway decisions`: tables and JSON with every rule, --at recorded, decisions
stored and listed, overrides recorded, and every error as one readable line."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gateway.commands.recognize import decisions, recognize
from gateway.commands.registry import registry

DATA = Path(__file__).parent / "data" / "registry"
TONGJIANG, FULING = "12511921MB0001003C", "12500102MB0002006J"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-registry"
    result = CliRunner().invoke(registry, ["demo", "--out", str(out), "--at", "2026-11-22T09:00:00+08:00"])
    assert result.exit_code == 0, result.output
    return out


def _args(demo_dir: Path, *more: str) -> list[str]:
    return [
        "--registry",
        str(demo_dir / "DEMO-snapshot.json"),
        "--authority",
        str(demo_dir / "DEMO-authority.pem"),
        *more,
    ]


def test_table_lists_every_rule(demo_dir: Path) -> None:
    result = CliRunner().invoke(
        recognize,
        [
            str(DATA / "bundle-lab-tongjiang.json"),
            *_args(demo_dir, "--receiver", FULING, "--at", "2026-11-22T10:00:00+08:00"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "decided at 2026-11-22T10:00:00+08:00, registry snapshot 1 [DEMO]" in out
    assert "5 result(s): 3 recognized, 0 need review, 2 not recognized" in out
    assert "[1] 白细胞计数  RECOGNIZED  (chuanyu:CY-L001 川渝HR)" in out
    assert "✗ eqa-pass" in out and "EQA failed for 丙氨酸氨基转移酶" in out
    assert out.count("✓ member-active") == 5


def test_json_and_storage(demo_dir: Path, tmp_path: Path, database: str) -> None:
    runner = CliRunner()
    db = database or tmp_path / "gw.db"  # the backend chosen with --backend
    result = runner.invoke(
        recognize,
        [
            str(DATA / "bundle-occupational-cdc.json"),
            *_args(demo_dir, "--receiver", FULING, "--at", "2026-11-22T10:00:00+08:00", "--db", str(db), "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[: result.output.rindex("}") + 1])
    outcomes = [d["outcome"] for d in doc["decisions"]]
    assert outcomes == ["recognized", "recognized", "not-recognized"]
    assert doc["decisions"][0]["decided_at"] == "2026-11-22T10:00:00+08:00"
    assert {r["rule"] for r in doc["decisions"][0]["rules"]} >= {"occupational-filing", "occupational-physician"}

    # every decision stored is audited with it, so the published figures count decisions made here too
    from gateway.audit.stats import compute
    from gateway.store.db import connect

    audited = connect(db)
    try:
        kinds = [r[0] for r in audited.execute("SELECT kind FROM audit_log ORDER BY seq")]
        figures = compute(audited)
    finally:
        audited.conn.close()
    assert kinds.count("decision") == 3
    # the third result is outside every catalogue: counted apart, not in the 互认率
    assert figures["total"]["eligible"] == 2 and figures["total"]["accepted"] == 2, figures["total"]
    assert figures["outside_catalogue"] == 1

    listed = runner.invoke(decisions, ["list", "--db", str(db), "--outcome", "recognized"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("recognized") == 2 and "CY-O001" in listed.output
    decision_id = doc["decisions"][0]["decision_id"]

    over = runner.invoke(
        decisions,
        [
            "override",
            decision_id,
            "--db",
            str(db),
            "--reason",
            "appraisal",
            "--physician",
            "DEMO-500102-D077",
            "--note",
            "伤残鉴定",
        ],
    )
    assert over.exit_code == 0, over.output
    assert "涉及司法、伤残及病退等鉴定的" in over.output
    shown = runner.invoke(decisions, ["show", decision_id, "--db", str(db)])
    stored = json.loads(shown.output)
    assert stored["outcome"] == "recognized" and stored["overrides"][0]["reason"] == "appraisal"
    as_json = runner.invoke(decisions, ["list", "--db", str(db), "--item", "CY-O001", "--json"])
    assert json.loads(as_json.output)["decisions"][0]["overrides"][0]["physician"]["value"] == "DEMO-500102-D077"
    # the retired code `other` is still taken; what is printed is what is stored
    retired = runner.invoke(decisions, ["override", decision_id, "--db", str(db), "--reason", "other",
                                        "--physician", "DEMO-500102-D077"])
    assert retired.exit_code == 0, retired.output
    assert retired.output.rstrip().endswith(": other-necessary (其他情形确需复查的)"), retired.output
    stored = json.loads(runner.invoke(decisions, ["show", decision_id, "--db", str(db)]).output)
    assert [o["reason"] for o in stored["overrides"]] == ["appraisal", "other-necessary"]


def test_at_defaults_to_now_and_is_printed(demo_dir: Path) -> None:
    result = CliRunner().invoke(
        recognize, [str(DATA / "bundle-lab-tongjiang.json"), *_args(demo_dir, "--receiver", FULING)]
    )
    # The demo snapshot is dated 2026-11-22 and valid for 7 days: "now" decides only while it is valid.
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=8)))
    if dt.datetime(2026, 11, 22, 9, tzinfo=now.tzinfo) <= now <= dt.datetime(2026, 11, 29, 9, tzinfo=now.tzinfo):
        assert result.exit_code == 0 and f"decided at {now.date().isoformat()}" in result.output
    else:
        assert result.exit_code == 1 and ("expired" in result.output or "future" in result.output)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--receiver", "12500102MB0002006K", "--at", "2026-11-22T10:00:00+08:00"], "check character"),
        (["--receiver", FULING, "--at", "2026-12-22T10:00:00+08:00"], "expired"),
        (["--receiver", FULING, "--at", "2026-11-22T10:00:00"], "no UTC offset"),
    ],
)
def test_errors_are_one_line(demo_dir: Path, extra: list[str], fragment: str) -> None:
    result = CliRunner().invoke(recognize, [str(DATA / "bundle-lab-tongjiang.json"), *_args(demo_dir, *extra)])
    assert result.exit_code != 0
    assert fragment in result.output and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    # Usage errors come with click's usage hint; the error itself is always one line.
    assert len(lines) == 1 or (result.exit_code == 2 and lines[-1].startswith("Error:") and fragment in lines[-1])


def test_bad_bundles_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", "entry": [', encoding="utf-8")
    result = runner.invoke(
        recognize, [str(broken), *_args(demo_dir, "--receiver", FULING, "--at", "2026-11-22T10:00:00+08:00")]
    )
    assert result.exit_code == 1 and "not valid JSON" in result.output
    bad_patient = json.loads((DATA / "bundle-lab-tongjiang.json").read_text(encoding="utf-8"))
    bad_patient["entry"][1]["resource"]["identifier"][0]["value"] = "110105194912310021"
    result = runner.invoke(
        recognize,
        ["-", *_args(demo_dir, "--receiver", FULING, "--at", "2026-11-22T10:00:00+08:00")],
        input=json.dumps(bad_patient),
    )
    assert result.exit_code == 1 and "身份证号 check digit" in result.output
    assert "110105194912310021" not in result.output  # the patient's number is not echoed
    tampered = tmp_path / "snap.json"
    tampered.write_text(
        (demo_dir / "DEMO-snapshot.json").read_text(encoding="utf-8").replace("二级甲等", "三级甲等", 1),
        encoding="utf-8",
    )
    result = runner.invoke(
        recognize,
        [
            str(DATA / "bundle-lab-tongjiang.json"),
            "--registry",
            str(tampered),
            "--authority",
            str(demo_dir / "DEMO-authority.pem"),
            "--receiver",
            FULING,
        ],
    )
    assert result.exit_code == 1 and "signature verification failed" in result.output


def test_decisions_commands_need_a_database(tmp_path: Path, database: str) -> None:
    """A database that is not there is named and refused, never created: a missing SQLite file, or a
    PostgreSQL schema that does not exist (a typo in the URL)."""
    missing = f"{database}_missing" if database else str(tmp_path / "missing.db")
    said = "has no schema" if database else "no such database"
    result = CliRunner().invoke(decisions, ["list", "--db", missing])
    assert result.exit_code in (1, 2) and said in result.output
    result = CliRunner().invoke(
        decisions, ["override", "x", "--db", missing, "--reason", "other", "--physician", "D1"]
    )
    assert result.exit_code in (1, 2) and said in result.output, result.output
    if database:  # the schema was not made by the attempt
        result = CliRunner().invoke(decisions, ["list", "--db", missing])
        assert "has no schema" in result.output
    else:
        assert not Path(missing).exists()
    reasons = CliRunner().invoke(decisions, ["reasons"])
    assert reasons.exit_code == 0 and reasons.output.count("\n") == 12


def test_every_command_and_option_has_help() -> None:
    commands: list[click.Command] = [recognize, *decisions.commands.values()]
    for command in commands:
        assert command.help, command.name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.name}"


def test_authority_defaults_to_certs(demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.commands.registry as commands

    monkeypatch.delenv("GATEWAY_REGISTRY_AUTHORITY", raising=False)
    monkeypatch.setattr(commands, "DEFAULT_AUTHORITY", tmp_path / "registry-authority.pem")
    args = [
        str(DATA / "bundle-lab-tongjiang.json"),
        "--registry",
        str(demo_dir / "DEMO-snapshot.json"),
        "--receiver",
        FULING,
        "--at",
        "2026-11-22T10:00:00+08:00",
    ]
    result = CliRunner().invoke(recognize, args)
    assert result.exit_code == 1 and "registry-authority.pem" in result.output
    (tmp_path / "registry-authority.pem").write_bytes((demo_dir / "DEMO-authority.pem").read_bytes())
    result = CliRunner().invoke(recognize, args)
    assert result.exit_code == 0, result.output


def test_a_snapshot_the_databases_gateway_would_refuse_is_refused(demo_dir: Path, tmp_path: Path,
                                                                  database: str) -> None:
    """Decisions stored with --db count in the figures the gateway publishes: they are made only by a snapshot
    that gateway would take (no older version than one it applied, no other snapshot under an applied version),
    and the snapshot they cite is kept with them (as the gateway keeps the snapshots it applies)."""
    from gateway.registry.holder import highest_version, known_version, remember_version
    from gateway.registry.snapshot import verify_snapshot
    from gateway.commands.registry import authority_certificates

    db = database or str(tmp_path / "gw.db")
    runner = CliRunner()
    bundle = str(DATA / "bundle-lab-tongjiang.json")
    at = ["--receiver", FULING, "--at", "2026-11-22T10:00:00+08:00", "--db", db]
    first = runner.invoke(recognize, [bundle, *_args(demo_dir, *at)])
    assert first.exit_code == 0, first.output
    text = (demo_dir / "DEMO-snapshot.json").read_bytes()
    snapshot = verify_snapshot(text, authority_certificates((str(demo_dir / "DEMO-authority.pem"),)),
                               dt.datetime(2026, 11, 22, 10, tzinfo=dt.timezone(dt.timedelta(hours=8))))
    assert highest_version(db) == 1 and known_version(db, 1, snapshot.digest())

    # another snapshot under version 1 (another authority's demo, content of its own)
    other = tmp_path / "other"
    made = runner.invoke(registry, ["demo", "--out", str(other), "--at", "2026-11-22T09:00:00+08:00"])
    assert made.exit_code == 0, made.output
    refused = runner.invoke(recognize, [bundle, "--registry", str(other / "DEMO-snapshot.json"), "--authority",
                                        str(other / "DEMO-authority.pem"), *at])
    assert refused.exit_code == 1, refused.output
    assert "version 1 differs from the one this database's gateway applied" in refused.output
    assert "Traceback" not in refused.output

    # a database whose gateway applied version 2 already: version 1 is older
    remember_version(db, 2, "0" * 64, dt.datetime(2026, 11, 22, 9, 30, tzinfo=dt.timezone.utc), member=FULING)
    older = runner.invoke(recognize, [bundle, *_args(demo_dir, *at)])
    assert older.exit_code == 1 and "is older than version 2" in older.output, older.output
    from gateway.recognition.store import list_decisions
    from gateway.store.db import connect

    stored = connect(db, readonly=True)
    try:
        assert len(list_decisions(stored)) == 5  # the first run's only
    finally:
        stored.conn.close()
