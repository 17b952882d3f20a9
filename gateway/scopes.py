"""Scopes: what a SMART Backend Services access token lets its client do, route by route.

A scope names a resource type and permissions, in the SMART App Launch v1 form
(``system/Observation.read``, ``.write``, ``.*``) or the v2 form
(``system/Observation.rs``, ``.cruds``: create, read, update, delete, search,
in that order). ``*`` stands for every type. Both forms mean the same letters:
``read`` is ``rs``, ``write`` is ``cud``, ``*`` is ``cruds``.

Each route of the gateway needs one permission on one type
(:func:`required_scope`):

====================================================== ======================================
route                                                  needs
====================================================== ======================================
GET /fhir/{type}, POST /fhir/{type}/_search,           ``system/{type}.s`` (search)
GET /fhir/{type}/_history
GET /fhir/{type}/{id}, .../_history, .../_history/{v}   ``system/{type}.r`` (read)
POST /fhir/{type}/$op, POST /fhir/{type}/{id}/$op       ``system/{type}.r`` (e.g. ``$validate``)
POST /fhir, /fhir/Bundle, /ingest/{format}             ``system/Bundle.c`` (submit results)
POST /fhir/$recognize                                  ``system/DiagnosticReport.r``
GET /audit/stats, GET /audit/checkpoints               ``system/AuditEvent.s``
POST /audit/checkpoints                                ``system/AuditEvent.c``
====================================================== ======================================

Any other route is closed to access tokens. Pure: no Flask, no database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InputError

__all__ = ["Scope", "Need", "parse_scope", "parse_scopes", "covers", "grant", "required_scope", "PERMISSIONS"]

#: v2 permission letters, in the order a v2 scope writes them.
PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]{1,63})\.(read|write|\*|c?r?u?d?s?)$")
_TYPE = r"[A-Z][A-Za-z]{1,63}"
_LETTER_NAME = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


@dataclass(frozen=True)
class Scope:
    """One parsed scope: its text as written, the resource type (or ``*``) and its permission letters."""

    text: str
    type: str
    letters: frozenset[str]


@dataclass(frozen=True)
class Need:
    """What a route needs: one permission letter on one resource type."""

    type: str
    letter: str

    def __str__(self) -> str:
        v1 = "read" if self.letter in "rs" else "write"
        return f"system/{self.type}.{self.letter} (or system/{self.type}.{v1}, or system/*.{v1})"


def parse_scope(text: str) -> Scope:
    """One scope.

    :raises InputError: not a ``system/<Type>.<permissions>`` scope of SMART v1 or v2.
    """
    match = _SCOPE.match(text or "")
    if not match or not match.group(2):
        shown = text if len(text or "") <= 80 else text[:80] + "..."
        raise InputError(f"scope {shown!r} is not system/<Type>.read|write|* or system/<Type>.<cruds letters>",
                         "scope")
    rtype, perms = match.groups()
    return Scope(text, rtype, frozenset(_V1.get(perms, perms)))


def parse_scopes(text: str | Iterable[str]) -> list[Scope]:
    """Space-separated scopes (or a list of them), each checked, duplicates dropped.

    :raises InputError: one of them is not a system scope.
    """
    items = text.split() if isinstance(text, str) else list(text)
    seen: dict[str, Scope] = {}
    for item in items:
        seen.setdefault(item, parse_scope(item))
    return list(seen.values())


def covers(scopes: Iterable[Scope], rtype: str, letter: str) -> bool:
    """True when the scopes allow ``letter`` on ``rtype``."""
    return any(s.type in ("*", rtype) and letter in s.letters for s in scopes)


def grant(requested: Iterable[Scope], registered: Iterable[Scope]) -> list[Scope]:
    """The requested scopes the registration allows in full (a scope is granted whole or not at all)."""
    allowed = list(registered)
    out = []
    for scope in requested:
        types = ("*",) if scope.type == "*" else (scope.type,)
        if all(any(r.type in ("*",) + types and letter in r.letters for r in allowed) for letter in scope.letters):
            out.append(scope)
    return out


_RULES: list[tuple[str, re.Pattern[str], str | None, str]] = [
    # (method, path, type or None for the path's own type, letter)
    ("POST", re.compile(r"^/fhir/?$"), "Bundle", "c"),
    ("POST", re.compile(r"^/fhir/Bundle$"), "Bundle", "c"),
    ("POST", re.compile(r"^/ingest/[^/]+$"), "Bundle", "c"),
    ("POST", re.compile(r"^/fhir/\$recognize$"), "DiagnosticReport", "r"),
    ("GET", re.compile(r"^/audit/(stats|checkpoints)$"), "AuditEvent", "s"),
    ("POST", re.compile(r"^/audit/checkpoints$"), "AuditEvent", "c"),
    ("GET", re.compile(rf"^/fhir/(?P<type>{_TYPE})(/_history)?/?$"), None, "s"),
    ("POST", re.compile(rf"^/fhir/(?P<type>{_TYPE})/_search$"), None, "s"),
    ("GET", re.compile(rf"^/fhir/(?P<type>{_TYPE})/[^/$]+(/_history(/[^/]+)?)?$"), None, "r"),
    ("POST", re.compile(rf"^/fhir/(?P<type>{_TYPE})(/[^/$]+)?/\$[A-Za-z-]+$"), None, "r"),
]


def required_scope(method: str, path: str) -> Need | None:
    """The permission a request needs; None when the route is not open to access tokens."""
    method = "GET" if method == "HEAD" else method.upper()
    for rule_method, pattern, rtype, letter in _RULES:
        if rule_method != method:
            continue
        match = pattern.match(path)
        if match:
            return Need(rtype or match.group("type"), letter)
    return None
