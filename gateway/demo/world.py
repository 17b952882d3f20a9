"""Demo world: a registry authority and member gateways, set up on one machine.

DEMO MATERIAL ONLY. Keys are generated at run time into the demo's working
directory (mode 0600), never into the repository. Each member gets a real
gateway: its own SQLite database, settings, pipeline and WSGI app, configured
exactly as an operator would configure one (key and certificate files, a
signed registry snapshot, the authority certificate, its public URL).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
import threading
from pathlib import Path
from typing import Any

from gateway.config import Settings, load_settings
from gateway.demo import MEMBERS, DemoMember
from gateway.demo.registry import DemoRegistry, build_demo_registry
from gateway.signing.keys import cert_pem, private_key_pem

__all__ = ["DemoGateway", "DemoWorld", "build_world", "add_authority", "add_member_gateway", "leave_configs",
           "SERVE_PORTS"]

#: Ports of each member's gateway when its folder is served after the demo (HTTP, MLLP).
SERVE_PORTS = {"tongjiang": (8081, 2575), "fuling": (8082, 2576), "sccdc": (8083, 2577)}


class DemoGateway:
    """One member's gateway in the demo: its settings, pipeline and WSGI app (made when first asked for: most uses
    of a demo world drive pipelines only, and an app's routes take a tenth of a second to compile)."""

    def __init__(self, member: DemoMember, settings: Settings, pipeline: Any, app: Any, url: str,
                 token: str = "") -> None:
        self.member = member
        self.settings = settings
        self.pipeline = pipeline
        self._app = app  # the app, or None until it is first asked for
        self._making = threading.Lock()  # (two delivery lanes asking at once made two apps over one pipeline)
        self.url = url
        self.token = token  # an admin API token of this gateway (for the demo's own queries)

    @property
    def app(self) -> Any:
        with self._making:
            if self._app is None:
                from gateway.api.app import create_app

                self._app = create_app(self.settings, self.pipeline)
        return self._app

    def __repr__(self) -> str:
        return f"DemoGateway({self.member.key!r}, {self.url!r})"


@dataclass
class DemoWorld:
    """The registry and every member gateway."""

    base: Path
    registry: DemoRegistry
    gateways: dict[str, DemoGateway] = field(default_factory=dict)

    def publish(self, registry: DemoRegistry) -> None:
        """The authority publishes a new snapshot; every gateway applies it."""
        self.registry = registry
        text = registry.text()
        (self.base / "registry" / "snapshot.json").write_text(text, encoding="utf-8")
        for gw in self.gateways.values():
            holder = gw.pipeline.exchange.holder
            holder.apply(text)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise; the umask may have narrowed a new one
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def build_world(base: Path, clock: Callable[[], _dt.datetime], endpoints: dict[str, str], *,
                mappings_dir: str | None = None, members: tuple[str, ...] = ("tongjiang", "fuling", "sccdc"),
                log_level: str = "WARNING", database: Callable[[str], str] | None = None) -> DemoWorld:
    """Keys, certificates and a signed snapshot for the demo members, and a gateway for each.

    ``endpoints`` maps member keys (``tongjiang``...) to the URL each gateway is reached at.
    ``database`` gives a member key's ``database`` setting (a ``postgresql://`` URL); by default each
    gateway has its SQLite file in its own folder.
    """
    from gateway import auth
    from gateway.audit.log import ensure_schema as ensure_audit_schema
    from gateway.audit.records import Party
    from gateway.pipeline import Pipeline

    uscc_endpoints = {MEMBERS[k].uscc: url for k, url in endpoints.items()}
    registry = build_demo_registry(clock(), endpoints=uscc_endpoints)
    reg_dir = base / "registry"
    reg_dir.mkdir(parents=True, exist_ok=True)
    (reg_dir / "authority.pem").write_bytes(cert_pem(registry.authority_cert))
    (reg_dir / "snapshot.json").write_text(registry.text(), encoding="utf-8")
    world = DemoWorld(base, registry)
    for key in members:
        member = MEMBERS[key]
        home = base / key
        _write_private(home / "keys" / "DEMO-signing.key.pem", private_key_pem(registry.member_keys[member.uscc]))
        (home / "keys" / "DEMO-signing.cert.pem").write_bytes(cert_pem(registry.member_certs[member.uscc]))
        overrides = {
            "data_dir": str(home), "issuer_uscc": member.uscc, "issuer_name": member.name,
            "registry_snapshot": str(reg_dir / "snapshot.json"), "registry_authority": str(reg_dir / "authority.pem"),
            "signing_key": str(home / "keys" / "DEMO-signing.key.pem"),
            "signing_cert": str(home / "keys" / "DEMO-signing.cert.pem"),
            "public_url": endpoints[key], "log_level": log_level,
        }
        if mappings_dir:
            overrides["mappings_dir"] = mappings_dir
        if database is not None:
            overrides["database"] = database(key)
        settings = load_settings(environ={}, overrides=overrides)
        pipeline = Pipeline(settings, clock=clock)
        ensure_audit_schema(pipeline.store.db)  # (as the app makes them: before anything is written)
        _, token = auth.add_user(pipeline.store.db, "demo-admin", ["admin"], at=clock(),
                                 gateway=Party.member(member.uscc), by=Party.user(member.uscc, "demo"))
        world.gateways[key] = DemoGateway(member, settings, pipeline, None, endpoints[key], token)
    return world


#: The demo authority that gets a gateway of its own (referrals of Sichuan members' reports go to it).
AUTHORITY_KEY = "schealth"
AUTHORITY_USCC = "11510000MB00060015"


def add_authority(world: DemoWorld, clock: Callable[[], _dt.datetime], url: str, *,
                  uscc: str = AUTHORITY_USCC, log_level: str = "WARNING") -> DemoGateway:
    """Give an authority of the registry (四川省卫生健康委员会（演示）) a gateway at ``url``: a signing certificate
    issued by the registry authority, listed with its endpoint under ``authorities`` in a new snapshot that
    every gateway applies. Referrals (移送) of reports reach it there, and its answers are signed with it."""
    from gateway.signing.keys import generate_private_key, issue_certificate

    reg = world.registry
    data = _next_source(world)
    body = next(a for a in data["authorities"] if a["uscc"] == uscc)
    key = generate_private_key()
    start = clock() - _dt.timedelta(days=1)
    cert = issue_certificate(key.public_key(), uscc, body["name"], reg.authority_key, reg.authority_cert, start,
                             start + _dt.timedelta(days=180))
    body["endpoint"] = url
    body["certificates"] = [{"pem": cert_pem(cert).decode("ascii")}]
    _publish_source(world, clock, data, {uscc: key}, {uscc: cert})
    member = DemoMember(AUTHORITY_KEY, body["name"], uscc, "510000")
    return _add_gateway(world, clock, member, url, log_level=log_level)


#: The demo's 职业卫生/放射卫生技术服务机构, a registry member that gets a gateway of its own in the story.
SERVICE_KEY = "yuan"
SERVICE_USCC = "91500105MA5U0A1B2R"


def add_member_gateway(world: DemoWorld, clock: Callable[[], _dt.datetime], url: str, *,
                       key: str = SERVICE_KEY, uscc: str = SERVICE_USCC, log_level: str = "WARNING") -> DemoGateway:
    """Give a registry member that has no gateway yet (重庆渝安职业卫生技术服务有限公司（演示）) one at ``url``: its
    endpoint in a new snapshot that every gateway applies; it signs with the key and certificate the registry
    authority issued it when the demo registry was built."""
    data = _next_source(world)
    listed = next(m for m in data["members"] if m["uscc"] == uscc)
    listed["endpoint"] = url
    _publish_source(world, clock, data, {}, {})
    member = DemoMember(key, listed["name"], uscc, listed["division"])
    return _add_gateway(world, clock, member, url, log_level=log_level)


def _next_source(world: DemoWorld) -> dict[str, Any]:
    """The DEMO registry source as the next version of the snapshot in force: the endpoints and certificates
    that snapshot lists (members and authorities) carried over."""
    from gateway.demo.registry import DEMO_SOURCE
    from gateway.registry.source import read_source_data

    document = world.registry.document
    data = read_source_data(DEMO_SOURCE)
    data["version"] = int(document["version"]) + 1
    for group in ("members", "authorities"):
        listed = {m["uscc"]: m for m in document.get(group) or []}
        for entry in data.get(group) or []:
            for field_name in ("endpoint", "certificates"):
                if listed.get(entry["uscc"], {}).get(field_name):
                    entry[field_name] = listed[entry["uscc"]][field_name]
    return data


def _publish_source(world: DemoWorld, clock: Callable[[], _dt.datetime], data: dict[str, Any],
                    keys: dict[str, Any], certs: dict[str, Any]) -> None:
    """The registry authority signs ``data`` as a snapshot issued now; every gateway applies it."""
    from gateway.demo.registry import DEMO_SOURCE
    from gateway.registry.snapshot import build_snapshot
    from gateway.registry.source import parse_source

    reg = world.registry
    source = parse_source(json.dumps(data, ensure_ascii=False), origin=str(DEMO_SOURCE), is_json=True)
    document = build_snapshot(source, key=reg.authority_key, cert=reg.authority_cert, issued=clock())
    world.publish(DemoRegistry(document, reg.authority_key, reg.authority_cert, {**reg.member_keys, **keys},
                               {**reg.member_certs, **certs}))


def _add_gateway(world: DemoWorld, clock: Callable[[], _dt.datetime], member: DemoMember, url: str, *,
                 log_level: str) -> DemoGateway:
    """A gateway for ``member`` in its own folder, signing with the key the world's registry holds for it."""
    from gateway import auth
    from gateway.audit.log import ensure_schema as ensure_audit_schema
    from gateway.audit.records import Party
    from gateway.pipeline import Pipeline

    reg = world.registry
    home = world.base / member.key
    _write_private(home / "keys" / "DEMO-signing.key.pem", private_key_pem(reg.member_keys[member.uscc]))
    (home / "keys" / "DEMO-signing.cert.pem").write_bytes(cert_pem(reg.member_certs[member.uscc]))
    reg_dir = world.base / "registry"
    settings = load_settings(environ={}, overrides={
        "data_dir": str(home), "issuer_uscc": member.uscc, "issuer_name": member.name,
        "registry_snapshot": str(reg_dir / "snapshot.json"), "registry_authority": str(reg_dir / "authority.pem"),
        "signing_key": str(home / "keys" / "DEMO-signing.key.pem"),
        "signing_cert": str(home / "keys" / "DEMO-signing.cert.pem"), "public_url": url, "log_level": log_level})
    pipeline = Pipeline(settings, clock=clock)
    ensure_audit_schema(pipeline.store.db)
    _, token = auth.add_user(pipeline.store.db, "demo-admin", ["admin"], at=clock(),
                             gateway=Party.member(member.uscc), by=Party.user(member.uscc, "demo"))
    gateway = DemoGateway(member, settings, pipeline, None, url, token)
    world.gateways[member.key] = gateway
    return gateway


def _toml_value(value: str | int) -> str:
    return str(value) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)


def leave_configs(world: DemoWorld, now: _dt.datetime, *, mappings_dir: str | None = None) -> dict[str, Path]:
    """Leave each member's folder ready for ``gateway --config <folder>/gateway.toml serve``; returns the files.

    The story ran on story time; a gateway that is served runs on the real clock. So the registry authority
    publishes a new snapshot as of ``now`` (the next version, with certificates valid from now and each member's
    endpoint on loopback at :data:`SERVE_PORTS`), and every member gets its key (mode 0600) and certificate for
    it. Every path in a member's ``gateway.toml`` lies inside the demo's folder; an administrator's API token
    of each gateway is in ``<folder>/admin.token`` (mode 0600).
    """
    base = world.base.resolve()
    endpoints = {MEMBERS[k].uscc: f"http://127.0.0.1:{SERVE_PORTS[k][0]}" for k in world.gateways if k in MEMBERS}
    registry = build_demo_registry(now, version=int(world.registry.document["version"]) + 1, endpoints=endpoints)
    reg_dir = base / "registry"
    (reg_dir / "authority.pem").write_bytes(cert_pem(registry.authority_cert))
    (reg_dir / "snapshot.json").write_text(registry.text(), encoding="utf-8")
    written: dict[str, Path] = {}
    for key, gw in world.gateways.items():
        if key not in SERVE_PORTS:
            continue  # an authority's gateway ran for the story only
        member, home = gw.member, base / key
        key_file, cert_file = home / "keys" / "DEMO-signing.key.pem", home / "keys" / "DEMO-signing.cert.pem"
        _write_private(key_file, private_key_pem(registry.member_keys[member.uscc]))
        cert_file.write_bytes(cert_pem(registry.member_certs[member.uscc]))
        _write_private(home / "admin.token", (gw.token + "\n").encode("ascii"))
        http_port, mllp_port = SERVE_PORTS[key]
        settings: dict[str, str | int] = {
            "issuer_uscc": member.uscc, "issuer_name": member.name, "data_dir": str(home),
            "http_port": http_port, "mllp_port": mllp_port, "public_url": endpoints[member.uscc],
            "registry_snapshot": str(reg_dir / "snapshot.json"), "registry_authority": str(reg_dir / "authority.pem"),
            "signing_key": str(key_file), "signing_cert": str(cert_file),
        }
        if mappings_dir:
            settings["mappings_dir"] = str(Path(mappings_dir).resolve())
        lines = [f"# {member.name} {member.uscc}: DEMO gateway left by `gateway demo --dir`.",
                 f"# Run it with: gateway --config {home / 'gateway.toml'} serve"]
        lines += [f"{name} = {_toml_value(value)}" for name, value in settings.items()]
        (home / "gateway.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[key] = home / "gateway.toml"
    return written
