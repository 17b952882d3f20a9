"""The console in a real browser: Debian's Chromium, driven by Playwright, against real `gateway serve`s.

`gateway demo --dir` leaves the 涪陵 and 通江 member gateways with their story (decisions, a refusal, an override,
delivered Bundles); here they run as an operator runs them (`gateway --config …/gateway.toml serve`, on free
loopback ports), with accounts made by `gateway users add`. An auditor answers the questions the console is for
(互认率 of the month by issuer, why each refusal was refused) and the figures the browser shows are compared with
`gateway audit stats --json`, to the unit; an admin retries a dead delivery; the log-in refuses a submitter, a
form without its CSRF token, and a locked account. No request leaves the gateway. Screenshots of every page are
kept in GATEWAY_SCREENSHOTS (default: the test's temporary folder); see tests/browser.py for the browser.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import re
import shlex
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

import browser
from gateway.cli import cli
from gateway.demo import DEMO_START, free_port, run_demo
from gateway.demo.world import SERVE_PORTS

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
TONGJIANG = "12511921MB0001003C"
FULING = "12500102MB0002006J"
#: The month of the demo's story: "last month" for the auditor of these tests.
MONTH = DEMO_START.strftime("%Y-%m")
#: Figures of a recognition table row, and the `audit stats --json` field each one is.
FIELDS = {"decisions": "decisions", "recognized": "recognized", "not-recognized": "not_recognized",
          "needs-review": "needs_review", "overridden": "overridden", "eligible": "eligible",
          "accepted": "accepted", "recognition-rate": "rate"}


def _cli(folder: Path, *args: str) -> str:
    """A `gateway --config <folder>/gateway.toml …` command, run in this process (fast), as an operator types it."""
    result = CliRunner().invoke(cli, ["--config", str(folder / "gateway.toml"), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class World:
    """The two served gateways and what the tests need to know about them."""

    fuling: browser.Served
    tongjiang: browser.Served
    fuling_dir: Path
    tongjiang_dir: Path
    dead: int  # the outbox row of 通江 that is dead


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    sync_playwright = browser.require_browser()  # before the gateways are built: a skip costs nothing
    with sync_playwright() as playwright:
        chrome = browser.launch(playwright)
        yield chrome
        chrome.close()


@pytest.fixture(scope="module")
def world(chromium: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("console-browser")
    levels = {name: logging.getLogger(name).level for name in ("gateway", "werkzeug")}
    with pytest.MonkeyPatch.context() as mp:  # the folders the demo leaves name free ports (and no MLLP)
        for key in list(SERVE_PORTS):
            mp.setitem(SERVE_PORTS, key, (free_port(), 0))
        ports = dict(SERVE_PORTS)
        run_demo(str(base / "demo"), echo=lambda _line: None)
    for name, level in levels.items():  # the demo quiets these for its story; other tests log on
        logging.getLogger(name).setLevel(level)
    fl, tj = base / "demo" / "fuling", base / "demo" / "tongjiang"

    # Accounts, as an operator makes them.
    secret = base / "console-password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    for name, role in (("qc", "auditor"), ("it", "admin"), ("locked", "auditor")):
        said = _cli(fl, "users", "add", name, "--role", role, "--password-file", str(secret))
        assert "console password set" in said
    _cli(tj, "users", "add", "it", "--role", "admin", "--password-file", str(secret))
    # the token is the line the command prints it on (the captured output may hold other lines: log lines of the
    # test process's other threads land there too while the command runs)
    said = _cli(fl, "users", "add", "lis", "--role", "submitter").splitlines()
    lis_token = said[said.index(next(line for line in said if line.startswith("API token (shown only now"))) + 1]
    assert re.fullmatch(r"cyhr_[A-Za-z0-9_-]+", lis_token), said
    _with_password(fl, "lis-old", "submitter")

    # A dead delivery at 通江: a report signed now, sent to 涪陵 while 涪陵 is down, its last attempt failed.
    bundle_id = _signed_report(tj)
    found = re.search(r"queued as outbox #(\d+)", _cli(tj, "send", bundle_id, "--to", FULING))
    assert found
    dead = int(found.group(1))
    with closing(sqlite3.connect(tj / "gateway.db")) as conn, conn:  # the eleven attempts before (of 12)
        conn.execute("UPDATE outbox SET attempts = 11 WHERE id = ?", [dead])
    assert "1 dead" in _cli(tj, "outbox", "deliver")

    env = {"GATEWAY_WORKERS": "1", "GATEWAY_DELIVERY_INTERVAL": "1", "GATEWAY_LOG_LEVEL": "INFO"}
    served = (browser.Served(fl / "gateway.toml", f"http://127.0.0.1:{ports['fuling'][0]}", base / "fuling.log", env),
              browser.Served(tj / "gateway.toml", f"http://127.0.0.1:{ports['tongjiang'][0]}", base / "tongjiang.log",
                             env))
    with browser.serving(*served):
        # Today's traffic, so the overview has something in its last 24 hours: 涪陵's LIS sends its results.
        from gateway.adapters.hl7v2 import split_messages

        sample = resources.files("gateway.demo").joinpath("data", "hl7v2", "fuling-central-lis.hl7").read_bytes()
        for raw in split_messages(sample):
            raw = _anew(raw)
            answer = requests.post(f"{served[0].url}/ingest/hl7v2", data=raw, timeout=30,
                                   headers={"Authorization": f"Bearer {lis_token}"})
            assert answer.status_code < 500 and b"MSA|" in answer.content, answer.status_code  # stored or refused
        yield World(served[0], served[1], fl, tj, dead)


def _anew(message: bytes) -> bytes:
    """A demo message sent again by its LIS, under a new control id (MSH-10), so it is not a duplicate."""
    segments = message.split(b"\r")
    fields = segments[0].split(b"|")
    fields[9] += b"-B"
    return b"\r".join([b"|".join(fields), *segments[1:]])


def _signed_report(folder: Path) -> str:
    """通江's LIS sends a result now (the demo's first message, sent again under a number of its own): the id of its
    signed Bundle.

    (The demo's own Bundles were signed with the story's keys, which the registry snapshot in force no longer
    lists: a receiver refuses them, as it should.)
    """
    from gateway.adapters.hl7v2 import split_messages
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    sample = resources.files("gateway.demo").joinpath("data", "hl7v2", "tongjiang-county-lis.hl7").read_bytes()
    message = _anew(split_messages(sample)[0])
    # under a report number of its own: the demo corrected the first report, and a version a correction
    # supersedes is not sent to a member
    number = re.search(rb"\rOBR\|[^|\r]*\|[^|\r]*\|([^|\r]+)\|", message)
    assert number, message[:200]
    message = message.replace(b"|" + number.group(1) + b"|", b"|" + number.group(1) + b"B|")
    pipeline = Pipeline(load_settings(environ={"GATEWAY_CONFIG": str(folder / "gateway.toml")}, overrides={}))
    try:
        outcome, = pipeline.ingest(message, "hl7v2", channel="http")
    finally:
        pipeline.close()
    assert outcome.bundle is not None and outcome.signed, outcome.issues
    return str(outcome.bundle["id"])


def _with_password(folder: Path, name: str, role: str) -> None:
    """An account of a role that may not use the console, yet with a password (say, from an older release)."""
    from gateway import auth
    from gateway.audit import records
    from gateway.config import load_settings
    from gateway.store.db import connect

    settings = load_settings(environ={"GATEWAY_CONFIG": str(folder / "gateway.toml")}, overrides={})
    db = connect(settings.database_locator)
    try:
        now, me = dt.datetime.now(DEMO_START.tzinfo), records.Party.member(settings.issuer_uscc)
        auth.add_user(db, name, [role], at=now, gateway=me, by=records.Party("test-setup"))
        auth.set_password(db, name, PASSWORD, at=now, gateway=me, by=records.Party("test-setup"))
    finally:
        db.conn.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are kept: GATEWAY_SCREENSHOTS, else the test run's temporary folder."""
    chosen = os.environ.get("GATEWAY_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


Opener = Callable[[], tuple[Any, browser.Recorder]]


@pytest.fixture
def open_page(chromium: Any) -> Iterator[Opener]:
    """A new browser window of its own (cookies and all), 1366×768, Chinese; every request it makes is recorded
    and must have gone to the gateways on loopback."""
    made: list[tuple[Any, browser.Recorder]] = []

    def open_() -> tuple[Any, browser.Recorder]:
        context = chromium.new_context(viewport=browser.VIEWPORT, locale="zh-CN", accept_downloads=True)
        context.set_default_timeout(15_000)
        page = context.new_page()
        made.append((context, browser.Recorder(page)))
        return page, made[-1][1]

    yield open_
    for context, _ in made:
        context.close()
    assert [u for _, rec in made for u in rec.elsewhere()] == [], "the console asked for something elsewhere"


def _log_in(page: Any, url: str, name: str) -> None:
    answer = browser.log_in(page, url, name, PASSWORD)
    assert answer.status == 303, page.content()[:500]
    assert page.url == f"{url}/console/", page.url


def _follow(link: Any) -> None:
    """Click a link (or button) that opens another page, and wait for that page."""
    with link.page.expect_navigation():
        link.click()


def _shown_tables(page: Any) -> dict[tuple[str, str], dict[str, str]]:
    """The recognition tables the page shows, keyed like `audit stats --json` (table, key): field -> value."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for f in browser.figures(page):
        if f["figure"] not in FIELDS:
            continue
        if f.get("dimension") == "total":
            table, key = "total", "all"
        else:
            table = f["table"]
            key = "|".join(f[d] for d in table[3:].split("_"))
        field = FIELDS[f["figure"]]
        out.setdefault((table, key), {})[field] = f["value"]
        if field == "rate":  # the text a person reads says the same as the value
            assert f["text"] == ("—" if f["value"] == "" else f"{float(f['value']):.1%}"), f
    return out


def _cli_tables(figures: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    out = {("total", "all"): {k: cell(figures["total"][k]) for k in FIELDS.values()}}
    for table, groups in figures.items():
        if table.startswith("by_"):
            for g in groups:
                out[(table, g["key"])] = {k: cell(g[k]) for k in FIELDS.values()}
    return out


def _ranked(page: Any) -> tuple[dict[str, str], dict[str, str]]:
    return ({f["rule"]: f["value"] for f in browser.figures(page, "refusals")},
            {f["reason"]: f["value"] for f in browser.figures(page, "overrides")})


def _show(page: Any, **fields: str) -> None:
    """Fill in the recognition page's selection form and send it."""
    for name in ("from", "to", "issuer", "receiver", "item", "catalogue"):
        page.fill(f"form.filters input[name={name}]", fields.get(name, ""))
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")


def test_auditor_sees_the_months_recognition_as_the_cli_computes_it(
        world: World, open_page: Opener, shots: Path) -> None:
    page, _ = open_page()
    _log_in(page, world.fuling.url, "qc")
    _follow(page.locator("header nav >> text=互认 Recognition"))
    _show(page, **{"from": MONTH, "to": MONTH})
    page.screenshot(path=shots / "console-recognition.png")

    # The page names its command; run that very command and compare every figure.
    command = page.inner_text("p.muted code")
    assert command == f"gateway audit stats --date ge{MONTH} --date le{MONTH}"
    argv = shlex.split(command)[1:] + ["--json", "--by", "month,issuer", "--by", "month,item"]
    done = subprocess.run([*browser.gateway_cli(), "--config", str(world.fuling_dir / "gateway.toml"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    want = json.loads(done.stdout)
    shown = _shown_tables(page)
    assert shown == _cli_tables(want)
    assert {t for t, _ in shown} == {"total", *(t for t in want if t.startswith("by_"))}
    assert _ranked(page) == ({r["rule"]: str(r["count"]) for r in want["refusals"]["by_rule"]},
                             {r["reason"]: str(r["count"]) for r in want["overrides"]["by_reason"]})
    assert want["total"]["eligible"] > 0 and want["refusals"]["results"] > 0, "the story has figures to compare"
    # by issuer, with the issuers' names (not blanks)
    rows = page.locator("table[data-table=by_issuer] tr").all_inner_texts()
    for g in want["by_issuer"]:
        assert any(g["key"] in r and g["name"] in r for r in rows), (g, rows)

    # Another selection, chosen in the form: one issuer over all time.
    _show(page, issuer=TONGJIANG)
    assert page.inner_text("p.muted code") == f"gateway audit stats --issuer {TONGJIANG}"
    want = json.loads(_cli(world.fuling_dir, "audit", "stats", "--issuer", TONGJIANG, "--json", "--by", "month,issuer",
                           "--by", "month,item"))
    assert _shown_tables(page) == _cli_tables(want)
    assert {t for t, _ in _shown_tables(page)} == {"total", *(t for t in want if t.startswith("by_"))}


def test_auditor_drills_down_from_a_figure_to_a_decision_and_its_audit_event(
        world: World, open_page: Opener, shots: Path) -> None:
    page, _ = open_page()
    _log_in(page, world.fuling.url, "qc")
    page.goto(f"{world.fuling.url}/console/recognition?from={MONTH}&to={MONTH}")
    refusals = page.inner_text("h2:has-text('Refusals by failing rule')")
    results = re.search(r"（(\d+) 项结果）", refusals)
    assert results

    # An issuer's eligible count: the decisions behind it are as many.
    eligible = [f for f in browser.figures(page, "eligible") if f.get("table") == "by_issuer"
                and f["issuer"] == TONGJIANG][0]
    _follow(page.locator(f"table[data-table=by_issuer] [data-figure=eligible][data-issuer='{TONGJIANG}']"))
    assert browser.figures(page, "decisions-listed")[0]["value"] == eligible["value"]
    assert page.locator("tr[data-decision]").count() == int(eligible["value"])
    page.go_back()

    # Why was each refusal refused: the failing rule, then the decisions it refused.
    eqa = [f for f in browser.figures(page, "refusals") if f.get("rule") == "eqa-pass"][0]["value"]
    assert 0 < int(eqa) <= int(results.group(1))
    _follow(page.locator("[data-figure=refusals][data-rule='eqa-pass']"))
    assert browser.figures(page, "decisions-listed")[0]["value"] == eqa
    rows = page.locator("tr[data-decision]")
    assert rows.count() == int(eqa)
    assert "eqa-pass" in rows.first.inner_text() and "not-recognized" in rows.first.inner_text()
    page.screenshot(path=shots / "console-decisions.png")
    decision_id = rows.first.get_attribute("data-decision")
    _follow(rows.first.locator("td").first.locator("a"))
    assert page.url.endswith(f"/console/decisions/{decision_id}")
    page.screenshot(path=shots / "console-decision.png")

    # The decision as the page shows it is the decision as the CLI prints it.
    stored = json.loads(_cli(world.fuling_dir, "decisions", "show", decision_id))
    assert browser.figures(page, "decision-outcome")[-1]["value"] == stored["outcome"] == "not-recognized"
    assert browser.figures(page, "snapshot-version")[-1]["value"] == str(stored["snapshot"]["version"])
    said = {"passed": "通过", "failed": "未通过"}
    for rule in stored["rules"]:
        cells = page.locator(f"tr[data-rule='{rule['rule']}']").last.inner_text()
        assert cells.split("\t")[1].startswith(said.get(rule["status"], "无法判断")), (rule, cells)

    # And from the decision to its AuditEvent, in the tamper-evident log.
    link = page.locator("a:has-text('AuditEvent/')").last
    seq = link.inner_text().split("/")[1]
    _follow(link)
    assert page.inner_text("h1") == f"AuditEvent/{seq}"
    event = json.loads(page.inner_text("main pre"))
    assert event["id"] == seq and decision_id in json.dumps(event)
    page.screenshot(path=shots / "console-audit-event.png")


def test_csv_export_is_the_page_table(world: World, open_page: Opener, tmp_path: Path) -> None:
    page, _ = open_page()
    _log_in(page, world.fuling.url, "qc")
    page.goto(f"{world.fuling.url}/console/recognition?from={MONTH}&to={MONTH}")
    with page.expect_download() as download:
        page.click("a:has-text('导出 CSV')")
    assert download.value.suggested_filename == "recognition.csv"
    saved = tmp_path / "recognition.csv"
    download.value.save_as(saved)
    raw = saved.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), "a BOM, so Excel shows the Chinese"
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    ranked = ("refusals_by_rule", "overrides_by_reason", "savings_yuan_by_item", "hr_items_by_issuer")
    exported = {(r["table"], r["key"]): {k: r[k] for k in FIELDS.values()} for r in rows if r["table"] not in ranked}
    assert exported == _shown_tables(page)
    # savings per item and province, and HR items per institution, as the page shows them
    savings = {(f["item"], f["province"]): f.get("value", f["text"]) for f in browser.figures(page, "savings-yuan")}
    assert savings and savings == {tuple(r["key"].split("|")): f"{float(r['count']):.2f}" for r in rows
                                   if r["table"] == "savings_yuan_by_item"}
    want = json.loads(_cli(world.fuling_dir, "audit", "stats", "--date", f"ge{MONTH}", "--date", f"le{MONTH}",
                           "--json"))["hr_items"]["by_issuer"]
    assert want and {f["issuer"]: int(f.get("value", f["text"])) for f in browser.figures(page, "hr-results")} == {
        g["key"]: g["results"] for g in want}  # a result carrying two marks is one result
    assert {r["key"]: int(r["count"]) for r in rows if r["table"] == "hr_items_by_issuer"} == {
        f"{g['key']}|{mark}": n for g in want for mark, n in g["by_mark"].items()}
    assert ({r["key"]: r["count"] for r in rows if r["table"] == "refusals_by_rule"},
            {r["key"]: r["count"] for r in rows if r["table"] == "overrides_by_reason"}) == _ranked(page)
    names = {(r["table"], r["key"]): r["name"] for r in rows}
    assert names[("by_issuer", TONGJIANG)] == "通江县人民医院（演示）"


def test_admin_retries_a_dead_delivery_and_sees_it_delivered(world: World, open_page: Opener, shots: Path) -> None:
    page, _ = open_page()
    url = world.tongjiang.url
    _log_in(page, url, "it")
    dead = [f for f in browser.figures(page, "deliveries") if f["state"] == "dead"]
    assert [f["value"] for f in dead] == ["1"]
    assert browser.figures(page, "health")[0]["value"] == "failing", "IT sees on the overview that one is stuck"
    assert [f["check"] for f in browser.figures(page, "health-check") if f["value"] != "ok"] == ["dead_letters"]
    _follow(page.locator("[data-figure=deliveries][data-state=dead]"))  # the overview's figure leads to it
    row = page.locator(f"tr[data-outbox='{world.dead}']")
    assert row.get_attribute("data-state") == "dead"
    assert "gave up after the last attempt" in row.inner_text()
    page.screenshot(path=shots / "console-exchange-dead.png")
    with page.expect_navigation():
        row.locator("button:has-text('重试 Retry')").click()
    deadline = time.monotonic() + 30
    while page.locator(f"tr[data-outbox='{world.dead}']").get_attribute("data-state") != "delivered":
        assert time.monotonic() < deadline, page.locator(f"tr[data-outbox='{world.dead}']").inner_text()
        time.sleep(0.5)
        page.reload()
    row = page.locator(f"tr[data-outbox='{world.dead}']")
    assert "已签收 signed" in row.inner_text(), "the receiver's signed receipt is kept"
    page.screenshot(path=shots / "console-exchange.png")
    assert "delivered" in _cli(world.tongjiang_dir, "outbox", "show", str(world.dead))
    _follow(page.locator("header nav >> text=概览 Overview"))
    states = {f["state"]: f["value"] for f in browser.figures(page, "deliveries")}
    assert "dead" not in states and int(states["delivered"]) >= 1, states
    assert browser.figures(page, "health")[0]["value"] == "ok"


def test_a_submitter_cannot_log_in(world: World, open_page: Opener, shots: Path) -> None:
    page, _ = open_page()
    answer = browser.log_in(page, world.fuling.url, "lis", PASSWORD)  # made by `users add`: no password at all
    assert answer.status == 401
    assert "用户名或密码错误" in page.inner_text("[role=alert]")
    answer = browser.log_in(page, world.fuling.url, "lis-old", PASSWORD)  # a submitter that has a password
    assert answer.status == 403
    assert "不能登录控制台" in page.inner_text("[role=alert]")
    page.screenshot(path=shots / "console-login-submitter.png")
    assert "gateway_console" not in {c["name"] for c in page.context.cookies()}
    page.goto(f"{world.fuling.url}/console/")
    assert "/console/login" in page.url


def test_a_form_without_its_csrf_token_is_refused(world: World, open_page: Opener) -> None:
    page, _ = open_page()
    # the log-in form, its token taken out before sending
    page.goto(f"{world.fuling.url}/console/login")
    page.evaluate("document.querySelector('main input[name=csrf_token]').remove()")
    page.fill("input[name=username]", "qc")
    page.fill("input[name=password]", PASSWORD)
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("main button[type=submit]")
    assert answer.value.status == 400 and "CSRF" in page.inner_text("h1")
    assert "gateway_console" not in {c["name"] for c in page.context.cookies()}

    # logged in, the password form without its token: refused, the password unchanged
    _log_in(page, world.fuling.url, "qc")
    page.goto(f"{world.fuling.url}/console/account")
    page.evaluate("document.querySelector('main input[name=csrf_token]').remove()")
    page.fill("input[name=current_password]", PASSWORD)
    page.fill("input[name=new_password]", "another long password")
    page.fill("input[name=new_password2]", "another long password")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("main button[type=submit]")
    assert answer.value.status == 400 and "CSRF" in page.inner_text("h1")
    # a post from elsewhere (no token at all, the session cookie sent): refused, and still logged in
    assert page.request.post(f"{world.fuling.url}/console/logout", max_redirects=0).status == 400
    page.goto(f"{world.fuling.url}/console/")
    assert page.url == f"{world.fuling.url}/console/"
    other, _ = open_page()
    _log_in(other, world.fuling.url, "qc")  # the old password still works


def test_repeated_failures_lock_the_account(world: World, open_page: Opener, shots: Path) -> None:
    page, _ = open_page()
    for _ in range(4):
        assert browser.log_in(page, world.fuling.url, "locked", "not the password").status == 401
        assert "用户名或密码错误" in page.inner_text("[role=alert]")
    assert browser.log_in(page, world.fuling.url, "locked", "not the password").status == 403
    assert "锁定" in page.inner_text("[role=alert]")
    answer = browser.log_in(page, world.fuling.url, "locked", PASSWORD)  # the right password, too late
    assert answer.status == 403 and "账户已锁定" in page.inner_text("[role=alert]")
    page.screenshot(path=shots / "console-login-locked.png")
    page.goto(f"{world.fuling.url}/console/")
    assert "/console/login" in page.url


def test_every_page_works_offline(world: World, open_page: Opener, shots: Path) -> None:
    """Every page, as an auditor sees it: answered, styled, nothing fetched from elsewhere, no script or CSP error."""
    page, recorder = open_page()
    _log_in(page, world.fuling.url, "qc")
    base = world.fuling.url
    for name, path in (("overview", "/console/"), ("messages", "/console/messages"),
                       ("exchange-received", "/console/exchange"), ("recognition-all", "/console/recognition"),
                       ("audit", "/console/audit"), ("registry", "/console/registry"), ("account", "/console/account")):
        answer = page.goto(base + path)
        assert answer.status == 200, path
        assert page.locator("header nav a").count() == 6
        assert page.evaluate("getComputedStyle(document.querySelector('header')).display") != "", path
        page.screenshot(path=shots / f"console-{name}.png")
    # the overview has today's messages and the figures lead to them
    page.goto(base + "/console/")
    stored = [f for f in browser.figures(page, "messages") if f["outcome"] == "stored" and f["value"] != "0"]
    assert stored
    _follow(page.locator(f"[data-figure=messages][data-outcome=stored][data-channel='{stored[0]['channel']}']"))
    assert browser.figures(page, "messages-found")[0]["value"] == stored[0]["value"]
    # the messages page: a search by status, a message's stages, issues and answer
    page.goto(base + "/console/messages")
    page.select_option("form.filters select[name=status]", "refused")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    listed = page.locator("main table tr td:nth-child(7)").all_inner_texts()
    assert listed and set(listed) == {"refused"}
    _follow(page.locator("main table tr td a").first)
    assert browser.figures(page, "message-status")[0]["value"] == "refused"
    issues = page.locator("main h2:has-text('Issues') + table tr").all_inner_texts()
    assert any(row.startswith("error\t") and row.split("\t")[2] for row in issues[1:]), issues  # why, and where
    page.screenshot(path=shots / "console-message.png")
    # the chain verification, run from the audit page
    page.goto(base + "/console/audit")
    with page.expect_navigation():
        page.click("button:has-text('校验哈希链')")
    assert browser.figures(page, "audit-verify")[0]["value"] == "ok"
    page.screenshot(path=shots / "console-audit-verify.png")

    css = [u for u in recorder.urls if u.endswith("/console/static/console.css")]
    assert css, "the stylesheet comes from the gateway"
    assert recorder.elsewhere() == []
    assert recorder.errors == [], recorder.errors


def test_every_page_fits_a_phone_and_a_long_value_wraps(world: World, chromium: Any, shots: Path) -> None:
    """At 390 px (a phone) no page is wider than the screen (a wide table scrolls inside its own box), and at
    1366 px a message whose sender and control id are 180 characters without a space does not widen the page."""
    base = world.fuling.url
    from gateway.adapters.hl7v2 import split_messages

    long_sender, long_id = "L" * 180, "C" * 180
    sample = resources.files("gateway.demo").joinpath("data", "hl7v2", "fuling-central-lis.hl7").read_bytes()
    segments = split_messages(sample)[0].split(b"\r")
    fields = segments[0].split(b"|")
    fields[2], fields[9] = long_sender.encode(), long_id.encode()
    message = b"\r".join([b"|".join(fields), *segments[1:]])
    said = _cli(world.fuling_dir, "users", "add", "lis-long", "--role", "submitter").splitlines()
    token = said[said.index(next(line for line in said if line.startswith("API token (shown only now"))) + 1]
    context = chromium.new_context(viewport={"width": 390, "height": 844}, locale="zh-CN", is_mobile=True)
    try:
        page = context.new_page()
        _log_in(page, base, "qc")
        paths = {"overview": "/console/", "messages": "/console/messages", "exchange": "/console/exchange",
                 "recognition": "/console/recognition", "audit": "/console/audit", "registry": "/console/registry",
                 "account": "/console/account"}
        decision = page.goto(base + "/console/recognition") and page.locator("a[href*='/console/decisions/']")
        if decision.count():
            paths["decisions"] = decision.first.get_attribute("href")
        for name, path in paths.items():
            assert page.goto(base + path).status == 200, path
            wide = page.evaluate("document.documentElement.scrollWidth")
            page.screenshot(path=shots / f"phone-{name}.png", full_page=True)
            assert wide <= 390, (path, wide)
    finally:
        context.close()
    sent = requests.post(base + "/ingest/hl7v2", data=message, timeout=30, headers={"Authorization": f"Bearer {token}"})
    assert sent.status_code < 500, sent.text
    context = chromium.new_context(viewport=browser.VIEWPORT, locale="zh-CN")
    try:
        page = context.new_page()
        _log_in(page, base, "qc")
        page.goto(base + "/console/messages")
        assert long_id in page.content()
        assert page.evaluate("document.documentElement.scrollWidth") <= browser.VIEWPORT["width"]
        _follow(page.locator("main table tr td a").first)
        page.screenshot(path=shots / "console-message-long-values.png")
        assert long_id in page.content()
        assert page.evaluate("document.documentElement.scrollWidth") <= browser.VIEWPORT["width"]
    finally:
        context.close()


#: How many lines each cell of the rows of a table takes (the distinct tops of the boxes of its text).
LINES_JS = """rows => rows.map(tr => [...tr.children].map(td => {
    const range = document.createRange(); range.selectNodeContents(td);
    return new Set([...range.getClientRects()].map(box => Math.round(box.top))).size; }))"""


def test_one_very_long_control_id_leaves_the_other_columns_readable(
        world: World, open_page: Opener, shots: Path) -> None:
    """A message whose control id (MSH-10) is 400 characters, listed even when refused, took the width of the
    Messages list and of the overview's 最新错误 at 1366×768: every row's record number, channel and status wrapped
    letter by letter. The long id wraps in its own cell; the short cells of every row keep to one line."""
    base = world.fuling.url
    from gateway.adapters.hl7v2 import split_messages

    long_id = "LONG" + "9" * 396
    sample = resources.files("gateway.demo").joinpath("data", "hl7v2", "fuling-central-lis.hl7").read_bytes()
    segments = split_messages(sample)[0].split(b"\r")
    fields = segments[0].split(b"|")
    fields[9] = long_id.encode()
    said = _cli(world.fuling_dir, "users", "add", "lis-long-id", "--role", "submitter").splitlines()
    token = said[said.index(next(line for line in said if line.startswith("API token (shown only now"))) + 1]
    sent = requests.post(base + "/ingest/hl7v2", data=b"\r".join([b"|".join(fields), *segments[1:]]), timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
    assert sent.status_code < 500, sent.text
    page, _ = open_page()
    _log_in(page, base, "qc")
    page.goto(base + "/console/messages")
    assert long_id in page.content()
    page.screenshot(path=shots / "console-messages-long-id.png")
    # #, channel, format, status, answer: one line in every row
    lines = page.locator("main table.wide tr:has(td a)").evaluate_all(LINES_JS)
    assert len(lines) > 1 and {row[i] for row in lines for i in (0, 2, 3, 6, 7)} == {1}, lines
    assert page.evaluate("document.documentElement.scrollWidth") <= browser.VIEWPORT["width"]
    page.goto(base + "/console/")
    errors = page.locator("main h2:has-text('Latest errors') + table tr:has(td a)")
    assert any(long_id in row for row in errors.all_inner_texts())  # refused: among the latest errors
    page.screenshot(path=shots / "console-overview-long-id.png", full_page=True)
    lines = errors.evaluate_all(LINES_JS)
    assert len(lines) > 1 and {row[i] for row in lines for i in (0, 2, 5)} == {1}, lines  # #, channel, status
    assert page.evaluate("document.documentElement.scrollWidth") <= browser.VIEWPORT["width"]


def test_the_chain_verification_is_not_sent_again_by_back_or_reload(world: World, open_page: Opener) -> None:
    """The verification answered the form itself: Back asked to send it again (Confirm Form Resubmission) and
    Reload verified again. It goes on to its result's page, which Reload shows again without a POST."""
    page, _ = open_page()
    _log_in(page, world.fuling.url, "qc")
    page.goto(world.fuling.url + "/console/audit")
    with page.expect_navigation():
        page.click("button:has-text('校验哈希链')")
    assert page.url == world.fuling.url + "/console/audit/verify"
    shown = browser.figures(page, "audit-verify")[0]
    assert shown["value"] == "ok"
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.reload()
    assert browser.figures(page, "audit-verify")[0] == shown and posts == []
    page.go_back()
    assert page.url == world.fuling.url + "/console/audit" and posts == []


def test_a_lookup_from_the_command_line_is_verified_and_listed_as_made(
        world: World, open_page: Opener, tmp_path: Path) -> None:
    """`gateway lookup` at 涪陵 asks the running 通江 for the demo patient's reports over HTTP: each verified, written
    out, and the lookup shown on 涪陵's exchange page under the lookups made (it was always empty: nobody recorded a
    调阅 on the asking side)."""
    # (the demo's own Bundles were signed with the story's keys, which the snapshot in force no longer lists: each is
    # refused and not used, exit 1 — as a report would be whose signing certificate the authority withdrew)
    result = CliRunner().invoke(cli, ["--config", str(world.fuling_dir / "gateway.toml"), "lookup",
                                      "511921196612120011", "--at", TONGJIANG, "--user", "qc",
                                      "--out", str(tmp_path / "got")], catch_exceptions=False)
    said = result.output
    found = re.search(r"(\d+) signed report Bundle\(s\), each verified; (\d+) refused", said)
    assert result.exit_code == 1 and found and int(found.group(2)) >= 1, said
    assert said.count("refused, not to be used: ") == int(found.group(2))
    assert said.count("not issued by a trusted registry authority") == int(found.group(2))
    assert said.count(f"signed by {TONGJIANG}") == int(found.group(1))
    written = sorted((tmp_path / "got").glob("*.json"))  # only what verified is written out
    assert len(written) == int(found.group(1)) and all(json.loads(p.read_bytes())["signature"] for p in written)
    page, _ = open_page()
    _log_in(page, world.fuling.url, "qc")
    page.goto(world.fuling.url + "/console/exchange")
    made = page.locator("main h2:has-text('Lookups made') + table tr").all_inner_texts()
    assert any(TONGJIANG in row or "通江" in row for row in made[1:]), made


def test_gateways_logged_no_stack_trace(world: World) -> None:
    """Whatever the browser did, the gateways wrote no stack trace (and are still running)."""
    for gw in (world.fuling, world.tongjiang):
        assert gw.proc.poll() is None
        assert "Traceback" not in gw.output(), gw.output()[-3000:]
