"""Bench context: options, the working directory, and what several stages share.

One :class:`BenchContext` per run holds the generated inputs, the loaded
mapping tables, a fixed clock (so that stored times and signature times do not
depend on when the benchmark runs) and the run-time TEST signing key. Anything
a stage needs from an area that is not there yet raises
:class:`~gateway.bench.measure.NotAvailable` naming what is missing.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC, oru_batch
from gateway.bench.measure import NotAvailable
from gateway.config import Settings, load_settings

__all__ = ["BenchOptions", "BenchContext", "Signer", "free_port", "CST"]

CST = _dt.timezone(_dt.timedelta(hours=8))
#: The benchmark's fixed "now": stored times and signature times do not depend on the day it runs.
BENCH_NOW = _dt.datetime(2026, 5, 21, 9, 0, 0, tzinfo=CST)


@dataclass(frozen=True)
class BenchOptions:
    """How much to run. ``quick`` is the smoke check (well under 30 s); the full run takes minutes."""

    quick: bool = False
    stages: tuple[str, ...] = ()  # empty: every stage of the chosen mode
    count: int | None = None  # messages per in-process stage (default by mode)
    seconds: float | None = None  # time cap per in-process stage (default by mode)
    seed: int = 8
    workdir: str | None = None  # kept when given; a temporary directory otherwise
    mllp_rate: float = 200.0  # messages per second, all MLLP clients together
    mllp_clients: int = 3
    mllp_workers: int = 2  # listener processes of the server (2 cores)
    queue_readers: int = 1  # queue reader processes of the server (mllp-queued)
    queue_record_group: int | None = None  # its messages recorded per transaction (None: the setting's default)
    mllp_seconds: float | None = None
    http_clients: int = 4
    http_requests: int | None = None
    memory_sample: int = 4  # items traced by tracemalloc per stage
    csv_rows: int | None = None  # rows of the generated CDC export
    audit_entries: int | None = None  # entries in the audit log searched and verified

    @property
    def per_stage(self) -> int:
        return self.count if self.count is not None else (40 if self.quick else 1000)

    @property
    def cap_s(self) -> float:
        return self.seconds if self.seconds is not None else (0.6 if self.quick else 15.0)

    @property
    def mllp_duration(self) -> float:
        return self.mllp_seconds if self.mllp_seconds is not None else (1.5 if self.quick else 20.0)

    @property
    def csv_row_count(self) -> int:
        return self.csv_rows if self.csv_rows is not None else (800 if self.quick else 20_000)

    @property
    def audit_entry_count(self) -> int:
        return self.audit_entries if self.audit_entries is not None else (5_000 if self.quick else 100_000)

    @property
    def http_count(self) -> int:
        return self.http_requests if self.http_requests is not None else (30 if self.quick else 1000)


@dataclass
class Signer:
    """The run-time TEST signing material: a P-256 key and its certificate chain (never written to disk)."""

    key: Any
    chain: list[Any]
    who: dict[str, Any]
    when: _dt.datetime
    authority_key: Any
    authority_cert: Any


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchContext:
    """Shared state of one benchmark run."""

    options: BenchOptions
    workdir: Path
    echo: Callable[[str], Any] = print
    _owned: bool = False
    _messages: list[bytes] = field(default_factory=list)
    _next_message: int = 0
    _cache: dict[str, Any] = field(default_factory=dict)
    _closers: list[Callable[[], Any]] = field(default_factory=list)

    @classmethod
    def create(cls, options: BenchOptions, echo: Callable[[str], Any] = print) -> "BenchContext":
        """A context with its working directory (temporary unless ``options.workdir`` is given)."""
        if options.workdir:
            path = Path(options.workdir)
            path.mkdir(parents=True, exist_ok=True)
            return cls(options, path, echo)
        return cls(options, Path(tempfile.mkdtemp(prefix="gateway-bench-")), echo, _owned=True)

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` when the run ends (a server a stage started), before the working directory goes."""
        self._closers.append(fn)

    def close(self) -> None:
        """Stop what stages started, and remove the temporary working directory (a given one is kept)."""
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as exc:  # noqa: BLE001 - the rest is still cleaned up
                self.echo(f"  cleaning up after the run failed: {type(exc).__name__}: {exc}")
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- inputs ----------------------------------------------------------------------

    def fresh_messages(self, count: int) -> list[bytes]:
        """``count`` generated messages never handed out before in this run (distinct MSH-10)."""
        batch = oru_batch(count, self.options.seed, start=self._next_message)
        self._next_message += count
        return batch

    @property
    def clock(self) -> Callable[[], _dt.datetime]:
        return lambda: BENCH_NOW

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings of the benchmark's member gateway, with its own database under the working directory."""
        values: dict[str, Any] = {"data_dir": str(self.workdir / name), "issuer_uscc": BENCH_ISSUER_USCC,
                                  "issuer_name": BENCH_ISSUER_NAME, "log_level": "WARNING"}
        values.update(overrides)
        return load_settings(environ={}, overrides=values)

    # -- shared pieces ---------------------------------------------------------------

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def pipeline(self, name: str, **overrides: Any) -> Any:
        """A :class:`~gateway.pipeline.Pipeline` (with its default profile check) on its own database."""
        from gateway.pipeline import Pipeline

        return Pipeline(self.settings(name, **overrides), clock=self.clock)

    def guide(self) -> Any:
        """The loaded implementation guide (profiles/), or NotAvailable."""
        def load() -> Any:
            try:
                profiles = importlib.import_module("gateway.fhir.profiles")
                load_guide = getattr(profiles, "load_guide")
            except (ImportError, AttributeError) as exc:
                return NotAvailable(f"profile validation (gateway.fhir.profiles.load_guide) not there yet: {exc}")
            try:
                return load_guide(self.settings("guide").profiles_dir)
            except Exception as exc:  # a guide being edited may not load; say so instead of failing the run
                return NotAvailable(f"profiles/ does not load: {exc}")
        guide = self.cached("guide", load)
        if isinstance(guide, NotAvailable):
            raise guide
        return guide

    def checker(self) -> Callable[[dict[str, Any]], list[Any]]:
        """The profile check the pipeline runs on every Bundle (Guide.validate)."""
        return self.guide().validate  # type: ignore[no-any-return]

    def signer(self) -> Signer:
        """A TEST registry authority and member certificate, generated now, for the bench issuer."""
        def make() -> Signer:
            from gateway.signing.jws import signer_reference
            from gateway.signing.keys import generate_private_key, issue_certificate, make_authority

            start = BENCH_NOW - _dt.timedelta(days=1)
            authority_key = generate_private_key()
            authority = make_authority(authority_key, "11500000MB00050043", "TEST registry authority (bench)",
                                       start, start + _dt.timedelta(days=365))
            key = generate_private_key()
            cert = issue_certificate(key.public_key(), BENCH_ISSUER_USCC, f"{BENCH_ISSUER_NAME} TEST",
                                     authority_key, authority, start, start + _dt.timedelta(days=90))
            return Signer(key, [cert], signer_reference(cert), BENCH_NOW, authority_key, authority)
        return self.cached("signer", make)  # type: ignore[no-any-return]

    def member_settings(self, name: str, uscc: str, member_name: str) -> Settings:
        """Settings of a demo member gateway that signs and holds the demo registry snapshot.

        The DEMO registry (authority, member keys and certificates, signed snapshot) is generated
        at run time by :func:`gateway.demo.registry.build_demo_registry` and written to the
        working directory (private keys as ``TEST-*.key.pem``, mode 0600), never to the repository.

        :raises NotAvailable: the registry or signing settings do not exist yet.
        """
        fields = {f.name for f in dataclasses.fields(Settings)}
        missing = {"signing_key", "signing_cert", "registry_snapshot", "registry_authority"} - fields
        if missing:
            raise NotAvailable(f"no settings {', '.join(sorted(missing))} yet")
        base = self.workdir / "registry"

        def write() -> Any:
            from gateway.demo.registry import build_demo_registry
            from gateway.signing.keys import cert_pem, private_key_pem

            demo = build_demo_registry(BENCH_NOW)
            base.mkdir(parents=True, exist_ok=True)
            (base / "snapshot.json").write_text(demo.text(), encoding="utf-8")
            (base / "authority.cert.pem").write_bytes(cert_pem(demo.authority_cert))
            for member, key in demo.member_keys.items():
                fd = os.open(base / f"TEST-{member}.key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(private_key_pem(key))
                (base / f"{member}.cert.pem").write_bytes(cert_pem(demo.member_certs[member]))
            return demo

        self.cached("demo-registry", write)
        return self.settings(name, issuer_uscc=uscc, issuer_name=member_name,
                             signing_key=str(base / f"TEST-{uscc}.key.pem"),
                             signing_cert=str(base / f"{uscc}.cert.pem"),
                             registry_snapshot=str(base / "snapshot.json"),
                             registry_authority=str(base / "authority.cert.pem"))

    def sign(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """``bundle`` signed as it leaves the gateway (gateway.signing.jws.sign_bundle)."""
        from gateway.signing.jws import sign_bundle

        s = self.signer()
        return sign_bundle(bundle, s.key, s.chain, who=s.who, when=s.when)
