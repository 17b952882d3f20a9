"""Console views: log-in, overview, messages, exchange, recognition, audit, registry, account.

Sessions live in the database (``gateway.auth.console_*``); every form carries
the session's CSRF token (the log-in form a cookie-bound one) and a POST without
it is refused with a 400 page. Errors are shown as pages in Chinese, never as
a stack trace or raw JSON. Reads of the audit log are themselves audited, as in
the API, and so is every action an admin takes here.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import hmac
import io
import json
import logging
import re
import secrets
import shlex
import unicodedata
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlencode

from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from gateway import auth
from gateway.api.app import borrow_database, public_root
from gateway.audit import checkpoint as checkpoints
from gateway.audit import query, records, stats
from gateway.audit.log import append, get
from gateway.audit.verify import verify as verify_log
from gateway.console import charts
from gateway.errors import DatabaseUnavailable, GatewayError, InputError, NotFound
from gateway.logs import database_fault
from gateway.store.db import Database, fault_reason, transaction
from gateway.store.store import Store, holder_state
from gateway.store.views import MessageFilter, ReadModels

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates", static_folder="static")

COOKIE = "gateway_console"
LOGIN_COOKIE = "gateway_console_login"
_OPEN = ("console.login", "console.static")
_OUTCOMES = ("stored", "filtered", "refused", "failed")
_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _is_day(text: str) -> bool:
    """``text`` is a calendar day written YYYY-MM-DD (2026-13-45 has the shape, and found nothing, silently)."""
    try:
        return bool(_DAY.match(text)) and _dt.date.fromisoformat(text) is not None
    except ValueError:
        return False


_PAGE = 50
#: Decisions a page of the decisions behind a figure lists.
_DECISIONS_PAGE = 100
#: The highest page number a list takes (a larger one is its last page): beyond what any database offsets.
_MAX_PAGE = 10_000_000


def _page_asked() -> int:
    """The ``page`` a list was asked for: 1 when absent or not a number, at most :data:`_MAX_PAGE`."""
    return min(max(request.args.get("page", 1, type=int) or 1, 1), _MAX_PAGE)


# --------------------------------------------------------------------------- plumbing


def _settings() -> Any:
    return current_app.extensions["gateway.settings"]


def _pipeline() -> Any:
    return current_app.extensions["gateway.pipeline"]


def _now() -> _dt.datetime:
    clock = current_app.extensions.get("gateway.clock")
    if clock is not None:
        return clock()  # type: ignore[no-any-return]
    return _dt.datetime.now(query.parse_offset(_settings().timezone))


@contextmanager
def _db() -> Iterator[Database]:
    """The request's connection to the gateway database, given back after it (:meth:`gateway.member.Member.borrow`)."""
    with borrow_database(current_app) as db:
        yield db


def _gateway() -> records.Party:
    s = _settings()
    return records.Party.member(s.issuer_uscc, s.issuer_name)


def _address() -> str:
    return request.remote_addr or "unknown"


def _secure() -> bool:
    return bool(request.is_secure or str(getattr(_settings(), "public_url", "")).startswith("https://"))


def _page(template: str, status: int = 200, **context: Any) -> Response:
    return Response(render_template(f"console/{template}", **context), status=status, mimetype="text/html")


def _problem(status: int, title: str, detail: str) -> Response:
    return _page("error.html", status, title=title, detail=detail)


#: What a number in a console URL numbers, by the name of its part of the URL: (Chinese, English).
_NUMBERED = {"record_id": ("消息", "message"), "row_id": ("投递", "delivery"), "event_id": ("审计条目", "audit entry")}
#: The largest record number a database keeps (a signed 64-bit integer, in SQLite and PostgreSQL alike).
_MAX_NUMBER = 2**63 - 1


def _missing(part: str, number: int) -> NoReturn:
    """The console's 404 for a record that does not exist, in the view's own words: "没有编号为 N 的消息"."""
    zh, en = _NUMBERED.get(part, ("记录", "record"))
    abort(404, f"没有编号为 {number} 的{zh} (no {en} {number})")


def _numbers_asked() -> None:
    """A number in a console URL larger than any record number (``/console/messages/99999999999999999999999``) is
    a record that does not exist: its 404, before the database is asked (which cannot take the number: a 500)."""
    for part, value in (request.view_args or {}).items():
        if isinstance(value, int) and not 0 <= value <= _MAX_NUMBER:
            _missing(part, value)


@bp.before_request
def _session() -> BaseResponse | None:
    """Find the console session; a visitor without one goes to the log-in page (never a raw 401)."""
    g.console = None
    if request.endpoint in _OPEN:
        return None
    with _db() as db:
        g.console = auth.console_session(db, request.cookies.get(COOKIE, ""), at=_now(), gateway=_gateway(),
                                         address=_address())
    if g.console is None:
        nxt = request.full_path.rstrip("?") if request.method == "GET" else url_for("console.overview")
        return redirect(url_for("console.login", next=nxt), 303)
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        if not sent or not hmac.compare_digest(sent, g.console.csrf):
            return _problem(400, "请求被拒绝 (CSRF)",
                            "表单缺少有效的 CSRF 令牌，请返回页面刷新后重试。(The form was sent without its CSRF token.)")
    _numbers_asked()
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'")
    return response


def _database_away(reason: str) -> Response:
    """503 for a page the database could not serve now: said once per ten seconds in the log, never with the
    database's address on the page."""
    database_fault(log, "console", "database unavailable for console pages: %s", reason)
    response = _problem(503, "数据库暂时无法访问 (database unavailable)", "网关的数据库暂时无法访问，请稍后再试。"
                        "(The gateway's database cannot be reached right now; try again in a moment.)")
    response.headers["Retry-After"] = "5"
    return response


@bp.errorhandler(GatewayError)
def _gateway_error(exc: GatewayError) -> Response:
    if isinstance(exc, DatabaseUnavailable):
        return _database_away(fault_reason(exc) or exc.message)
    status = int(getattr(exc, "http_status", 400) or 400)
    named = [n for n in str(exc.location or "").split("/") if n in request.args]
    again = ""
    if request.method == "GET" and status < 500 and named:  # the same search without what was wrong: fix it there
        kept = [(k, v) for k, v in request.args.items(multi=True) if k not in named and k != "page"]
        again = request.path + ("?" + urlencode(kept) if kept else "")
    return _page("error.html", status, title="无法完成 (could not be done)", detail=exc.message, again=again,
                 dropped=", ".join(named))


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    titles = {403: "没有权限 (forbidden)", 404: "未找到 (not found)", 400: "请求有误 (bad request)",
              405: "不支持此操作 (method not allowed)"}
    detail = exc.description or ""
    if exc.code == 404 and detail == type(exc).description:  # no view said what is missing: no such page
        detail = "控制台没有这个页面，请从菜单进入。(The console has no such page; use the menu.)"
    elif exc.code == 405:
        detail = (f"此页面不接受 {request.method} 请求，请从页面上的链接或按钮进入。"
                  f"(This page does not take {request.method}; use the links and buttons on the pages.)")
    response = _problem(exc.code or 500, titles.get(exc.code or 500, "出错了 (error)"), detail)
    allow = exc.get_headers()
    for name, value in allow:
        if name.lower() == "allow":  # RFC 9110: a 405 says which methods the page takes
            response.headers["Allow"] = value
    return response


def error_page(exc: HTTPException) -> Response:
    """The page of an error under ``/console/`` that no console view saw (no such page, a method no page takes):
    the console's own error page with its headers, not the API's OperationOutcome."""
    return _headers(_http_error(exc))


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    reason = fault_reason(exc)
    if reason is not None:  # the database is away, restarting or locked: a passing state, not the gateway's fault
        return _database_away(reason)
    log.exception("unexpected error on a console page (%s)", type(exc).__name__)
    return _problem(500, "内部错误 (internal error)", "网关处理此页面时出错，已记入日志，请联系信息科。"
                    "(The gateway failed on this page; the error was logged.)")


@bp.app_template_global()
def csrf_token() -> str:
    """The CSRF token forms of this page carry."""
    return cast(str, g.console.csrf if g.get("console") else g.get("login_csrf", ""))


@bp.app_template_global()
def is_admin() -> bool:
    """True when the person logged in is an admin (may act, not only read)."""
    return bool(g.get("console") and "admin" in g.console.principal.roles)


@bp.app_template_filter("when")
def _when(value: Any) -> str:
    """A recorded time as a person reads it: "2026-11-22 11:00:05" (the page keeps the full value in a title)."""
    text = value.isoformat() if isinstance(value, (_dt.datetime, _dt.date)) else str(value or "")
    return text[:19].replace("T", " ") if len(text) >= 19 and text[10:11] == "T" else text


@bp.app_template_filter("pct")
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _admin() -> auth.Principal:
    principal: auth.Principal = g.console.principal
    if "admin" not in principal.roles:
        abort(403, "此操作仅限 admin（管理员）角色。(Only an admin may do this; auditors read.)")
    return principal


def _user_party() -> records.Party:
    return records.Party.user(_settings().issuer_uscc, g.console.principal.name)


def _operator(db: Database, action: Any, target: str, detail: str | None = None) -> None:
    with transaction(db):
        append(db, records.operator_action(at=_now(), gateway=_gateway(), user=_user_party(),
                                           client_address=_address(), action=action, target=target, detail=detail))


def _record_read(db: Database, *, interaction: Literal["search-type", "read", "operation"],
                 results: int | None = None, resource: str | None = None) -> None:
    """A look into the audit log from the console, written to the log (as the API does)."""
    principal = g.console.principal
    record = records.audit_query(
        at=_now(), gateway=_gateway(), server_address=public_root(),
        client=records.Party("", display=(request.user_agent.string[:200] or "browser")),
        client_address=_address(), user=_user_party(), user_roles=sorted(principal.roles),
        query=f"{request.method} {request.full_path.rstrip('?')}", interaction=interaction, results=results,
        resource=resource)
    with transaction(db):
        append(db, record)


# --------------------------------------------------------------------------- log-in, log-out, account


def _safe_next(value: str | None) -> str:
    """Where a log-in goes on: a console page, never another site, nor a value with characters a header cannot
    carry (a CR/LF in ``next`` failed the log-in with a 500 after the password was taken)."""
    if value and value.startswith("/console/") and not value.startswith("//") and value.isprintable() \
            and "\\" not in value:
        return value
    return url_for("console.overview")


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse:
    """The log-in form; a wrong password, a locked account or a system account get a clear message."""
    token = request.cookies.get(LOGIN_COOKIE, "")
    message, status = "", 200
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        if not token or not sent or not hmac.compare_digest(sent, token):
            return _problem(400, "请求被拒绝 (CSRF)", "登录表单已过期或缺少 CSRF 令牌，请刷新登录页后重试。"
                            "(The log-in form was sent without its CSRF token.)")
        with _db() as db:
            try:
                session, cookie = auth.console_login(
                    db, request.form.get("username", "").strip(), request.form.get("password", ""),
                    at=_now(), gateway=_gateway(), address=_address())
            except auth.LoginRefused as exc:
                message, status = exc.message, 401 if exc.reason == "password" else 403
            else:
                response = redirect(_safe_next(request.args.get("next") or request.form.get("next")), 303)
                response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", secure=_secure(),
                                    path="/console/")
                response.delete_cookie(LOGIN_COOKIE, path="/console/")
                return response
    token = secrets.token_urlsafe(32)
    g.login_csrf = token
    response = _page("login.html", status, message=message, next=request.args.get("next", ""),
                     failures=auth.LOCKOUT_FAILURES, minutes=auth.LOCKOUT_MINUTES, idle=auth.IDLE_MINUTES)
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict", secure=_secure(), path="/console/")
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    """End the session (audited) and go back to the log-in page."""
    with _db() as db:
        auth.console_logout(db, request.cookies.get(COOKIE, ""), at=_now(), gateway=_gateway(), address=_address())
    response = redirect(url_for("console.login"), 303)
    response.delete_cookie(COOKIE, path="/console/")
    return response


@bp.route("/account", methods=["GET", "POST"])
def account() -> BaseResponse:
    """Change one's own password. A change made is answered with a redirect to the page saying so, so that
    reloading it asks nothing again (the old password sent again would count as a failed log-in)."""
    message, ok, status = "", False, 200
    if request.method == "GET" and request.args.get("changed") == "1":
        message, ok = "密码已修改 (password changed)", True
    if request.method == "POST":
        new = request.form.get("new_password", "")
        if new != request.form.get("new_password2", ""):
            message, status = "两次输入的新密码不一致 (the new passwords differ)", 400
        else:
            with _db() as db:
                try:
                    auth.change_password(db, g.console.principal.name, request.form.get("current_password", ""),
                                         new, at=_now(), gateway=_gateway(),
                                         session=auth.token_hash(request.cookies.get(COOKIE, "")),
                                         address=_address())
                    return redirect(url_for("console.account", changed=1), 303)
                except GatewayError as exc:
                    message, status = exc.message, 400
    return _page("account.html", status, message=message, ok=ok, minimum=auth.MIN_PASSWORD)


# --------------------------------------------------------------------------- overview


def _health() -> dict[str, Any]:
    """What /health says (the same checks: listener, queue reader, background loop, database, registry)."""
    view = current_app.view_functions.get("health.health")
    if view is None:
        return {"status": "unknown", "checks": {}}
    try:
        answer = view()
        if not isinstance(answer, BaseResponse):
            raise TypeError(f"health answered {type(answer).__name__}, not a response")
        health: dict[str, Any] = json.loads(answer.get_data(as_text=True))
        return health
    except Exception as exc:  # the overview must show, even when a check cannot run
        log.warning("health could not be read for the console (%s)", type(exc).__name__)
        return {"status": "unknown", "checks": {}}


def _buckets(
    db: Database, now: _dt.datetime, hours: bool
) -> tuple[list[str], dict[str, list[int]], dict[tuple[str, str], int]]:
    size, count = (_dt.timedelta(hours=1), 24) if hours else (_dt.timedelta(days=1), 14)
    if hours:
        end = now.replace(minute=0, second=0, microsecond=0) + size
    else:
        end = now.replace(hour=0, minute=0, second=0, microsecond=0) + size
    start = end - size * count
    labels = [(start + size * i).strftime("%H:00" if hours else "%m-%d") for i in range(count)]
    series = {o: [0] * count for o in _OUTCOMES}
    by_channel: dict[tuple[str, str], int] = {}
    for received, channel, status in ReadModels(db).message_times(since=start):
        try:
            at = _dt.datetime.fromisoformat(received)
        except ValueError:
            continue
        if at.tzinfo is None:
            at = at.replace(tzinfo=now.tzinfo)
        if not start <= at < end or status not in series:
            continue
        series[status][int((at - start) / size)] += 1
        by_channel[(channel, status)] = by_channel.get((channel, status), 0) + 1
    return labels, series, by_channel


def _snapshot() -> Any:
    ex = _pipeline().exchange
    holder = getattr(ex, "holder", None) if ex is not None else None
    return holder.current if holder is not None else None


@bp.get("/")
def overview() -> Response:
    """Messages per hour and day by channel and outcome, queue, deliveries, registry, health, latest errors."""
    now = _now()
    with _db() as db:
        hour_labels, hour_series, by_channel = _buckets(db, now, True)
        day_labels, day_series, by_channel_day = _buckets(db, now, False)
        views = ReadModels(db)
        backlog = views.queue_depth()
        deliveries = [dict(zip(("destination", "status", "n"), r)) for r in views.deliveries_by_state()]
        errors = views.latest_errors(10)
    snap = _snapshot()
    days_left = None
    if snap is not None:
        days_left = (snap.valid_until - now).days
    channels = sorted({c for c, _ in by_channel_day})
    return _page(
        "overview.html", hour_chart=charts.stacked(hour_labels, hour_series, "每小时消息 (messages per hour)"),
        day_chart=charts.stacked(day_labels, day_series, "每日消息 (messages per day)"), channels=channels,
        by_channel=by_channel, by_channel_day=by_channel_day, outcomes=_OUTCOMES, backlog=backlog,
        deliveries=deliveries, snapshot=snap, days_left=days_left, health=_health(), errors=errors,
        names=_member_names(),
        day_from=(now - _dt.timedelta(days=13)).date().isoformat(), today=now.date().isoformat(),
        hour_from=(now - _dt.timedelta(hours=23)).date().isoformat())


# --------------------------------------------------------------------------- messages


@bp.get("/messages")
def messages() -> Response:
    """Search received messages by status, channel, sender, date range and control id."""
    page = _page_asked()
    chosen = MessageFilter.of(request.args)
    statuses = ("queued", "received", "duplicate", *_OUTCOMES)
    if chosen.status and chosen.status not in statuses:  # a search that could never find anything: said
        raise InputError(f"status {chosen.status!r} is not one of {', '.join(statuses)} · 没有这个状态", "status")
    for day in (chosen.received_from, chosen.received_to):
        if day and not _is_day(day):
            raise InputError(f"{day!r} is not a date (YYYY-MM-DD) · 不是日期", "from/to")
    if chosen.received_from and chosen.received_to and chosen.received_from > chosen.received_to:
        raise InputError(f"from {chosen.received_from} is after to {chosen.received_to}: nothing could match · "
                         "起始日期晚于截止日期", "from/to")
    with _db() as db:
        views = ReadModels(db)
        total, rows = views.search_messages(chosen, _PAGE, (page - 1) * _PAGE)
        pages = max((total + _PAGE - 1) // _PAGE, 1)
        if page > pages:  # past the end (a link kept from a longer list): its last page
            page = pages
            total, rows = views.search_messages(chosen, _PAGE, (page - 1) * _PAGE)
            pages = max((total + _PAGE - 1) // _PAGE, 1)
        channels = views.message_channels(also=request.args.get("channel", ""))
    args = {k: v for k, v in request.args.items() if k != "page" and v}
    return _page("messages.html", rows=rows, total=total, page=page, pages=pages,
                 args=args, query=urlencode(args), channels=channels,
                 statuses=("queued", "received", *_OUTCOMES))


@bp.get("/messages/<int:record_id>")
def message(record_id: int) -> Response:
    """One message: its stages, every issue and the answer sent."""
    with _db() as db:
        store = Store(db)
        try:
            rec = store.get_message(record_id)
        except NotFound:
            _missing("record_id", record_id)
        stages = store.stages_of(record_id)
        holder = holder_state(rec.lease_owner, rec.lease_until, _pipeline().store.epoch()) \
            if rec.status == "received" else ""
    ack = _text_of(rec.ack).replace("\r", "\n") if rec.ack else ""
    # what the retry takes (Pipeline.retry): a failed message, or one a process that is gone (or whose lease ran
    # out) left unfinished; never one a live process works now, nor one of a format this gateway does not work
    retryable = (rec.status == "failed" or holder in ("gone", "expired")) and rec.format in _pipeline().channels
    return _page("message.html", rec=rec, stages=stages, ack=ack, holder=holder, retryable=retryable)


def _text_of(data: bytes) -> str:
    """Bytes a member system sent or was answered in, as text: UTF-8, else GB18030 (what Chinese LIS and HIS use)."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(data).decode("gb18030", "replace")


@bp.get("/messages/<int:record_id>/raw")
def message_raw(record_id: int) -> Response:
    """The bytes as received (admin only; each view audited: they hold patient data)."""
    _admin()
    with _db() as db:
        try:
            raw = Store(db).raw_of(record_id)
        except NotFound:
            _missing("record_id", record_id)
        _raw_viewed(db, record_id, raw)
    text = _text_of(raw)
    return _page("raw.html", record_id=record_id, text=text.replace("\r\n", "\n").replace("\r", "\n"), size=len(raw))


def _raw_viewed(db: Database, record_id: int, raw: bytes) -> None:
    """A view of a message's raw bytes, audited as the command line's ``messages show --raw`` is: the operator's
    entry and a read naming each patient of the message (found by ``patient:identifier``)."""
    from gateway.audit.log import append_many
    from gateway.commands.audit import raw_viewed_records

    made = raw_viewed_records(
        db, record_id, raw, at=_now(), gateway=_gateway(), user=_user_party(), client_address=_address(),
        client=records.Party("gateway-console", display=(request.user_agent.string[:200] or "browser")),
        server_address=public_root(), user_roles=sorted(g.console.principal.roles))
    with transaction(db):
        append_many(db, made)


@bp.post("/messages/<int:record_id>/retry")
def message_retry(record_id: int) -> BaseResponse:
    """Work a failed message, or one a process that is gone left unfinished, again (admin; audited by the pipeline
    with the admin's name)."""
    principal = _admin()
    outcome = _pipeline().retry(record_id, f"console:{principal.name}")
    with _db() as db:
        _operator(db, "message-retried", f"messages/{record_id}", str(getattr(outcome, "status", "")))
    return redirect(url_for("console.message", record_id=record_id), 303)


# --------------------------------------------------------------------------- exchange


def _outbox() -> Any:
    ex = _pipeline().exchange
    if ex is None:
        abort(404, "此网关未配置交换（签名密钥与登记快照）。(No exchange is configured on this gateway.)")
    return ex.outbox


@bp.get("/exchange")
def exchange() -> Response:
    """The outbox per destination, received Bundles, and 调阅 lookups made and served."""
    destination, state = request.args.get("destination", ""), request.args.get("state", "")
    with _db() as db:
        views = ReadModels(db)
        outbox = views.outbox_rows(destination, state, 200)
        received = views.received_bundles(100)
        exchanges = views.audit_entries("exchange", 100)
        lookups = views.audit_entries("read", 100)
    now = _now()
    for row in outbox:  # what `gateway outbox list/show` says of each: next try, holder, attempts in all
        row["next_try"] = _moment(row["next_attempt_at"], now) if row["status"] == "pending" else ""
        row["lease_ends"] = _moment(row["lease_until"], now) if row["status"] == "delivering" else ""
        row["holder"] = holder_state(row["lease_owner"], row["lease_until"], now.timestamp()) \
            if row["status"] == "delivering" and row["lease_owner"] else ""
    me = _settings().issuer_uscc
    served = [(seq, c) for seq, c in lookups if c.get("facts", {}).get("gateway", {}).get("value") == me]
    return _page("exchange.html", outbox=outbox, received=received, exchanges=exchanges, served=served,
                 made=[(s, c) for s, c in lookups if (s, c) not in served], destination=destination, state=state,
                 names=_member_names(), now=now, exchange_outcomes=EXCHANGE_OUTCOMES)


def _moment(stamp: Any, now: _dt.datetime) -> str:
    """An epoch-seconds time of the outbox as the page shows times (ISO, the gateway's time zone); "" for none."""
    try:
        return _dt.datetime.fromtimestamp(float(stamp), now.tzinfo).isoformat(timespec="seconds") \
            if stamp not in (None, "") else ""
    except (TypeError, ValueError, OverflowError, OSError):
        return str(stamp)


#: What an exchange entry's outcome means (AuditEvent.outcome): a sent Bundle with another outcome is a failure.
EXCHANGE_OUTCOMES = {"0": "0 成功 success", "4": "4 轻微失败 minor failure", "8": "8 严重失败 serious failure",
                     "12": "12 重大失败 major failure"}


def _outbox_action(row_id: int, action: Literal["outbox-retry", "outbox-replay"]) -> BaseResponse:
    _admin()
    box = _outbox()
    (box.retry if action == "outbox-retry" else box.replay)(row_id)
    with _db() as db:
        _operator(db, action, f"outbox/{row_id}")
    return redirect(url_for("console.exchange"), 303)


@bp.post("/outbox/<int:row_id>/retry")
def outbox_retry(row_id: int) -> BaseResponse:
    """Put a dead (or waiting) delivery back to be sent now (admin; audited)."""
    return _outbox_action(row_id, "outbox-retry")


@bp.post("/outbox/<int:row_id>/replay")
def outbox_replay(row_id: int) -> BaseResponse:
    """Send a delivered payload again (admin; audited)."""
    return _outbox_action(row_id, "outbox-replay")


# --------------------------------------------------------------------------- recognition

_SELECT = ("from", "to", *stats.SELECTABLE)
CROSS = (("month", "issuer"), ("month", "item"))


def same_command(argv: list[str]) -> str:
    """``gateway audit stats`` with these arguments as a shell takes them: each quoted where it must be (an item
    ``system|code``, a name with spaces or brackets), so that the line pasted into bash runs as the page selected."""
    return " ".join(["gateway", "audit", "stats", *(shlex.quote(a) for a in argv)])


def selection_of(args: Any) -> tuple[list[tuple[query.DateRange, ...]], dict[str, str], list[str]]:
    """The period and selection of a recognition page, and the same as ``gateway audit stats`` arguments (one
    list item each: :func:`same_command` quotes them).

    ``from`` and ``to`` are months (YYYY-MM) or days (YYYY-MM-DD), both included: ``--date geFROM --date leTO``.

    :raises InvalidSearch: a date that is not one.
    """
    tz = query.parse_offset(_settings().timezone)
    dates: list[tuple[query.DateRange, ...]] = []
    argv: list[str] = []
    for name, prefix in (("from", "ge"), ("to", "le")):
        value = (args.get(name) or "").strip()
        if value:
            if not re.fullmatch(r"[0-9]{4}-[0-9]{2}(-[0-9]{2})?", value) or not _is_day(
                    value if len(value) == 10 else value + "-01"):
                raise InputError(f"{name} {value!r} is not a month (YYYY-MM) or a day (YYYY-MM-DD) · 不是月份或日期",
                                 name)
            dates.append((query.parse_date(prefix + value, tz, name=name),))
            argv += ["--date", f"{prefix}{value}"]
    given = [(args.get(n) or "").strip() for n in ("from", "to")]
    if all(given) and given[0][:len(given[1])] > given[1]:  # (2026-12 to 2026-01: nothing could match)
        raise InputError(f"from {given[0]} is after to {given[1]}: nothing could match · 起始晚于截止", "from")
    chosen: dict[str, str] = {k: args[k].strip() for k in stats.SELECTABLE if (args.get(k) or "").strip()}
    for box in ("issuer", "receiver"):  # the tables show names: a name is taken for the code it names
        if box in chosen:
            chosen[box] = _member_named(chosen[box], box)
    unknown: dict[str, str] = {}
    for box in ("item", "catalogue", "alliance"):  # as the registry names them; one it does not: said
        if box in chosen:
            chosen[box], said = _registry_value(chosen[box], box)
            if said:
                unknown[box] = said
    g.unknown_filters = unknown
    for k, v in sorted(chosen.items()):
        argv += [f"--{k}", v]
    return dates, chosen, argv


#: A 统一社会信用代码 as written (its check character is not checked here: a former member's code is one too).
_USCC = re.compile(r"[0-9A-Z]{18}")


def _members() -> dict[str, str]:
    """Member names by USCC: the configured registry file's and the snapshot in force's (as shown beside codes)."""
    from gateway.registry.snapshot import read_snapshot_unverified

    members: dict[str, str] = {}
    try:
        members.update({uscc: m.name for uscc, m in read_snapshot_unverified(
            Path(_settings().registry_snapshot).read_bytes()).members.items()})
    except (OSError, ValueError, TypeError, GatewayError):
        pass
    snap = _snapshot()
    if snap is not None:
        members.update({uscc: m.name for uscc, m in snap.members.items()})
    return members


def _fold(text: str) -> str:
    """A name as it is compared: ASCII and full-width brackets, letters and digits alike (NFKC), without spaces,
    case folded: 通江县人民医院(演示) is 通江县人民医院（演示）."""
    return "".join(unicodedata.normalize("NFKC", text).split()).casefold()


def _registries() -> list[Any]:
    """The registry snapshots names and codes are looked up in: the configured file's and the one in force."""
    from gateway.registry.snapshot import read_snapshot_unverified

    found: list[Any] = []
    try:
        found.append(read_snapshot_unverified(Path(_settings().registry_snapshot).read_bytes()))
    except (OSError, ValueError, TypeError, GatewayError):
        pass
    snap = _snapshot()
    if snap is not None:
        found.append(snap)
    return found


def _registry_value(value: str, box: str) -> tuple[str, str]:
    """The value an item, catalogue or alliance box selects, as the figures key it, and what to say when the
    registry knows no such thing ("" when it does, or when there is no registry to ask).

    An item is a catalogue's ``system|code`` or a code alone; a catalogue its id or its name; an alliance the
    scope the tables show (川渝, 四川省, an alliance's name). Names are matched folded (:func:`_fold`); codes as
    written, one written in other case (or a local code) named in the words said.
    """
    from gateway.audit.stats import catalogue_scopes

    snaps = _registries()
    if not snaps:
        return value, ""
    if box == "item":
        codes: dict[str, str] = {}  # system|code and code -> system|code
        local: dict[str, set[str]] = {}
        for snap in snaps:
            for cat in snap.catalogues:
                for item in cat.items:
                    codes[f"{item.system}|{item.code}"] = codes[item.code] = f"{item.system}|{item.code}"
                    for _, code in item.local_codes:
                        local.setdefault(code.casefold(), set()).add(item.code)
        if value in codes:
            return value, ""
        near = sorted({c.rsplit("|", 1)[-1] for k, c in codes.items() if k.casefold() == value.casefold()} |
                      local.get(value.casefold(), set()))
        return value, (f"item {value!r} is no item of the registry's catalogues"
                       + (f" (did you mean {' or '.join(near)}?)" if near else "") + " · 登记中没有此项目")
    if box == "catalogue":
        names: dict[str, str] = {}
        for snap in snaps:
            names.update({c.id: c.name for c in snap.catalogues})
        if value in names:
            return value, ""
        found = sorted({i for i, n in names.items() if _fold(value) in (_fold(i), _fold(n))})
        if len(found) == 1:
            return found[0], ""
        return value, (f"catalogue {value!r} is no catalogue of the registry (its catalogues: "
                       f"{', '.join(sorted(names))}) · 登记中没有此目录")
    scopes = {scope for snap in snaps for scope in catalogue_scopes(snap).values()}
    if value in scopes or value == "unknown":
        return value, ""
    found = sorted(a for a in scopes if _fold(a) == _fold(value))
    if len(found) == 1:
        return found[0], ""
    return value, (f"alliance {value!r} is no scope of the registry's catalogues (its scopes: "
                   f"{', '.join(sorted(scopes))}) · 登记中没有此互认范围")


def _unknown_matched(matched: int, *, refused: bool = True) -> list[str]:
    """What the page says of an item, catalogue or alliance the registry does not know: an error when nothing
    matched it (a search that found nothing, silently, as an unknown issuer is); a notice when it matched
    decisions (one a catalogue had when they were recorded), or on a list of decisions (``refused`` False: a
    figure's drill-down may narrow a selection to none: the list is empty, and says why)."""
    unknown: dict[str, str] = g.get("unknown_filters") or {}
    if unknown and not matched and refused:
        box = sorted(unknown)[0]
        raise InputError(f"{unknown[box]}: nothing could match · 无匹配", box)
    if not matched:
        return [f"{said}: nothing could match · 无匹配" for said in unknown.values()]
    return [f"{said}; {matched} decision(s) recorded earlier name it · 登记中已无，仅有历史判定" for said in
            unknown.values()]


def _member_named(value: str, box: str) -> str:
    """The 统一社会信用代码 an issuer or receiver box names: a code as typed, or the name of one member (in full, as
    the tables show it, or a part of it only one member's name has, e.g. 通江县人民医院).

    :raises InputError: a name of no member, or of several (a search that would find nothing, silently).
    """
    members = _members()
    if _USCC.fullmatch(value.upper()):
        return value.upper() if value.upper() in members else value
    plain = _fold(value)  # (ASCII brackets or full-width, spaces or none: the same name)
    found = [u for u, n in members.items() if _fold(n) == plain] or \
        [u for u, n in members.items() if plain in _fold(n)]
    if len(found) == 1:
        return found[0]
    if found:
        named = "; ".join(f"{members[u]} {u}" for u in sorted(found)[:5])
        raise InputError(f"{box} {value!r} is part of the names of {len(found)} members ({named}): give the whole name "
                         "or the 统一社会信用代码 · 名称对应多个成员，请填写全称或统一社会信用代码", box)
    raise InputError(f"{box} {value!r} is neither a 统一社会信用代码 nor the name of a member: nothing could match · "
                     "既不是统一社会信用代码，也不是成员名称", box)


def _names() -> dict[str, str]:
    from gateway.commands.audit import registry_names  # the same names the command prints

    return registry_names(_settings())


def _member_names() -> dict[str, str]:
    """Member and authority (by USCC) and catalogue names: the snapshot in force, else the configured file's, to
    show beside the codes."""
    names = _names()
    for snap in _registries():  # authorities too: a referral's lane (``referral:<USCC>``) is shown by its name
        names.setdefault(snap.authority_uscc, snap.authority_name)
        names.update({uscc: a.name for uscc, a in snap.supervising_authorities().items()})
    snap = _snapshot()
    if snap is not None:
        names.update({uscc: m.name for uscc, m in snap.members.items()})
    return names


def _figures() -> tuple[dict[str, Any], dict[str, str], list[str]]:
    from gateway.commands.audit import (fee_table, registry_provinces,  # the fees and scopes the command uses
                                        registry_scopes)

    dates, chosen, argv = selection_of(request.args)
    fees, scopes = fee_table(_settings(), None), registry_scopes(_settings())
    with _db() as db:
        figures = stats.compute(db, dates, selection=chosen, by=CROSS, names=_names(), fees=fees, alliances=scopes,
                                provinces=registry_provinces(_settings()))
        _record_read(db, interaction="operation")
    g.filter_notices = _unknown_matched(int(figures["total"]["decisions"]))
    return figures, chosen, argv


_TABLES = (("by_month_issuer", "按月 × 发证机构 (month × issuer)"), ("by_issuer", "按发证机构 (by issuer)"),
           ("by_receiver", "按接收机构 (by receiver)"), ("by_item", "按项目 (by item)"),
           ("by_catalogue", "按目录 (by catalogue)"), ("by_alliance", "按互认范围 (by alliance)"),
           ("by_month", "按月 (by month)"),
           ("by_month_item", "按月 × 项目 (month × item)"))
_COLUMNS = ("decisions", "recognized", "not_recognized", "needs_review", "overridden", "eligible", "accepted", "rate")


@bp.get("/recognition")
def recognition() -> Response:
    """互认率 by month × issuer × receiver × item × catalogue, with charts, refusals and overrides."""
    figures, chosen, argv = _figures()
    base = {k: v for k, v in request.args.items() if k in _SELECT and v}

    def chart(kind: str, groups: list[dict[str, Any]], dimension: str, label: str) -> str:
        """One chart of the page: each mark links to the eligible decisions behind it, and says "accepted/eligible"."""
        points = [(g.get("name") or g["key"].rsplit("|", 1)[-1], g["rate"]) for g in groups]
        links = [drill(base, outcome="eligible", **{dimension: g["key"]}) for g in groups]
        notes = [f"{g['accepted']}/{g['eligible']}" if g["eligible"] else "" for g in groups]
        draw = charts.line if kind == "line" else charts.bars
        return draw(points, label, links=links, notes=notes)

    from gateway.audit.watch import last
    from gateway.heartbeat import run_dir

    return _page(
        "recognition.html", f=figures, base=base, argv=same_command(argv), tables=_TABLES,
        names=_member_names(), log_check=last(run_dir(_settings())),
        line_chart=chart("line", figures["by_month"], "month", "互认率按月 (rate by month)"),
        issuer_chart=chart("bars", figures["by_issuer"], "issuer", "互认率按发证机构 (rate by issuer)"),
        item_chart=chart("bars", figures["by_item"], "item", "互认率按项目 (rate by item)"),
        alliance_chart=chart("bars", figures["by_alliance"], "alliance", "互认率按互认范围 (rate by alliance)"),
        savings_chart=charts.amounts(
            [(f"{r['name'] or r['item']}（{_PROVINCES.get(r['province'], r['province'])}）", r["yuan"])
             for r in figures["savings"]["by_item"]], "节约费用按项目 (savings by item)", unit="元", decimals=2,
            links=[drill(base, outcome="accepted", item=r["item"]) for r in figures["savings"]["by_item"]]),
        hr_chart=charts.amounts(
            [(r["name"] or r["key"], float(r["results"])) for r in figures["hr_items"]["by_issuer"]],
            "HR 标识结果按机构 (HR items per institution)", unit="项"),
        provinces=_PROVINCES, notices=g.get("filter_notices") or [])


_PROVINCES = {"51": "四川", "50": "重庆"}


@bp.app_template_global()
def drill(base: dict[str, str], **more: Any) -> str:
    """The link to the decisions behind a figure: the page's selection plus the figure's own."""
    args = dict(base)
    for key, value in more.items():
        if value in (None, ""):
            continue
        args[key] = value
    return url_for("console.decisions_page") + "?" + urlencode(args)


@bp.get("/recognition/decisions")
def decisions_page() -> Response:
    """The decisions behind any figure of the recognition page (same query, plus outcome, month, rule)."""
    from gateway.commands.audit import registry_scopes  # the scopes the figures were counted by

    dates, chosen, argv = selection_of(request.args)
    if request.args.get("month"):
        chosen.pop("month", None)
    overridden = {"1": True, "0": False}.get(request.args.get("overridden", ""))
    with _db() as db:
        found = stats.decisions(db, dates, selection=chosen, outcome=request.args.get("outcome") or None,
                                overridden=overridden, month=request.args.get("month") or None,
                                rule=request.args.get("rule") or None, alliances=registry_scopes(_settings()))
        pages = max((len(found) + _DECISIONS_PAGE - 1) // _DECISIONS_PAGE, 1)
        page = min(_page_asked(), pages)
        shown = found[(page - 1) * _DECISIONS_PAGE:page * _DECISIONS_PAGE]
        _record_read(db, interaction="search-type", results=len(shown))
    notices = _unknown_matched(len(found), refused=False)
    args = {k: v for k, v in request.args.items() if k != "page" and v}
    return _page("decisions.html", rows=shown, total=len(found), page=page, pages=pages, names=_member_names(),
                 args=args, query=urlencode(args), notices=notices)


@bp.get("/decisions/<decision_id>")
def decision(decision_id: str) -> Response:
    """One decision: its rules and reasons, the snapshot version, and its AuditEvent; withdrawn (its report
    superseded by a correction), it says so first: from then on it reads as not recognised."""
    with _db() as db:
        views = ReadModels(db)
        entries = views.decision_entries("decision", decision_id)
        if not entries:
            abort(404, f"没有此判定 (no decision {decision_id})")
        overrides = views.decision_entries("override", decision_id)
        withdrawals = views.decision_entries("withdrawal", decision_id)
        _record_read(db, interaction="read", resource=f"AuditEvent/{entries[-1][0]}")
    return _page("decision.html", decision_id=decision_id, entries=entries, names=_names(), overrides=overrides,
                 withdrawals=withdrawals)


def _table_rows(figures: dict[str, Any]) -> list[list[Any]]:
    """Every table of the page as rows: table, key, name, then the counts (or a count for ranked tables)."""
    out: list[list[Any]] = []
    for table, _ in (("total", ""), *_TABLES):
        groups = [figures["total"]] if table == "total" else figures.get(table, [])
        for grp in groups:
            out.append([table, grp["key"], grp.get("name", ""), "", *(grp[c] for c in _COLUMNS)])
    for r in figures["refusals"]["by_rule"]:
        out.append(["refusals_by_rule", r["rule"], "", r["count"], *([""] * len(_COLUMNS))])
    for r in figures["overrides"]["by_reason"]:
        out.append(["overrides_by_reason", r["reason"], r["description"], r["count"], *([""] * len(_COLUMNS))])
    for r in figures["savings"]["by_item"]:
        out.append(["savings_yuan_by_item", f"{r['item']}|{r['province']}", r["name"], r["yuan"],
                    *([""] * len(_COLUMNS))])
    for r in figures["hr_items"]["by_issuer"]:
        for mark, count in r["by_mark"].items():
            out.append(["hr_items_by_issuer", f"{r['key']}|{mark}", r["name"], count, *([""] * len(_COLUMNS))])
    return out


_HEADER = ["table", "key", "name", "count", *_COLUMNS]


@bp.get("/recognition.csv")
def recognition_csv() -> Response:
    """Every table of the recognition page as CSV (UTF-8 with BOM, so Excel shows the Chinese)."""
    figures, _, _ = _figures()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(_HEADER)
    writer.writerows(_table_rows(figures))
    return Response("\ufeff" + buf.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=recognition.csv"})


@bp.get("/recognition.xlsx")
def recognition_xlsx() -> Response:
    """Every table of the recognition page as an XLSX workbook, one sheet per table."""
    from openpyxl import Workbook

    figures, _, argv = _figures()
    book = Workbook()
    first = book.active
    first.title = "about"
    first.append([same_command(argv)])
    first.append([stats.DEFINITION])
    sheets: dict[str, Any] = {}
    for row in _table_rows(figures):
        sheet = sheets.get(row[0])
        if sheet is None:
            sheet = sheets[row[0]] = book.create_sheet(row[0][:31])
            sheet.append(_HEADER)
        sheet.append(row)
    buf = io.BytesIO()
    book.save(buf)
    return Response(buf.getvalue(), mimetype="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                    headers={"Content-Disposition": "attachment; filename=recognition.xlsx"})


# --------------------------------------------------------------------------- audit

_AUDIT_PARAMS = ("date", "type", "subtype", "outcome", "agent", "entity", "patient", "_id", "_count", "_sort")


@bp.get("/audit")
def audit_search() -> Response:
    """AuditEvent search with the API's parameters (audited)."""
    unknown = sorted({k for k, v in request.args.items(multi=True)
                      if v and k not in _AUDIT_PARAMS and ":" not in k and k != "_cursor"})
    if unknown:  # as the API: a parameter that would be ignored is said, not dropped
        raise InputError(f"unknown search parameter {unknown[0]!r} (the API's: {', '.join(_AUDIT_PARAMS)})",
                         unknown[0][:60])
    # the patient box takes what an auditor has: a 身份证号 (or system|value) is searched as the patient's identifier;
    # only Patient/<id> is a reference (an id alone, as the API reads it, is one no auditor knows)
    # and the agent box a user name or 统一社会信用代码 (who.identifier), as the list shows them; Type/id is a reference
    params = [(f"{k}:identifier", v.strip()) if k in ("patient", "agent") and "/" not in v else (k, v)
              for k, v in request.args.items(multi=True) if v]
    if not any(k == "_count" for k, _ in params):
        params.append(("_count", "50"))
    search = query.parse_search(params, tz=query.parse_offset(_settings().timezone))
    with _db() as db:
        page = query.run(db, search)
        total = page.total if page.total is not None else query.count(db, search, upto=page.upto)
        events = [e.event() for e in page.entries]
        _record_read(db, interaction="search-type", results=len(events))
        held = {"own": checkpoints.checkpoints(db, own=True)[-5:], "peers": checkpoints.checkpoints(db, own=False)}
    more = search.query_string(cursor=page.next) if page.next is not None else None
    # a later page (a cursor) links back to the first page of the same search; the browser's back goes one page
    first = urlencode([(k, v) for k, v in request.args.items(multi=True) if v and k != "_cursor"]) \
        if request.args.get("_cursor") else None
    args = dict(request.args.items())
    for box in ("patient", "agent"):  # (a later page: the box keeps what was typed)
        if not args.get(box) and args.get(f"{box}:identifier"):
            args[box] = args[f"{box}:identifier"]
    return _page("audit.html", events=events, args=args, params=_AUDIT_PARAMS, held=held,
                 total=total, more=more, first=first)


@bp.get("/audit/<int:event_id>")
def audit_event(event_id: int) -> Response:
    """One AuditEvent (audited)."""
    with _db() as db:
        event = get(db, event_id).event()
        _record_read(db, interaction="read", resource=f"AuditEvent/{event['id']}")
    return _page("audit_event.html", event=event, text=json.dumps(event, ensure_ascii=False, indent=2))


#: The cookie that keeps the last chain verification of a session, for the page the verification redirects to.
VERIFY_COOKIE = "gateway_console_verify"
#: At most this many characters of a kept verification (a browser keeps a cookie of up to 4096 bytes).
_VERIFY_KEPT = 3600


def _seal(result: dict[str, Any]) -> str:
    """A verification result as a cookie value, signed with the session's secret (its CSRF token, kept in the
    database): another session's, or one written by hand, is not shown. Lines that do not fit are left off, said."""
    lines = list(result["lines"])
    left = 0
    while True:
        kept = dict(result, lines=lines + ([f"… 其余 {left} 行未显示，请运行 gateway audit verify "
                                           f"({left} more lines: run gateway audit verify)"] if left else []))
        data = base64.urlsafe_b64encode(zlib.compress(json.dumps(kept, ensure_ascii=False).encode())).decode()
        if len(data) <= _VERIFY_KEPT or len(lines) <= 1:
            break
        left += 1
        lines.pop()
    mac = hmac.new(g.console.csrf.encode(), data.encode(), "sha256").hexdigest()
    return f"{data}.{mac}"


def _unseal(value: str) -> dict[str, Any] | None:
    """The verification result a cookie of this session keeps; None when there is none (or it is not this
    session's)."""
    data, _, mac = value.rpartition(".")
    if not data or not hmac.compare_digest(mac, hmac.new(g.console.csrf.encode(), data.encode(), "sha256")
                                           .hexdigest()):
        return None
    try:
        kept: dict[str, Any] = json.loads(zlib.decompress(base64.urlsafe_b64decode(data.encode())))
    except (ValueError, zlib.error):
        return None
    return kept


@bp.post("/audit/verify")
def audit_verify() -> BaseResponse:
    """Walk the hash chain and the checkpoints with the configured trust (audited), then go to the page showing
    the result (post/redirect/get: Back and Reload do not ask for the verification again, nor audit it again)."""
    settings = _settings()
    trust, trust_notes = checkpoints.configured_trust(settings, ())
    with _db() as db:
        claims, notes = checkpoints.claims(db, trust, member=settings.issuer_uscc)
        report = verify_log(db, claims)
        _record_read(db, interaction="operation")
    report.notes[:0] = (trust_notes if claims else []) + notes
    result = {"ok": report.ok, "verdict": report.verdict, "first_bad": report.first_bad, "lines": report.lines(),
              "at": _now().isoformat(), "by": g.console.principal.name}
    response = redirect(url_for("console.audit_verified"), 303)
    response.set_cookie(VERIFY_COOKIE, _seal(result), httponly=True, samesite="Strict", secure=_secure(),
                        path=url_for("console.audit_verified"))
    return response


@bp.get("/audit/verify")
def audit_verified() -> Response:
    """The result of the session's last chain verification (shown again as it was: nothing is verified, nor
    audited, by reading it); without one, the button to run it."""
    result = _unseal(request.cookies.get(VERIFY_COOKIE, ""))
    return _page("verify.html", report=result, lines=result["lines"] if result else [])


# --------------------------------------------------------------------------- registry


@bp.get("/registry")
def registry() -> Response:
    """Members, qualifications (expiring within 30 days highlighted), EQA, catalogues, snapshot history."""
    snap = _snapshot()
    today = _now().date()
    with _db() as db:
        history = ReadModels(db).registry_history()

    def days_left(period: Any) -> int | None:
        return (period.end - today).days if getattr(period, "end", None) else None

    return _page("registry.html", snap=snap, history=history, days_left=days_left, today=today)
