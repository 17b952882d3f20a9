"""Shared setup of the audit and auth tests: an app serving the audit API with one user per role, and a
registry authority with a member certificate made at run time.

Imported by ``test_audit_*.py`` and ``test_auth*.py``; holds no tests itself.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import CST, FULING, TONGJIANG
from flask import Flask

from gateway import auth
from gateway.audit import checkpoint as cp
from gateway.audit import records as r
from gateway.signing import keys
from gateway.signing.trust import StaticTrust
from gateway.store.db import connect

ME = r.Party.member(TONGJIANG, "通江县人民医院")
T0 = _dt.datetime(2026, 5, 1, 8, 0, tzinfo=CST)
AUTHORITY = "12500000MB0009009C"
SETUP = r.Party("test-setup")
ROLES = ("auditor", "admin", "submitter", "peer")


def locator(database: str, tmp_path: Path, name: str = "gw") -> str | Path:
    """The database ``name`` of a test: a SQLite file in ``tmp_path``, or (``database`` a PostgreSQL URL from
    the ``database`` fixture) a schema of its own beside the test's, so that one test can hold several logs."""
    if not database:
        return tmp_path / f"{name}.db"
    return re.sub(r"([?&]schema=)(\w+)", lambda m: f"{m.group(1)}{m.group(2)}_{name}", database)


def audit_app(settings: Any, clock: Any) -> Flask:
    """A Flask app with just the audit blueprint and the gateway's OperationOutcome error handlers.

    The full app (``gateway.api.app.create_app``) registers the same blueprint; this one
    keeps the audit tests independent of the ingest pipeline.
    """
    from gateway.api import audit as audit_api
    from gateway.api.errors import register_error_handlers

    app = Flask("audit-test")
    app.config["TESTING"] = True
    app.extensions["gateway.settings"] = settings
    app.extensions["gateway.clock"] = clock
    register_error_handlers(app)
    app.register_blueprint(audit_api.bp)
    return app


@contextmanager
def serving(settings: Any, clock: Any) -> Iterator[tuple[Any, dict[str, str], Any]]:
    """(test client, {role: API token}, database) for an app with the audit blueprint; users: <role>1.

    Adding the four users writes four audit entries (1-4) before a test starts. Each test module
    wraps this in its own ``audit_client`` fixture.
    """
    app = audit_app(settings, clock)
    db = connect(settings.database_locator)
    tokens = {}
    for role in ROLES:
        member = FULING if role == "peer" else None
        _, tokens[role] = auth.add_user(db, f"{role}1", [role], member=member, at=clock(), gateway=ME, by=SETUP)
    yield app.test_client(), tokens, db
    db.conn.close()


class Pki:
    """A registry authority and this member's signing certificate, made for the test run."""

    def __init__(self, uscc: str = TONGJIANG, authority: str = AUTHORITY) -> None:
        self.authority_key = keys.generate_private_key()
        self.authority = keys.make_authority(
            self.authority_key,
            authority,
            "川渝联合办公室（测试）",
            T0 - _dt.timedelta(days=30),
            T0 + _dt.timedelta(days=3650),
        )
        self.key = keys.generate_private_key()
        self.cert = keys.issue_certificate(
            self.key.public_key(),
            uscc,
            "通江县人民医院（测试）",
            self.authority_key,
            self.authority,
            T0 - _dt.timedelta(days=1),
            T0 + _dt.timedelta(days=365),
        )
        self.signer = cp.Signer(self.key, [self.cert])
        self.trust = StaticTrust.from_certificates([self.authority, self.cert])

    def pem(self, path: Path) -> Path:
        path.write_bytes(keys.cert_pem(self.authority) + keys.cert_pem(self.cert))
        return path
