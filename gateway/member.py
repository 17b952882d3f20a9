"""The composition root: one place that builds a member gateway from its settings.

Every entry point — the API's workers, the MLLP listener, the queue reader, the
background loop and the CLI — gets its parts from :func:`build_member`:

- the mapping tables and the implementation guide every Bundle is checked against;
- the registry holder (the signed registry snapshot in force) and the watcher of
  its file;
- the signing identity, the :class:`~gateway.signing.issuing.Signer` and the
  :class:`~gateway.recognition.marks.MarkStamper` (pure services);
- the transport to other members;
- the database: this thread's :class:`~gateway.store.store.Store`, or a
  connection borrowed for one request (:meth:`Member.borrow`).

Nothing here does work of its own: the pipeline (``gateway.pipeline``) and the
exchange (``gateway.exchange``) do, with what is built here.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Settings
from gateway.errors import ConfigError, Issue
from gateway.mapping.tables import MappingSet, load_mappings
from gateway.recognition.marks import MarkStamper
from gateway.registry.models import Snapshot
from gateway.registry.snapshot import RegistryHolder
from gateway.signing.issuing import MemberIdentity, Signer
from gateway.store.db import Database, borrowed, connection_lost, describe
from gateway.store.store import Store

__all__ = ["Member", "build_member", "CST"]

log = logging.getLogger(__name__)

CST = _dt.timezone(_dt.timedelta(hours=8))
Checker = Callable[[dict[str, Any]], list[Issue]]


@dataclass
class Member:
    """One member gateway's parts, built once per process by :func:`build_member`."""

    settings: Settings
    clock: Callable[[], _dt.datetime]
    mappings: MappingSet
    checker: Checker
    holder: RegistryHolder | None
    identity: MemberIdentity | None
    transport: Any  # gateway.exchange.outbox.Transport
    snapshot_file: Any = None  # gateway.registry.holder.SnapshotFile, when a snapshot file is configured
    signer: Signer | None = None
    marks: MarkStamper | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def snapshot(self) -> Snapshot:
        """The registry snapshot in force now (a newly installed file is taken up first).

        :raises ConfigError: no registry snapshot is configured.
        :raises TrustError: the snapshot in force has expired.
        """
        if self.holder is None:
            raise ConfigError("this gateway has no registry snapshot configured (registry_snapshot)", "registry")
        if self.snapshot_file is not None:
            self.snapshot_file.refresh()  # a newly published snapshot takes effect without a restart
        return self.holder.snapshot_at(self.clock())

    def require_signer(self) -> Signer:
        """:raises ConfigError: this member has no signing key."""
        if self.signer is None:
            raise ConfigError("this gateway has no signing key configured (signing_key, signing_cert)", "signing_key")
        return self.signer

    @property
    def store(self) -> Store:
        """This thread's database connection (opened on first use, and again when the server ended the last one:
        a PostgreSQL restart, a failover, a session ended for idling in a transaction)."""
        store: Store | None = getattr(self._local, "store", None)
        if store is not None and connection_lost(store.db):
            if getattr(store.db, "opened_read_only", False):
                # closed first: SQLite keeps a file's shared memory read-only for the process while any
                # connection that opened it so is open
                log.warning("database %s can be written again; reopening this connection, which was read-only",
                            describe(self.settings.database_locator))
            else:  # (found before use, or after the request it failed has said so: nothing fails for it now)
                log.info("database connection lost (%s); opening a new one", describe(self.settings.database_locator))
            with contextlib.suppress(Exception):
                store.close()
            store = self._local.store = None
        if store is None:
            store = Store.open(self.settings.database_locator, self.clock)
            self._local.store = store
        return store

    def close(self) -> None:
        """Close this thread's database connection (opened again on next use)."""
        store = getattr(self._local, "store", None)
        if store is not None:
            store.close()
            self._local.store = None

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Database]:
        """A database connection for one request (:func:`gateway.store.db.borrowed`)."""
        with borrowed(self.settings.database_locator) as db:
            yield db


def build_member(settings: Settings, *, mappings: MappingSet | None = None,
                 clock: Callable[[], _dt.datetime] | None = None, checker: Checker | None = None,
                 transport: Any = None) -> Member:
    """Build a member gateway's parts from its settings.

    :raises ConfigError: mapping tables, profiles, keys or the registry snapshot are missing or invalid.
    """
    from gateway.exchange.transports import HTTPTransport
    from gateway.registry.holder import SnapshotFile, holder_from_settings

    clock = clock or (lambda: _dt.datetime.now(CST))
    mappings = mappings if mappings is not None else load_mappings(settings.mappings_dir)
    if checker is None:
        # Every Bundle the gateway stores is checked against our implementation guide (profiles/).
        from gateway.fhir.profiles import load_guide

        checker = load_guide(settings.profiles_dir).validate
    holder = holder_from_settings(settings, clock)
    identity = MemberIdentity.from_settings(settings)
    if transport is None:
        transport = HTTPTransport(timeout=float(settings.delivery_timeout))
    member = Member(settings=settings, clock=clock, mappings=mappings, checker=checker, holder=holder,
                    identity=identity, transport=transport)
    if holder is not None and settings.registry_snapshot:
        member.snapshot_file = SnapshotFile(settings, holder, clock)
    if identity is not None:
        member.signer = Signer(identity, clock)
    if holder is not None:
        member.marks = MarkStamper(settings.issuer_uscc, member.snapshot)
    return member
