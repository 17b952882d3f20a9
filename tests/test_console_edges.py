"""The console at its edges, as an outside tester found them in a browser: a raw view found by the patient, the
exchange page saying what ``gateway outbox list/show`` says, the "same command" line pasted into a shell, filters
written with ASCII brackets or naming nothing, referral lanes by name, the withdrawn-decision banner.

Runs on the demo's gateways (fixtures of tests/test_console.py), served by the real app factory on a test clock.
"""
from __future__ import annotations

import html
import re
import shlex
import sqlite3
from contextlib import closing
from pathlib import Path

from click.testing import CliRunner

from gateway.cli import cli
import test_console
from test_console import _csrf, _gateway, _log, login

demo = test_console.demo  # (the fixtures: the demo's gateways, on a test clock)
fuling = test_console.fuling

ID_CARD = "urn:oid:2.16.156.10011.1.3"
#: The patient of the demo's 涪陵 messages 1 (HL7 v2, stored) and 2 (HL7 v2, refused).
FULING_PATIENT = "500102197506152342"
#: The patient of the Bundles 涪陵 received from 通江 (messages 3, 4, 5 and 7).
TONGJIANG_PATIENT = "511921196612120011"


def _audit_query(folder: Path, *params: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), "audit", "query", "--json", *params],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _raw_view_reads(folder: Path, patient: str) -> list[str]:
    """The entities of the reads naming ``patient`` (by 身份证号) that name a message: its raw bytes viewed."""
    import json

    bundle = json.loads(_audit_query(folder, f"patient:identifier={ID_CARD}|{patient}"))
    found = []
    for entry in bundle.get("entry", []):
        for entity in entry["resource"].get("entity", []):
            ref = (entity.get("what") or {}).get("reference", "")
            if ref.startswith("messages/"):
                found.append(ref)
    return found


# --------------------------------------------------------------------------- 1. raw views found by patient


def test_console_raw_view_is_found_by_the_patient(fuling) -> None:
    app, _, folder = fuling
    a, _ = login(app, "adm")
    assert a.get("/console/messages/1/raw").status_code == 200  # stored: its Patient resource names the patient
    assert a.get("/console/messages/2/raw").status_code == 200  # refused: the 身份证号 its bytes hold
    assert a.get("/console/messages/4/raw").status_code == 200  # a signed Bundle received from 通江
    assert sorted(_raw_view_reads(folder, FULING_PATIENT)) == ["messages/1", "messages/2"]
    assert _raw_view_reads(folder, TONGJIANG_PATIENT) == ["messages/4"]
    reads = [e for e in _log(folder, "read") if "messages/4" in e.get("resources", [])]
    assert len(reads) == 1 and reads[0]["user"]["value"] == "adm" and reads[0]["patient"]["value"] == \
        TONGJIANG_PATIENT and reads[0]["patient"]["reference"].startswith("Patient/")
    # the operator's entry is written as before
    assert [o["target"] for o in _log(folder, "operator") if o["action"] == "message-raw-viewed"] == [
        "messages/1", "messages/2", "messages/4"]


def test_command_line_raw_view_is_found_by_the_patient(fuling) -> None:
    _, _, folder = fuling
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), "messages", "show", "1", "--raw"],
                                catch_exceptions=False)
    assert result.exit_code == 0 and "MSH|" in result.output
    assert _raw_view_reads(folder, FULING_PATIENT) == ["messages/1"]
    assert [o["target"] for o in _log(folder, "operator")] == ["messages/1"]


# --------------------------------------------------------------------------- 4. the exchange page as the CLI says it


def _outbox_cells(page: str, row: int) -> str:
    found = re.search(r'<tr data-outbox="%d".*?</tr>' % row, page, re.S)
    assert found, page[:2000]
    return found.group(0)


def test_exchange_page_says_what_outbox_show_says(demo: Path, tmp_path: Path) -> None:
    import subprocess

    from gateway.audit import records
    from gateway.audit.log import append
    from gateway.store.db import connect, transaction
    from gateway.store.store import lease_owner

    app, clock, folder = _gateway(demo, tmp_path, "tongjiang")
    with closing(sqlite3.connect(folder / "gateway.db")) as conn, conn:
        rows = [r[0] for r in conn.execute("SELECT id FROM outbox WHERE status = 'delivered' ORDER BY id LIMIT 2")]
        conn.execute("UPDATE outbox SET status = 'dead', attempts = 7, last_error = 'timed out' WHERE id = ?",
                     [rows[0]])
    a, _ = login(app, "adm")
    page = a.get("/console/exchange").get_data(as_text=True)
    assert a.post(f"/console/outbox/{rows[0]}/retry", data={"csrf_token": _csrf(page)}).status_code == 303
    due = clock().timestamp() + 600
    gone = subprocess.Popen(["true"])  # (a process of this host that has ended: its pid names nobody)
    gone.wait()
    owner = f"{lease_owner().rpartition(':')[0]}:{gone.pid}"
    with closing(sqlite3.connect(folder / "gateway.db")) as conn, conn:  # its next attempt timed out too
        conn.execute("UPDATE outbox SET attempts = 1, last_error = 'timed out', next_attempt_at = ? WHERE id = ?",
                     [due, rows[0]])
        conn.execute("UPDATE outbox SET status = 'delivering', lease_owner = ?, lease_until = ? WHERE id = ?",
                     [owner, due, rows[1]])
    db = connect(folder / "gateway.db")
    try:  # a push that failed, as the exchange writes it
        with transaction(db):
            append(db, records.exchange("sent", at=clock(), gateway=records.Party.member("12511921MB0001003C"),
                                        peer=records.Party.member("12500102MB0002006J"), bundle_hash="sha256:ab",
                                        outcome=records.Outcome.SERIOUS_FAILURE, reason="gave-up",
                                        detail="gave up after the last attempt: timed out"))
    finally:
        db.conn.close()
    page = a.get("/console/exchange").get_data(as_text=True)
    retried = _outbox_cells(page, rows[0])
    assert 'data-attempts="1" data-total-attempts="8"' in retried and "8 in all" in retried
    assert "timed out" in retried and "data-next-try=" in retried
    leased = _outbox_cells(page, rows[1])
    assert f'data-holder="{owner}" data-holder-state="gone"' in leased and "gone" in leased
    failed = re.search(r'<tr data-exchange="\d+" data-direction="send-failed" data-outcome="8">.*?</tr>', page, re.S)
    assert failed and "gave-up" in failed.group(0) and "严重失败" in failed.group(0)


# --------------------------------------------------------------------------- 2. the "same command" line, shell-quoted

CY_L006 = "https://fhir.cyhr.org.cn/CodeSystem/catalogue-chuanyu|CY-L006"


def _same_command(page: str) -> str:
    found = re.search(r"同命令 Same as: <code>(.*?)</code>", page, re.S)
    assert found, page[:2000]
    return html.unescape(found.group(1))


def test_same_command_line_is_shell_quoted(fuling) -> None:
    app, _, folder = fuling
    c, _ = login(app, "aud")
    from urllib.parse import urlencode

    page = c.get("/console/recognition?" + urlencode({"item": CY_L006, "issuer": "通江县人民医院（演示）"}))
    assert page.status_code == 200
    command = _same_command(page.get_data(as_text=True))
    assert f"--item '{CY_L006}'" in command
    argv = shlex.split(command)  # what bash makes of the line pasted: the item whole, not a pipe into CY-L006
    assert argv[:3] == ["gateway", "audit", "stats"] and argv[argv.index("--item") + 1] == CY_L006
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), *argv[1:], "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- 3. filters: brackets, names nothing


def test_issuer_name_with_ascii_brackets_or_spaces_is_the_member(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    full = c.get("/console/recognition?issuer=通江县人民医院（演示）").get_data(as_text=True)
    for typed in ("通江县人民医院(演示)", "通江县人民医院 (演示)", "通江县人民医院（ 演示 ）"):
        answer = c.get("/console/recognition", query_string={"issuer": typed})
        assert answer.status_code == 200, typed
        page = answer.get_data(as_text=True)
        assert "--issuer 12511921MB0001003C" in _same_command(page)
        assert _figures_of(page) == _figures_of(full)


def _figures_of(page: str) -> list[str]:
    return re.findall(r'<span data-figure="[^"]*" data-value="[^"]*"[^>]*>', page)


def test_unknown_item_catalogue_alliance_are_said_as_an_unknown_issuer_is(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    issuer = c.get("/console/recognition?issuer=没有这家医院")
    assert issuer.status_code == 422  # (as it was)
    for box, value, words in (("item", "cy-l005", "did you mean CY-L005"), ("item", "ALT", "CY-L005"),
                              ("alliance", "川渝HR", "no scope of the registry"),
                              ("catalogue", "nonexist", "no catalogue of the registry")):
        for path in ("/console/recognition", "/console/recognition.csv"):
            answer = c.get(path, query_string={box: value, "from": "2020-01"})
            page = answer.get_data(as_text=True)
            assert answer.status_code == issuer.status_code, (path, box, value, answer.status_code)
            assert words in html.unescape(page) and "nothing could match" in page, (path, box, value)
            assert "data-again" in page  # the same search without it, a click away
        listed = c.get("/console/recognition/decisions", query_string={box: value, "outcome": "eligible"})
        page = html.unescape(listed.get_data(as_text=True))  # a list of decisions: empty, and it says why
        assert listed.status_code == 200 and "data-notice" in page and words in page, (box, value)
    # known ones, and names written with other brackets, select as before
    for box, value in (("item", "CY-L005"), ("item", CY_L006), ("catalogue", "chuanyu"), ("alliance", "川渝"),
                       ("catalogue", "川渝检查检验结果互认项目目录(演示)")):
        answer = c.get("/console/recognition", query_string={box: value})
        assert answer.status_code == 200 and "data-notice" not in answer.get_data(as_text=True), (box, value)
    named = c.get("/console/recognition", query_string={"catalogue": "川渝检查检验结果互认项目目录(演示)"})
    assert "--catalogue chuanyu" in _same_command(named.get_data(as_text=True))


def test_an_item_the_registry_no_longer_has_but_decisions_name_is_a_notice(fuling, monkeypatch) -> None:
    from types import SimpleNamespace

    from gateway.console import views

    app, _, _ = fuling
    c, _ = login(app, "aud")
    before = c.get("/console/recognition?item=CY-L005").get_data(as_text=True)
    later = SimpleNamespace(catalogues=(), authority_uscc="", authority_name="", supervising_authorities=dict)
    monkeypatch.setattr(views, "_registries", lambda: [later], raising=False)  # a later registry, without the item
    answer = c.get("/console/recognition?item=CY-L005")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200 and "data-notice" in page and "decision(s) recorded earlier" in page
    assert _figures_of(page) == _figures_of(before)


# --------------------------------------------------------------------------- 5. referral lanes by name

AUTHORITY = "11510000MB00060015"  # 四川省卫生健康委员会（演示）, where 涪陵 referred a report


def test_referral_lanes_are_shown_with_the_authoritys_name(fuling) -> None:
    app, _, folder = fuling
    with closing(sqlite3.connect(folder / "gateway.db")) as conn:
        lanes = [r[0] for r in conn.execute("SELECT id FROM outbox WHERE destination = ?", [f"referral:{AUTHORITY}"])]
    assert lanes  # the demo's referral
    c, _ = login(app, "aud")
    exchange = c.get("/console/exchange").get_data(as_text=True)
    cell = re.search(r'<td data-destination="referral:%s">(.*?)</td>' % AUTHORITY, exchange, re.S)
    assert cell and "四川省卫生健康委员会" in cell.group(1) and f"referral:{AUTHORITY}" in cell.group(1)
    overview = c.get("/console/").get_data(as_text=True)
    row = re.search(r"<tr><td>((?:(?!</td>).)*referral:%s(?:(?!</td>).)*)</td>" % AUTHORITY, overview, re.S)
    assert row and "四川省卫生健康委员会" in row.group(1)


# --------------------------------------------------------------------------- 6. the withdrawn-decision banner


def test_withdrawn_banner_names_the_correction_once(fuling) -> None:
    app, _, folder = fuling
    withdrawn = _log(folder, "withdrawal")
    assert withdrawn
    c, _ = login(app, "aud")
    for entry in withdrawn:
        page = html.unescape(c.get(f"/console/decisions/{entry['decision_id']}").get_data(as_text=True))
        banner = re.search(r'<p class="msg bad">.*?</p>', page, re.S)
        assert banner, page[:1500]
        said = banner.group(0)
        assert said.count(entry["superseded_by"]) == 1 and entry["report"]["value"] in said, said
