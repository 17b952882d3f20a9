"""The console (/console/): log-in, lock-out, idle time-out, CSRF, roles, every page with its figures, and the
recognition figures equal to `gateway audit stats --json` for the same selection; exports parse.

Runs on the demo's 涪陵 gateway (real decisions, a refusal, an override, received Bundles) and its 通江 gateway
(an outbox with delivered Bundles), each served by the real app factory on a test clock.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import sqlite3
from contextlib import closing
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway import auth
from gateway.audit import records
from gateway.audit.log import entries
from gateway.cli import cli
from gateway.config import load_settings
from gateway.demo import DEMO_START, run_demo

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("console") / "demo"
    run_demo(str(base), echo=lambda _line: None)
    return base


class Clock:
    """A settable clock starting now (the demo's registry authority is made at run time, valid from now)."""

    def __init__(self) -> None:
        import datetime as dt

        self.now = dt.datetime.now(DEMO_START.tzinfo).replace(microsecond=0)

    def __call__(self) -> Any:
        return self.now

    def advance(self, **delta: float) -> None:
        import datetime as dt

        self.now += dt.timedelta(**delta)


def _gateway(demo: Path, tmp_path: Path, member: str) -> tuple[Any, Clock, Path]:
    from gateway.api.app import create_app
    from gateway.pipeline import Pipeline

    folder = tmp_path / member
    shutil.copytree(demo / member, folder)
    text = (folder / "gateway.toml").read_text(encoding="utf-8").replace(str(demo / member), str(folder))
    (folder / "gateway.toml").write_text(text, encoding="utf-8")
    settings = load_settings(environ={"GATEWAY_CONFIG": str(folder / "gateway.toml")}, overrides={})
    clock = Clock()
    with closing(sqlite3.connect(folder / "gateway.db")) as conn, conn:  # the story's messages came in an hour ago
        conn.execute("UPDATE messages SET received_at = ?", [(clock() - dt.timedelta(hours=1)).isoformat()])
    pipe = Pipeline(settings, clock=clock)
    app = create_app(settings, pipe)
    app.config["TESTING"] = True
    db = pipe.store.db
    me = records.Party.member(settings.issuer_uscc)
    setup = records.Party("test-setup")
    for name, role in (("aud", "auditor"), ("adm", "admin"), ("lis2", "submitter")):
        auth.add_user(db, name, [role], at=clock(), gateway=me, by=setup)
        auth.set_password(db, name, PASSWORD, at=clock(), gateway=me, by=setup)
    return app, clock, folder


@pytest.fixture
def fuling(demo: Path, tmp_path: Path) -> tuple[Any, Clock, Path]:
    return _gateway(demo, tmp_path, "fuling")


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def login(app: Any, name: str, password: str = PASSWORD) -> tuple[Any, Any]:
    c = app.test_client()
    page = c.get("/console/login")
    form = {"username": name, "password": password, "csrf_token": _csrf(page.get_data(as_text=True))}
    answer = c.post("/console/login", data=form)
    return c, answer


def _log(folder: Path, kind: str) -> list[dict[str, Any]]:
    from gateway.store.db import connect

    db = connect(folder / "gateway.db")
    try:
        return [e.facts | {"seq": e.seq} for e in entries(db) if e.kind == kind]
    finally:
        db.conn.close()


def _figures(html: str, name: str) -> list[dict[str, str]]:
    out = []
    for tag in re.findall(r'<span data-figure="%s"([^>]*)>' % re.escape(name), html):
        out.append(dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag)))
    return out


def test_browser_without_session_is_sent_to_login(fuling) -> None:
    app, _, _ = fuling
    answer = app.test_client().get("/console/recognition?from=2026-11")
    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("/console/login?next=")
    page = app.test_client().get("/console/login")
    assert page.status_code == 200 and "登录" in page.get_data(as_text=True)


def test_login_logout_cookie_and_audit(fuling) -> None:
    app, _, folder = fuling
    c, answer = login(app, "aud")
    assert answer.status_code == 303 and answer.headers["Location"] == "/console/"
    cookie = answer.headers.getlist("Set-Cookie")[0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert c.get("/console/").status_code == 200
    page = c.get("/console/").get_data(as_text=True)
    assert c.post("/console/logout", data={"csrf_token": _csrf(page)}).status_code == 303
    assert c.get("/console/").status_code == 303
    logins = _log(folder, "login")
    assert [(e["action"], e["outcome"], e["user"]["value"]) for e in logins] == [
        ("login", "0", "aud"), ("logout", "0", "aud")]


def test_secure_cookie_over_tls(fuling) -> None:
    app, _, _ = fuling
    c = app.test_client()
    page = c.get("/console/login", base_url="https://localhost")
    answer = c.post("/console/login", base_url="https://localhost",
                    data={"username": "aud", "password": PASSWORD, "csrf_token": _csrf(page.get_data(as_text=True))})
    assert "Secure" in answer.headers.getlist("Set-Cookie")[0]


def test_lockout_after_five_failures(fuling) -> None:
    app, clock, folder = fuling
    for _ in range(4):
        _, answer = login(app, "aud", "wrong password!")
        assert answer.status_code == 401 and "用户名或密码错误" in answer.get_data(as_text=True)
    _, answer = login(app, "aud", "wrong password!")
    assert answer.status_code == 403 and "锁定" in answer.get_data(as_text=True)
    _, answer = login(app, "aud")  # the right password while locked
    assert answer.status_code == 403 and "锁定" in answer.get_data(as_text=True)
    clock.advance(minutes=16)
    _, answer = login(app, "aud")
    assert answer.status_code == 303
    reasons = [(e["outcome"], e.get("reason")) for e in _log(folder, "login")]
    assert reasons == [("4", "password")] * 4 + [("4", "locked out"), ("4", "locked"), ("0", None)]


def test_idle_timeout(fuling) -> None:
    app, clock, folder = fuling
    c, _ = login(app, "aud")
    clock.advance(minutes=29)
    assert c.get("/console/").status_code == 200
    clock.advance(minutes=31)
    assert c.get("/console/").status_code == 303
    assert _log(folder, "login")[-1]["reason"] == "idle time-out"


def test_submitter_cannot_log_in(fuling) -> None:
    app, _, folder = fuling
    _, answer = login(app, "lis2")
    assert answer.status_code == 403
    assert "不能登录控制台" in answer.get_data(as_text=True)
    assert _log(folder, "login")[-1]["reason"] == "role"


def test_csrf_refused(fuling) -> None:
    app, _, _ = fuling
    c = app.test_client()
    c.get("/console/login")
    answer = c.post("/console/login", data={"username": "aud", "password": PASSWORD})
    assert answer.status_code == 400 and "CSRF" in answer.get_data(as_text=True)
    c, _ = login(app, "adm")
    answer = c.post("/console/logout")
    assert answer.status_code == 400 and "CSRF" in answer.get_data(as_text=True)
    assert c.get("/console/").status_code == 200  # still logged in


def test_change_password(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    token = _csrf(c.get("/console/account").get_data(as_text=True))
    bad = c.post("/console/account", data={"current_password": "nope", "new_password": "a new password 1",
                                           "new_password2": "a new password 1", "csrf_token": token})
    assert bad.status_code == 400
    ok = c.post("/console/account", data={"current_password": PASSWORD, "new_password": "a new password 1",
                                          "new_password2": "a new password 1", "csrf_token": token})
    assert ok.status_code == 303 and ok.headers["Location"] == "/console/account?changed=1"
    shown = c.get(ok.headers["Location"])  # what a reload of the page after the change asks again: nothing
    assert shown.status_code == 200 and "密码已修改" in shown.get_data(as_text=True)
    assert login(app, "aud", "a new password 1")[1].status_code == 303


def test_pages_the_console_does_not_have_are_console_pages(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    for path, method, status in (("/console/nope", "GET", 404), ("/console/audit/-1", "GET", 404),
                                 ("/console/logout", "GET", 405)):
        answer = c.open(path, method=method)
        text = answer.get_data(as_text=True)
        assert answer.status_code == status and answer.mimetype == "text/html", (path, answer.mimetype)
        assert "<title>" in text and "OperationOutcome" not in text and "返回控制台" in text
        assert answer.headers["X-Frame-Options"] == "DENY" and "default-src 'self'" in \
            answer.headers["Content-Security-Policy"]
    assert "POST" in c.get("/console/logout").headers["Allow"]
    assert app.test_client().get("/console/nope").mimetype == "text/html"  # without a session too
    assert app.test_client().get("/fhir/nope").mimetype == "application/fhir+json"  # the API's stay FHIR


def _stats_json(folder: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), "audit", "stats", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("query, argv", [
    ("from=2026-11&to=2026-11", ["--date", "ge2026-11", "--date", "le2026-11"]),
    ("issuer=12511921MB0001003C", ["--issuer", "12511921MB0001003C"]),
])
def test_recognition_figures_equal_the_cli(fuling, query: str, argv: list[str]) -> None:
    app, _, folder = fuling
    c, _ = login(app, "aud")
    html = c.get(f"/console/recognition?{query}").get_data(as_text=True)
    cli_figures = _stats_json(folder, *argv, "--by", "month,issuer")
    for name, key in (("recognition-rate", "rate"), ("eligible", "eligible"), ("accepted", "accepted"),
                      ("recognized", "recognized"), ("not-recognized", "not_recognized"),
                      ("needs-review", "needs_review"), ("overridden", "overridden")):
        shown = [f for f in _figures(html, name) if f.get("dimension") == "total"]
        want = cli_figures["total"][key]
        assert shown and shown[0]["value"] == ("" if want is None else str(want)), name
        by_issuer = {f["issuer"]: f["value"] for f in _figures(html, name) if f.get("table") == "by_issuer"}
        assert by_issuer == {g["key"]: ("" if g[key] is None else str(g[key])) for g in cli_figures["by_issuer"]}
        cells = {(f["month"], f["issuer"]): f["value"] for f in _figures(html, name)
                 if f.get("table") == "by_month_issuer"}
        assert cells == {(g["month"], g["issuer"]): ("" if g[key] is None else str(g[key]))
                         for g in cli_figures["by_month_issuer"]}
    assert "通江县人民医院（演示）" in html  # issuer names, not blanks
    # drill down from the refusals: the ALT decision, its rules, its AuditEvent
    link = re.search(r'href="(/console/recognition/decisions\?[^"]*rule=eqa-pass[^"]*)"', html)
    assert link
    listed = c.get(link.group(1).replace("&amp;", "&")).get_data(as_text=True)
    eqa = next(r["count"] for r in cli_figures["refusals"]["by_rule"] if r["rule"] == "eqa-pass")
    assert _figures(listed, "decisions-listed")[0]["value"] == str(eqa)
    decision = re.search(r'href="(/console/decisions/[^"]+)"', listed).group(1)
    detail = c.get(decision).get_data(as_text=True)
    assert 'data-rule="eqa-pass"' in detail and "未通过" in detail
    event = re.search(r'href="(/console/audit/\d+)"', detail).group(1)
    assert c.get(event).status_code == 200


def test_exports_equal_the_page(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    html = c.get("/console/recognition").get_data(as_text=True)
    text = c.get("/console/recognition.csv").get_data(as_text=True).lstrip("\ufeff")
    rows = list(csv.DictReader(io.StringIO(text)))
    by_issuer = {r["key"]: r["rate"] for r in rows if r["table"] == "by_issuer"}
    shown = {f["issuer"]: f["value"] for f in _figures(html, "recognition-rate") if f.get("table") == "by_issuer"}
    assert by_issuer == shown
    refusals = {r["key"]: r["count"] for r in rows if r["table"] == "refusals_by_rule"}
    # the demo's refusals: ALT (通江 failed EQA) and 邻水's CT made while it was 二级 (the direction rule)
    assert set(refusals) == {"eqa-pass", "direction"}
    assert refusals == {f["rule"]: f["value"] for f in _figures(html, "refusals")}
    from openpyxl import load_workbook

    book = load_workbook(io.BytesIO(c.get("/console/recognition.xlsx").data))
    sheet = book["by_issuer"]
    values = list(sheet.iter_rows(values_only=True))
    assert values[0][:2] == ("table", "key")
    assert {v[1]: ("" if v[-1] is None else str(v[-1])) for v in values[1:]} == shown


def test_every_page_with_figures_and_no_external_url(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    pages = ["/console/", "/console/messages", "/console/messages?status=stored&channel=http", "/console/messages/1",
             "/console/exchange", "/console/recognition", "/console/recognition/decisions?outcome=eligible",
             "/console/audit", "/console/audit?type=lab-recognition", "/console/registry", "/console/account",
             "/console/static/console.css"]
    for path in pages:
        answer = c.get(path)
        assert answer.status_code == 200, path
        body = answer.get_data(as_text=True)
        assert "Traceback" not in body
        external = re.findall(r"https?://[^\s\"'<>]+", body)
        assert [u for u in external if u != "http://www.w3.org/2000/svg"
                and not path.startswith("/console/audit") and "/console/recognition" not in path
                and not u.startswith("https://fhir.cyhr.org.cn/")] == [], path
    overview = c.get("/console/").get_data(as_text=True)
    assert _figures(overview, "queue-backlog")[0]["value"] == "0"
    assert _figures(overview, "snapshot-days-to-expiry")
    assert any(f["outcome"] == "stored" for f in _figures(overview, "messages"))
    recognition = c.get("/console/recognition").get_data(as_text=True)
    assert "<script" not in recognition and "<svg" in recognition
    for svg in re.findall(r"<svg.*?</svg>", recognition, re.S):
        assert re.findall(r"https?://[^\s\"'<>]+", svg) == ["http://www.w3.org/2000/svg"]


def test_auditor_cannot_act_admin_can(fuling) -> None:
    app, _, folder = fuling
    c, _ = login(app, "aud")
    token = _csrf(c.get("/console/").get_data(as_text=True))
    assert c.get("/console/messages/1/raw").status_code == 403
    assert c.post("/console/messages/1/retry", data={"csrf_token": token}).status_code == 403
    a, _ = login(app, "adm")
    raw = a.get("/console/messages/1/raw")
    assert raw.status_code == 200 and "MSH" in raw.get_data(as_text=True)
    ops = _log(folder, "operator")
    assert [(o["action"], o["target"], o["user"]["value"]) for o in ops] == [
        ("message-raw-viewed", "messages/1", "adm")]
    # a stored message is not failed: a clear page, no stack trace
    answer = a.post("/console/messages/1/retry", data={"csrf_token": _csrf(raw.get_data(as_text=True))})
    assert answer.status_code == 422 and "not failed" in answer.get_data(as_text=True)


def test_admin_retries_and_replays_a_delivery(demo: Path, tmp_path: Path) -> None:
    app, _, folder = _gateway(demo, tmp_path, "tongjiang")
    from gateway.store.db import connect

    db = connect(folder / "gateway.db")
    row = db.execute("SELECT id FROM outbox WHERE status = 'delivered' ORDER BY id LIMIT 1").fetchone()[0]
    db.execute("UPDATE outbox SET status = 'dead', last_error = 'test: gave up' WHERE id = ?", [row])
    db.conn.commit()
    db.conn.close()
    a, _ = login(app, "adm")
    page = a.get("/console/exchange").get_data(as_text=True)
    assert f'data-outbox="{row}" data-state="dead"' in page
    overview = a.get("/console/").get_data(as_text=True)
    assert any(f["state"] == "dead" and f["value"] == "1" for f in _figures(overview, "deliveries"))
    aud, _ = login(app, "aud")
    assert aud.post(f"/console/outbox/{row}/retry",
                    data={"csrf_token": _csrf(aud.get("/console/").get_data(as_text=True))}).status_code == 403
    assert a.post(f"/console/outbox/{row}/retry", data={"csrf_token": _csrf(page)}).status_code == 303
    assert f'data-outbox="{row}" data-state="pending"' in a.get("/console/exchange").get_data(as_text=True)
    ops = _log(folder, "operator")
    assert [(o["action"], o["target"]) for o in ops] == [("outbox-retry", f"outbox/{row}")]


def test_audit_verify_and_event_pages(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    page = c.get("/console/audit").get_data(as_text=True)
    answer = c.post("/console/audit/verify", data={"csrf_token": _csrf(page)}, follow_redirects=True)
    assert answer.status_code == 200
    assert 'data-figure="audit-verify" data-value="ok"' in answer.get_data(as_text=True)


def _entries_in(folder: Path) -> int:
    from gateway.store.db import connect

    db = connect(folder / "gateway.db")
    try:
        return sum(1 for _ in entries(db))
    finally:
        db.conn.close()


def test_verifying_the_chain_goes_on_to_its_result_which_a_reload_shows_again_without_verifying(fuling) -> None:
    """校验哈希链 answered the POST with the result page: Back asked the browser to send the form again, and Reload
    verified the whole chain again and wrote another audit entry. The verification now goes on (303) to the page of
    its result; reading that page again verifies nothing and audits nothing, and another session does not see it."""
    app, _, folder = fuling
    c, _ = login(app, "aud")
    page = c.get("/console/audit").get_data(as_text=True)
    before = _entries_in(folder)
    answer = c.post("/console/audit/verify", data={"csrf_token": _csrf(page)})
    assert answer.status_code == 303, answer.status_code
    assert answer.headers["Location"] == "/console/audit/verify"
    verified = _entries_in(folder)
    assert verified == before + 1  # the verification itself is audited, once
    for _ in range(2):  # the page, and a reload of it
        shown = c.get(answer.headers["Location"])
        text = shown.get_data(as_text=True)
        assert shown.status_code == 200 and 'data-figure="audit-verify" data-value="ok"' in text, text[:800]
        assert "OK: " in text and "aud" in text
    assert _entries_in(folder) == verified
    other, _ = login(app, "aud")
    elsewhere = other.get("/console/audit/verify").get_data(as_text=True)
    assert 'data-figure="audit-verify"' not in elsewhere and "尚未校验" in elsewhere
    other.set_cookie("gateway_console_verify", c.get_cookie("gateway_console_verify", path="/console/audit/verify")
                     .value, path="/console/audit/verify")  # a result kept by another session is not shown here
    assert 'data-figure="audit-verify"' not in other.get("/console/audit/verify").get_data(as_text=True)


def test_users_add_with_password_file_and_passwd(tmp_path: Path, database: str) -> None:
    runner = CliRunner()
    db = database or tmp_path / "gw.db"
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    result = runner.invoke(cli, ["users", "add", "qc", "--role", "auditor", "--password-file", str(secret),
                                 "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "console password set" in result.output
    result = runner.invoke(cli, ["users", "passwd", "qc", "--password-file", "-", "--db", str(db)],
                           input="another long one\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["users", "passwd", "qc", "--password-file", "-", "--db", str(db)], input="short\n")
    assert result.exit_code != 0 and "at least" in result.output
    result = runner.invoke(cli, ["users", "add", "lis", "--role", "submitter", "--password-file", str(secret),
                                 "--db", str(db)])
    assert result.exit_code != 0 and "only auditor and admin" in result.output


def test_charts_are_readable_and_self_contained() -> None:
    """Charts are drawn at the size they are shown (labels ≥ 11 px), with an axis, values on the marks, a single
    month as a labelled column, long names shortened with the whole name in a <title>, and no external link."""
    from gateway.console import charts

    one = charts.line([("2026-11", 0.6667)], "rate by month", links=["/console/recognition/decisions?month=2026-11"],
                      notes=["4/6"])
    assert 'viewBox="0 0 640 ' in one and "<circle" not in one and 'class="bar"' in one
    assert "66.7% (4/6)" in one and ">100%</text>" in one and ">0%</text>" in one and ">2026-11</text>" in one
    assert 'href="/console/recognition/decisions?month=2026-11"' in one
    many = charts.line([(f"2026-{m:02d}", m / 12) for m in range(1, 8)], "rate by month")
    assert "<polyline" in many and many.count("<circle") == 7 and "58.3%" in many
    long_name = "川渝职业健康检查结果互认项目目录中名称特别特别长的一个检验项目（演示）"
    drawn = charts.bars([(long_name, 0.5), ("血常规", None)], "rate by item", notes=["1/2", ""])
    assert f"<title>{long_name}: 互认率 50.0%（1/2）</title>" in drawn and "…</text>" in drawn
    assert "50.0% (1/2)" in drawn and "无可判定" in drawn
    counts = charts.stacked(["11-22", "11-23"], {"stored": [4, 0], "refused": [2, 0]}, "per day")
    assert ">6</text>" in counts and ">10</text>" in counts and "入库 stored" in counts
    for svg in (one, many, drawn, counts):
        sizes = [float(s) for s in re.findall(r'font-size="([\d.]+)"', svg)]
        assert sizes and min(sizes) >= 11
        assert re.findall(r"https?://[^\s\"'<>]+", svg) == ["http://www.w3.org/2000/svg"]
    assert "无数据" in charts.line([("2026-11", None)], "x") and "无数据" in charts.bars([], "x")


def test_recognition_tables_show_month_and_issuer_apart(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    html = c.get("/console/recognition?from=2026-11&to=2026-11").get_data(as_text=True)
    table = re.search(r'<table class="figures" data-table="by_month_issuer">.*?</table>', html, re.S).group(0)
    assert "2026-11|" not in re.sub(r'data-key="[^"]*"', "", table)  # the key is for machines only
    row = re.search(r'<tr data-key="2026-11\|12511921MB0001003C">(.*?)</tr>', table, re.S).group(1)
    cells = re.findall(r'<td class="dim" data-(month|issuer)="([^"]+)">(.*?)</td>', row, re.S)
    assert [(d, v) for d, v, _ in cells] == [("month", "2026-11"), ("issuer", "12511921MB0001003C")]
    assert ">2026-11<" in cells[0][2] and "通江县人民医院（演示）" in cells[1][2] and "12511921MB0001003C" in cells[1][2]
    items = re.search(r'data-table="by_item">.*?</table>', html, re.S).group(0)
    assert "白细胞计数" in items and ">CY-L001<" in items  # the code shown, the catalogue system in its title
    # the charts are drawn with their marks linked to the decisions behind them
    assert html.count('<figure class="chart-box">') == 6 and "66.7% (4/6)" in html


def test_savings_hr_items_and_alliance_equal_the_cli(fuling) -> None:
    app, _, folder = fuling
    c, _ = login(app, "aud")
    html = c.get("/console/recognition").get_data(as_text=True)
    cli_figures = _stats_json(folder)
    sv = cli_figures["savings"]
    assert sv["results"] > 0 and sv["demo_fees"] is True  # the DEMO fee table of mappings/fees
    assert f"节约费用 Savings：{sv['total_yuan']:.2f} 元" in html and "DEMO fees, illustrative only" in html
    shown = {(f["item"], f["province"]): f["value"] for f in _figures(html, "savings-results")}
    assert shown == {(r["item"], r["province"]): str(r["results"]) for r in sv["by_item"]}
    yuan = dict(((i, p), v) for i, p, v in re.findall(
        r'data-figure="savings-yuan" data-item="([^"]+)" data-province="(\d+)">([\d.]+)<', html))
    assert yuan == {(r["item"], r["province"]): f"{r['yuan']:.2f}" for r in sv["by_item"]}
    hr = cli_figures["hr_items"]
    assert hr["results"] > 0 and "川渝HR" in hr["by_mark"]
    cells = dict(re.findall(r'data-figure="hr-results" data-issuer="([^"]+)">(\d+)<', html))
    assert cells == {r["key"]: str(r["results"]) for r in hr["by_issuer"]}
    alliance = {f["alliance"]: f["value"] for f in _figures(html, "eligible") if f.get("table") == "by_alliance"}
    assert alliance == {g["key"]: str(g["eligible"]) for g in cli_figures["by_alliance"]} and "川渝" in alliance


def test_favicon_and_member_names_on_exchange(fuling) -> None:
    app, _, _ = fuling
    c, _ = login(app, "aud")
    page = c.get("/console/exchange").get_data(as_text=True)
    icon = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', page)
    assert icon and icon.group(1) == "/console/static/favicon.svg"
    answer = app.test_client().get(icon.group(1))  # before log-in too: the log-in page shows it
    assert answer.status_code == 200 and answer.mimetype == "image/svg+xml" and b"<svg" in answer.data
    received = re.search(r"Received Bundles</h2>.*?</table>", page, re.S).group(0)
    assert "通江县人民医院（演示）" in received and "12511921MB0001003C" in received


def test_answer_sent_in_gb18030_reads_as_chinese(fuling) -> None:
    """The HIS of the demo speaks GB18030: the answer sent back to it shows its Chinese, not replacement marks."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    page = c.get("/console/messages/2").get_data(as_text=True)
    answer = re.search(r"Answer sent.*?<pre>(.*?)</pre>", page, re.S).group(1)
    assert "MSA|AR|" in answer and "涪陵中心医院" in answer and "\ufffd" not in answer


LIS_SAMPLE = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"


def test_a_list_asked_for_a_page_past_its_end_shows_its_last_page(app: Any, pipeline: Any) -> None:
    """A page number past the end showed an empty table ("第 99/3 页"); one too large for the database was an internal
    error (500). Either is the last page now; a page that is not a number is the first."""
    pipeline.ingest(LIS_SAMPLE.read_bytes(), "hl7v2", channel="mllp")
    me, setup = records.Party.member(TONGJIANG_USCC), records.Party("test-setup")
    auth.add_user(pipeline.store.db, "adm", ["admin"], at=pipeline.clock(), gateway=me, by=setup)
    auth.set_password(pipeline.store.db, "adm", PASSWORD, at=pipeline.clock(), gateway=me, by=setup)
    c, _ = login(app, "adm")
    first = c.get("/console/messages").get_data(as_text=True)
    rows = re.findall(r'href="/console/messages/(\d+)"', first)
    assert rows
    for page in ("99", "999999999999999999999999", "-3", "x"):
        answer = c.get(f"/console/messages?page={page}")
        assert answer.status_code == 200, page
        html = answer.get_data(as_text=True)
        assert re.findall(r'href="/console/messages/(\d+)"', html) == rows and "第 1/1 页" in html, page


def test_the_decisions_behind_a_figure_are_listed_a_page_at_a_time(fuling, monkeypatch) -> None:
    from gateway.console import views as console_views

    app, _, _ = fuling
    c, _ = login(app, "aud")
    everything = c.get("/console/recognition/decisions?outcome=eligible").get_data(as_text=True)
    ids = re.findall(r'data-decision="([^"]+)"', everything)
    assert len(ids) >= 3
    monkeypatch.setattr(console_views, "_DECISIONS_PAGE", 2)
    pages = -(-len(ids) // 2)
    seen: list[str] = []
    for n in range(1, pages + 1):
        html = c.get(f"/console/recognition/decisions?outcome=eligible&page={n}").get_data(as_text=True)
        assert f"第 {n}/{pages} 页" in html
        assert _figures(html, "decisions-listed")[0]["value"] == str(len(ids))  # every one behind the figure
        seen += re.findall(r'data-decision="([^"]+)"', html)
        assert ("下一页" in html) == (n < pages) and ("上一页" in html) == (n > 1)
    assert seen == ids
    last = c.get("/console/recognition/decisions?outcome=eligible&page=999999999999999999").get_data(as_text=True)
    assert re.findall(r'data-decision="([^"]+)"', last) == ids[-(len(ids) - 2 * (pages - 1)):]


def test_the_registry_page_shows_each_members_grade_and_what_has_expired(fuling) -> None:
    """The 等级 column read an undated field the snapshot no longer fills (levels are dated hospital-grade
    qualifications): it was empty for every member; a qualification past its end showed "active"."""
    from gateway.demo import MEMBERS

    app, clock, _ = fuling
    c, _ = login(app, "aud")
    html = c.get("/console/registry").get_data(as_text=True)
    levels = dict(re.findall(r'<td data-level="([^"]+)">([^<]*)</td>', html))
    assert levels[MEMBERS["fuling"].uscc] == "三级甲等"
    statuses = re.findall(r'<td data-status="[^"]+">([^<]*)</td>', html)
    assert "expired" in statuses and "active" in statuses
    expired_rows = [row for row in html.split("<tr") if "已过期 expired" in row]
    assert expired_rows and all('">expired</td>' in row or "suspended" in row or "revoked" in row
                                for row in expired_rows)


def test_pages_read_their_figures_from_the_database_on_each_backend(app: Any, pipeline: Any, backend: str) -> None:
    """Every read model behind the pages (overview, messages, a message and its bytes, exchange, registry,
    decision, audit) on the backend chosen: the figures shown are the database's."""
    from gateway.exchange.outbox import Outbox
    from gateway.store.db import dialect

    assert dialect(pipeline.store.db) == backend
    clock = pipeline.clock
    outcomes = pipeline.ingest(LIS_SAMPLE.read_bytes(), "hl7v2", channel="mllp")
    assert outcomes
    outbox = Outbox(pipeline.store.db, clock=clock)
    for dest, payload in (("12500102MB0002006J", b"a"), ("12500102MB0002006J", b"b"), ("12510000MB00030095", b"c")):
        outbox.enqueue(dest, "http://127.0.0.1:1/exchange/bundles", payload)
    me, setup = records.Party.member(TONGJIANG_USCC), records.Party("test-setup")
    auth.add_user(pipeline.store.db, "adm", ["admin"], at=clock(), gateway=me, by=setup)
    auth.set_password(pipeline.store.db, "adm", PASSWORD, at=clock(), gateway=me, by=setup)
    c, answer = login(app, "adm")
    assert answer.status_code == 303

    counts = pipeline.store.counts()
    overview = c.get("/console/")
    assert overview.status_code == 200
    page = overview.get_data(as_text=True)
    assert _figures(page, "queue-backlog")[0]["value"] == str(counts.get("queued", 0))
    found = c.get("/console/messages").get_data(as_text=True)
    assert _figures(found, "messages-found")[0]["value"] == str(sum(counts.values()))
    day = clock().date().isoformat()
    stored = c.get(f"/console/messages?status=stored&channel=mllp&from={day}&to={day}").get_data(as_text=True)
    assert _figures(stored, "messages-found")[0]["value"] == str(counts.get("stored", 0))
    assert _figures(c.get("/console/messages?from=2000-01-01&to=2000-01-02").get_data(as_text=True),
                    "messages-found")[0]["value"] == "0"
    first = min(int(i) for i in re.findall(r'href="/console/messages/(\d+)"', found))
    message = c.get(f"/console/messages/{first}")
    assert message.status_code == 200
    assert [s["stage"] for s in pipeline.store.stages_of(first)][0] in message.get_data(as_text=True)
    raw = c.get(f"/console/messages/{first}/raw")
    assert raw.status_code == 200 and "MSH|" in raw.get_data(as_text=True)
    assert c.get("/console/messages/999999").status_code == 404
    exchange = c.get("/console/exchange?destination=12500102MB0002006J").get_data(as_text=True)
    assert re.findall(r'data-destination="([^"]+)"', exchange) == ["12500102MB0002006J"] * 2
    shown = {(m[1], m[0]) for m in re.findall(r'data-state="([^"]+)"><td>\d+</td><td data-destination="([^"]+)"',
                                              c.get("/console/exchange").get_data(as_text=True))}
    assert shown == {("12500102MB0002006J", "pending"), ("12510000MB00030095", "pending")}
    assert c.get("/console/registry").status_code == 200
    assert c.get("/console/decisions/no-such-decision").status_code == 404
    assert c.get("/console/audit").status_code == 200
    assert any(e["seq"] for e in _log_of(pipeline.store.db, "operator"))  # the raw view was audited


def _log_of(db: Any, kind: str) -> list[dict[str, Any]]:
    return [e.facts | {"seq": e.seq} for e in entries(db) if e.kind == kind]


TONGJIANG_USCC = "12511921MB0001003C"


@pytest.mark.parametrize("query, argv", [
    ("", []),
    ("date=ge2020-01&by=month,issuer&issuer=12511921MB0001003C",
     ["--date", "ge2020-01", "--by", "month,issuer", "--issuer", "12511921MB0001003C"]),
    ("alliance=%E5%B7%9D%E6%B8%9D&by=alliance,item", ["--alliance", "川渝", "--by", "alliance,item"]),
])
def test_the_http_statistics_equal_the_cli(fuling, query: str, argv: list[str]) -> None:
    """GET /audit/stats gives what ``gateway audit stats --json`` gives for the same selection: the names, the fee
    table's savings and the alliances of the gateway's own registry snapshot included."""
    from gateway.store.db import connect

    app, clock, folder = fuling
    db = connect(folder / "gateway.db")
    settings = load_settings(environ={"GATEWAY_CONFIG": str(folder / "gateway.toml")}, overrides={})
    _, token = auth.add_user(db, "aud-api", ["auditor"], at=clock(), gateway=records.Party.member(
        settings.issuer_uscc), by=records.Party("test-setup"))
    db.conn.close()
    answer = app.test_client().get(f"/audit/stats?{query}", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    got, want = answer.get_json(), _stats_json(folder, *argv)
    assert want["savings"]["results"] > 0 and want["by_alliance"] and want["by_issuer"][0].get("name")
    assert got == want
    twice = app.test_client().get("/audit/stats?issuer=12511921MB0001003C&issuer=12511921MB0001003C",
                                  headers={"Authorization": f"Bearer {token}"})
    assert twice.status_code == 400 and "given twice" in twice.get_data(as_text=True)


def test_the_decisions_behind_an_alliance_figure_are_listed(fuling) -> None:
    """Each bar of 互认率 by alliance links to its decisions: as many as the figure counts."""
    app, _, folder = fuling
    c, _ = login(app, "aud")
    figures = _stats_json(folder)
    alliance = next(g for g in figures["by_alliance"] if g["key"] == "川渝")
    assert alliance["eligible"] > 0
    listed = c.get("/console/recognition/decisions?alliance=川渝&outcome=eligible").get_data(as_text=True)
    assert _figures(listed, "decisions-listed")[0]["value"] == str(alliance["eligible"])
    for bad, fragment in (("month=2026-99", "is not a month"), ("rule=nonsense", "unknown rule")):
        answer = c.get(f"/console/recognition/decisions?{bad}")
        assert answer.status_code == 422 and fragment in answer.get_data(as_text=True)
    wrong = c.get("/console/messages?status=bogus")
    assert wrong.status_code == 422 and "is not one of" in wrong.get_data(as_text=True)


def test_decisions_are_found_by_their_reports_identifier(fuling) -> None:
    """A decision's AuditEvent names the report by its own identifier system and value (a CT report's 检查报告单号
    too), so that ``entity:identifier=system|value`` finds every decision on it."""
    from urllib.parse import quote

    from gateway.store.db import connect

    app, clock, folder = fuling
    decided = _log(folder, "decision")
    systems = {d["report"]["system"] for d in decided}
    assert all("|" not in d["report"]["value"] for d in decided) and len(systems) >= 1
    db = connect(folder / "gateway.db")
    settings = load_settings(environ={"GATEWAY_CONFIG": str(folder / "gateway.toml")}, overrides={})
    _, token = auth.add_user(db, "aud-api", ["auditor"], at=clock(), gateway=records.Party.member(
        settings.issuer_uscc), by=records.Party("test-setup"))
    db.conn.close()
    for report in {(d["report"]["system"], d["report"]["value"]) for d in decided}:
        want = {d["seq"] for d in decided if (d["report"]["system"], d["report"]["value"]) == report}
        answer = app.test_client().get(
            f"/fhir/AuditEvent?entity:identifier={quote('|'.join(report))}&_count=100",
            headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        found = {int(e["resource"]["id"]) for e in answer.get_json().get("entry", [])}
        assert found & {d["seq"] for d in decided} == want, report


def test_the_audit_page_says_how_many_match_and_pages_to_the_rest(fuling) -> None:
    """The audit page shows one page of entries: it says how many match in all and links to the next page; every
    entry is reached once; a parameter the search does not know is refused as the API refuses it."""
    app, _, folder = fuling
    c, _ = login(app, "aud")
    everything = {e["seq"] for kind in ("decision", "exchange", "ingest", "query", "read") for e in _log(folder, kind)}
    seen: list[int] = []
    url = "/console/audit?_count=7"
    totals = set()
    firsts = set()
    while url:
        page = c.get(url).get_data(as_text=True)
        totals.add(int(re.search(r'data-figure="audit-total" data-value="(\d+)"', page).group(1)))
        seen += [int(n) for n in re.findall(r'href="/console/audit/(\d+)"', page)]
        back = re.search(r'<a rel="first" href="([^"]+)"', page)  # every later page links to the first
        assert (back is None) == (url == "/console/audit?_count=7")
        if back:
            firsts.add(back.group(1).replace("&amp;", "&"))
        following = re.search(r'<a rel="next" href="([^"]+)"', page)
        url = following.group(1).replace("&amp;", "&") if following else ""
    assert firsts == {"/console/audit?_count=7"}
    assert len(totals) == 1 and len(seen) == len(set(seen)) == totals.pop() > 7  # (each page's reads are audited)
    assert everything <= set(seen)
    wrong = c.get("/console/audit?foo=1")
    assert wrong.status_code == 422 and "unknown search parameter" in wrong.get_data(as_text=True)


def test_a_password_reset_ends_the_sessions_opened_with_the_old_one(fuling) -> None:
    """An admin resetting a password (a colleague left, a password leaked) logs out whoever used the old one; a
    user changing their own keeps the session they change it from, and ends the others."""
    from gateway.store.db import connect

    app, clock, folder = fuling
    first, _ = login(app, "aud")
    second, _ = login(app, "aud")
    assert first.get("/console/audit").status_code == 200 and second.get("/console/audit").status_code == 200
    page = first.get("/console/account").get_data(as_text=True)
    changed = first.post("/console/account", data={
        "current_password": PASSWORD, "new_password": "a new password 1", "new_password2": "a new password 1",
        "csrf_token": _csrf(page)})
    assert changed.status_code == 303
    assert "密码已修改" in first.get(changed.headers["Location"]).get_data(as_text=True)
    assert first.get("/console/audit").status_code == 200  # the session it was changed from
    assert second.get("/console/audit", follow_redirects=False).status_code in (302, 303)  # logged out
    db = connect(folder / "gateway.db")
    auth.set_password(db, "aud", "set by the admin 2", at=clock(), gateway=records.Party.member("12500102MB0002006J"),
                      by=records.Party("admin"))
    db.conn.close()
    assert first.get("/console/audit", follow_redirects=False).status_code in (302, 303)
    assert [e["reason"] for e in _log(folder, "login") if e.get("action") == "logout"][-2:] == [
        "password set", "password set"]


def test_guessing_the_current_password_from_an_open_session_locks_the_account(fuling) -> None:
    """The account page asks for the current password: wrong ones count as failed log-ins (audited), and the
    lock-out after five ends every session of the account, the one guessing included."""
    app, _, folder = fuling
    c, _ = login(app, "aud")
    for n in range(auth.LOCKOUT_FAILURES):
        page = c.get("/console/account")
        assert page.status_code == 200, n
        wrong = c.post("/console/account", data={"current_password": f"guess {n}", "new_password": "x" * 12,
                                                 "new_password2": "x" * 12, "csrf_token": _csrf(page.get_data(
                                                     as_text=True))})
        assert wrong.status_code == 400
    assert "账户已锁定" in wrong.get_data(as_text=True)
    assert c.get("/console/account", follow_redirects=False).status_code in (302, 303)  # logged out
    assert login(app, "aud")[1].status_code == 403  # locked, even with the right password
    failed = [e for e in _log(folder, "login") if e.get("action") == "login"][-auth.LOCKOUT_FAILURES - 1:]
    assert [e["reason"] for e in failed] == ["current password"] * (auth.LOCKOUT_FAILURES - 1) + [
        "locked out", "locked"]


def test_the_patient_box_of_the_audit_page_takes_the_id_card(fuling) -> None:
    """An auditor types the 身份证号 (what they have) into the patient box: the entries about that patient are found
    as ``patient:identifier`` finds them (an id alone was read as a Patient/<id> no one knows: 共 0 条)."""
    app, _, folder = fuling
    c, _ = login(app, "aud")

    def total(url: str) -> int:
        page = c.get(url).get_data(as_text=True)
        return int(re.search(r'data-figure="audit-total" data-value="(\d+)"', page).group(1))

    about = {e["seq"] for e in _log(folder, "decision")}
    assert about, "the demo decided results of 王建国 at 涪陵"
    by_box = total("/console/audit?patient=511921196612120011&type=&_count=7")
    assert by_box >= len(about)
    assert by_box == total("/console/audit?patient:identifier=511921196612120011&_count=7")
    assert total("/console/audit?patient=urn:oid:2.16.156.10011.1.3|511921196612120011") == by_box
    assert total("/console/audit?patient=110105194912310021") == 0
    assert total("/console/audit?patient=Patient/nobody-here") == 0
    page = c.get("/console/audit").get_data(as_text=True)
    assert 'placeholder="身份证号 / Patient/id"' in page
    # the next page keeps the 身份证号 in the box, so a search from it keeps the patient
    first = c.get("/console/audit?patient=511921196612120011&_count=3").get_data(as_text=True)
    following = re.search(r'<a rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    later = c.get(following).get_data(as_text=True)
    assert 'name="patient" value="511921196612120011"' in later


def test_a_withdrawn_decision_says_so_first(fuling) -> None:
    app, _, folder = fuling
    withdrawn = {e["decision_id"]: e["seq"] for e in _log(folder, "withdrawal")}
    standing = [e["decision_id"] for e in _log(folder, "decision") if e["decision_id"] not in withdrawn]
    assert withdrawn and standing  # the demo's correction withdrew a decision of 涪陵's
    c, _ = login(app, "aud")
    for decision_id, seq in withdrawn.items():
        page = c.get(f"/console/decisions/{decision_id}").get_data(as_text=True)
        assert _figures(page, "decision-withdrawn") == [{"value": str(seq)}]
        assert "已撤销 Withdrawn" in page and f"AuditEvent/{seq}" in page
    page = c.get(f"/console/decisions/{standing[0]}").get_data(as_text=True)
    assert 'data-figure="decision-outcome"' in page
    assert not _figures(page, "decision-withdrawn") and "已撤销" not in page


def test_the_audit_page_finds_a_user_by_name_and_says_who_did_what(fuling) -> None:
    """The agent box takes a user name (agent=qc-li was refused: "not a reference (Type/id)"), as the patient box
    takes a 身份证号; the list says who asked for each entry."""
    app, _, folder = fuling
    c, _ = login(app, "aud")
    login(app, "adm")
    logins = [e["seq"] for e in _log(folder, "login") if e["user"]["value"] == "adm"]
    page = c.get("/console/audit?agent=adm&type=110114")
    text = page.get_data(as_text=True)
    assert page.status_code == 200, text[:500]
    assert int(re.search(r'data-figure="audit-total" data-value="(\d+)"', text).group(1)) == len(logins) > 0
    assert {int(n) for n in re.findall(r'href="/console/audit/(\d+)"', text)} == set(logins)
    assert '<td class="wrap">adm</td>' in text and 'value="adm"' in text  # who; the box keeps what was typed
    assert c.get("/console/audit?agent=Device/nobody").status_code == 200  # a reference is still one


@pytest.mark.parametrize("path", ["/console/messages?from=2026-13-45",
                                  "/console/messages?from=2026-12-08&to=2026-12-01",
                                  "/console/recognition?from=2026-12&to=2026-01",
                                  "/console/recognition?from=2026-02-30", "/console/recognition?to=12/2026"])
def test_a_date_that_is_none_or_a_period_that_ends_before_it_begins_is_said(fuling, path: str) -> None:
    """They were taken and found nothing, silently (the date box even showed empty): an auditor read "no messages"."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    answer = c.get(path)
    assert answer.status_code in (400, 422), answer.status_code
    text = answer.get_data(as_text=True)
    assert ("不是" in text or "晚于" in text) and "<title>" in text
    # the page leads back to the same search without the date that was wrong (the rest of it kept)
    again = re.search(r'<a href="([^"]+)" data-again>', text)
    assert again and again.group(1).startswith(path.split("?")[0]), text[-800:]
    assert "from=" not in again.group(1) or "to=" not in again.group(1)
    assert c.get(again.group(1).replace("&amp;", "&")).status_code == 200


def test_a_lookup_at_a_member_the_registry_does_not_list_is_one_line(fuling) -> None:
    """`gateway lookup` asked of a code no member has (a typo): one line naming it, exit 1, no traceback; the
    attempt is audited at the member that asked, as failed."""
    _, _, folder = fuling
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), "lookup", "511921196612120011",
                                      "--at", "12345678901234567X"])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: 调阅 at 12345678901234567X: ") and "Traceback" not in result.output
    made = [e for e in _log(folder, "read") if e.get("asked_elsewhere")]
    assert made and made[-1]["outcome"] != "0" and "failed" in made[-1]["query"]


def test_a_decisions_outcome_reads_as_recognition_not_as_a_failure(fuling) -> None:
    """A decision's outcome code 8 is "not recognised" (README, the auditor's workflow), not BALP's "serious
    failure"; other entries keep BALP's words."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    page = c.get("/console/audit?type=lab-recognition&_count=200").get_data(as_text=True)
    rows = page.count("lab-recognition</span>")
    assert rows > 0, page[:2000]
    assert "严重失败" not in page and "轻微失败" not in page
    assert "予以互认 recognized" in page or "不予互认 not recognized" in page
    other = c.get("/console/audit?_count=200").get_data(as_text=True)
    assert "成功 success" in other


def test_a_decision_made_as_of_an_earlier_moment_says_so_and_who_asked(fuling) -> None:
    """``$recognize`` with ``at``: the decision page shows the moment it was decided for beside the time it was
    recorded (a window "valid until" earlier than the recorded time read as a contradiction), and the account that
    asked."""
    from gateway.store.db import connect

    app, clock, folder = fuling
    db = connect(folder / "gateway.db")
    try:
        _, token = auth.add_user(db, "his2", ["submitter"], at=clock(),
                                 gateway=records.Party.member("12500102MB0002006J"), by=records.Party("test-setup"))
    finally:
        db.conn.close()
    bundle = json.loads((Path(__file__).parent / "data" / "registry" / "bundle-lab-tongjiang.json").read_text(
        encoding="utf-8"))
    asked = (clock() - dt.timedelta(hours=2)).isoformat()
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle}, {"name": "receiver", "valueString": "12500102MB0002006J"},
        {"name": "at", "valueDateTime": asked}]}
    answer = app.test_client().post("/fhir/$recognize", json=body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    decision_id = next(p for p in answer.get_json()["parameter"] if p["name"] == "decision")["part"][0]["valueId"]
    c, _ = login(app, "aud")
    page = c.get(f"/console/decisions/{decision_id}").get_data(as_text=True)
    assert 'data-figure="decision-as-of"' in page and "判定时点 decided as of" in page, page[:3000]
    assert "请求者 asked by" in page and "his2" in page


@pytest.mark.parametrize("where", ["/console/%0d%0aX-Injected:1", "/console/\r\nX-Injected: 1", "/console/\\evil",
                                   "//evil.example/console/"])
def test_a_log_in_going_on_to_a_next_with_control_characters_goes_to_the_overview(fuling, where: str) -> None:
    """A crafted link (?next= with a CR/LF) made a real log-in fail with a 500 after the password was taken, and
    the log hold a traceback: the log-in goes on to the overview instead."""
    from urllib.parse import quote, unquote

    app, _, _ = fuling
    c = app.test_client()
    page = c.get("/console/login")
    form = {"username": "aud", "password": PASSWORD, "csrf_token": _csrf(page.get_data(as_text=True)),
            "next": unquote(where)}
    answer = c.post(f"/console/login?next={quote(unquote(where))}", data=form)
    assert answer.status_code in (302, 303), answer.status_code
    assert answer.headers["Location"].endswith("/console/") or answer.headers["Location"].endswith("/console")
    assert "X-Injected" not in answer.headers


def test_a_message_a_process_that_is_gone_left_unfinished_can_be_worked_again_from_its_page(fuling) -> None:
    """A message a crashed process left unfinished (``received``, its lease expired or its process gone) is taken
    by the retry, and the overview's health box tells the admin of it; its page offered 重新处理 to failed messages
    only. It offers it now, but not for a message a live process is working."""
    from gateway.store.store import lease_owner

    app, clock, folder = fuling
    now = clock().timestamp()
    with closing(sqlite3.connect(folder / "gateway.db")) as conn, conn:
        # message 1: its process (on another machine) let its lease run out; message 2: this live process holds it
        conn.execute("UPDATE messages SET status = 'received', lease_owner = 'gone-host:4242', lease_until = ?"
                     " WHERE id = 1", [now - 60])
        conn.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ? WHERE id = 2",
                     [lease_owner(), now + 300])
    a, _ = login(app, "adm")
    left = a.get("/console/messages/1").get_data(as_text=True)
    assert "重新处理" in left and "未处理完" in left
    working = a.get("/console/messages/2").get_data(as_text=True)
    assert "重新处理" not in working and "正在处理" in working
    assert "重新处理" not in login(app, "aud")[0].get("/console/messages/1").get_data(as_text=True)  # admins act
    answer = a.post("/console/messages/1/retry", data={"csrf_token": _csrf(left)})
    assert answer.status_code == 303 and answer.headers["Location"] == "/console/messages/1"
    done = a.get("/console/messages/1").get_data(as_text=True)
    assert _figures(done, "message-status")[0]["value"] not in ("received", "failed") and "重新处理" not in done
    assert [(o["action"], o["target"]) for o in _log(folder, "operator")] == [("message-retried", "messages/1")]


@pytest.mark.parametrize("number", ["99999999999999999999999", "9223372036854775808"])
def test_a_record_number_larger_than_any_is_a_missing_record_not_an_internal_error(fuling, caplog, number: str) -> None:
    """A number too large for the database in a console URL was a 500 (OverflowError: Python int too large to
    convert to SQLite INTEGER) and an ERROR in the log: it is the 404 of a record that does not exist, on every
    console page that takes a number."""
    app, _, _ = fuling
    a, _ = login(app, "adm")
    token = _csrf(a.get("/console/").get_data(as_text=True))
    for method, path in (("GET", f"/console/messages/{number}"), ("GET", f"/console/messages/{number}/raw"),
                         ("POST", f"/console/messages/{number}/retry"), ("POST", f"/console/outbox/{number}/retry"),
                         ("POST", f"/console/outbox/{number}/replay"), ("GET", f"/console/audit/{number}")):
        answer = a.open(path, method=method, data={"csrf_token": token} if method == "POST" else None)
        text = answer.get_data(as_text=True)
        assert answer.status_code == 404 and answer.mimetype == "text/html", (path, answer.status_code)
        assert "返回控制台" in text and "内部错误" not in text, path
        if "/audit/" not in path:
            assert f"没有编号为 {number} 的" in text, path
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []


def test_a_record_that_does_not_exist_is_said_by_its_page(fuling) -> None:
    """A decision or message that does not exist got the 404 of a page the console does not have ("请从菜单进入"):
    the page says which record is missing, as the view does."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    for path, said in (("/console/decisions/xxxx", "没有此判定"), ("/console/messages/999999", "没有编号为 999999 的消息")):
        answer = c.get(path)
        text = answer.get_data(as_text=True)
        assert answer.status_code == 404 and said in text and "请从菜单进入" not in text, path
    assert "请从菜单进入" in c.get("/console/nope").get_data(as_text=True)  # a page the console has not: said so


def test_a_physicians_own_qualification_names_the_physician_on_the_registry_page(fuling) -> None:
    """A physician's own qualification (``physician: {ref: …}``, no member) showed an empty 机构 column and nothing
    saying whose it is: the row names the physician and their 资格证书编号."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    html = c.get("/console/registry").get_data(as_text=True)
    row = next(r for r in html.split("<tr") if 'data-status="phy-bing-diagnosis"' in r)
    holder = re.sub(r"<[^>]+>", "", row.split("</td>")[0])
    assert "演示诊断医师丙" in holder and "DEMO-ZYBZD-2020-0031" in holder, holder
    row = next(r for r in html.split("<tr") if 'data-status="cdc-physician-1"' in r)  # a member's physician
    assert "演示主检医师甲" in row.split("</td>")[0]


def test_the_issuer_box_of_the_recognition_page_takes_a_members_name(fuling) -> None:
    """The tables show issuers by name, yet the 发证机构 box took only the 统一社会信用代码: a name gave all zeros,
    silently. A name (in full, or a part only one member's name has) selects that member; one that names no member,
    or several, is said."""
    app, _, _ = fuling
    c, _ = login(app, "aud")
    by_code = c.get(f"/console/recognition?issuer={TONGJIANG_USCC}").get_data(as_text=True)
    want = [f for f in _figures(by_code, "eligible") if f.get("dimension") == "total"]
    assert want and want[0]["value"] != "0"
    for name in ("通江县人民医院（演示）", "通江县人民医院"):
        html = c.get(f"/console/recognition?issuer={name}").get_data(as_text=True)
        assert [f for f in _figures(html, "eligible") if f.get("dimension") == "total"] == want, name
        assert f"gateway audit stats --issuer {TONGJIANG_USCC}" in html and f'value="{name}"' in html
        listed = c.get(f"/console/recognition/decisions?issuer={name}&outcome=eligible").get_data(as_text=True)
        assert _figures(listed, "decisions-listed")[0]["value"] == want[0]["value"]
    for name, said in (("没有这家医院", "nor the name of a member"), ("医院", "names of")):
        answer = c.get(f"/console/recognition?issuer={name}")
        assert answer.status_code == 422 and said in answer.get_data(as_text=True), name
    # a code no decision has (a former member's, a typo): the page says nothing was found, and how to choose
    nothing = c.get("/console/recognition?issuer=12345678901234567X").get_data(as_text=True)
    assert "data-none-found" in nothing and "统一社会信用代码" in nothing
