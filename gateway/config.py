"""Config: the gateway's settings and how they are layered.

Layers, later wins: built-in defaults < TOML file (``GATEWAY_CONFIG`` or
``--config``) < ``GATEWAY_<NAME>`` environment variables < command-line flags.
Every setting has a default and help text; ``gateway settings`` lists them.
Secrets (private keys) are only ever *paths* to files outside the repository.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, IdentifierError
from gateway.identifiers import check_uscc

__all__ = ["Settings", "load_settings", "REPO_ROOT", "settings_help"]

#: The checkout this package runs from; mappings/ and profiles/ live here.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Settings of one member gateway. Frozen: build a new one with ``replace``."""

    data_dir: str = _opt("./gateway-data", "Directory for the SQLite database and spooled files.")
    database: str = _opt("", "SQLite database file; empty means <data_dir>/gateway.db.")
    mappings_dir: str = _opt(str(REPO_ROOT / "mappings"), "Directory of the mapping tables (mappings/).")
    profiles_dir: str = _opt(str(REPO_ROOT / "profiles"), "Directory of the implementation guide (profiles/).")
    issuer_uscc: str = _opt(
        "12511900MB0000000E", "统一社会信用代码 of this member: the issuer of the results it sends (GB 32100 checked)."
    )
    issuer_name: str = _opt("示范医院（演示）", "Name of this member institution.")
    issuer_miplrn: str = _opt("", "医疗机构执业许可证登记号 of this member, if it has one.")
    timezone: str = _opt("+08:00", "UTC offset given to source times that carry none (China Standard Time).")
    http_host: str = _opt("127.0.0.1", "Address the HTTP API listens on.")
    http_port: int = _opt(8080, "Port of the HTTP API.")
    mllp_host: str = _opt("127.0.0.1", "Address the MLLP listener listens on.")
    mllp_port: int = _opt(2575, "Port of the MLLP listener; 0 disables it.")
    mllp_workers: int = _opt(1, "MLLP listener processes sharing the port, each working its own connections' "
                             "messages (up to the number of cores).")
    mllp_ack: str = _opt(
        "processed",
        "When the MLLP listener answers: 'processed' (the ACK carries the outcome, AA/AE/AR with the fields in error) "
        "or 'received' (accept, then process: the ACK - CA in enhanced mode, else AA - says the raw message is "
        "stored; a queue reader works it next, in arrival order, and keeps its application ACK for `gateway "
        "messages show`). A message whose MSH is already wrong is answered with its error either way.")
    workers: int = _opt(2, "HTTP worker processes (gunicorn).")
    threads: int = _opt(4, "Threads per HTTP worker.")
    max_message_bytes: int = _opt(1_048_576, "Largest single HL7 v2 message or document accepted, in bytes.")
    max_request_bytes: int = _opt(16_777_216, "Largest HTTP request body accepted, in bytes.")
    ack_application: str = _opt("CYHR-GATEWAY", "MSH-3 of the ACKs this gateway sends.")
    public_url: str = _opt("", "URL other members reach this gateway at (as listed in the registry); "
                           "empty means http://<http_host>:<http_port>.")
    registry_snapshot: str = _opt("", "Signed registry snapshot file (from the registry authority).")
    registry_authority: str = _opt(
        str(REPO_ROOT / "certs" / "registry-authority.pem"),
        "Certificate (PEM) of the registry authority that signs snapshots.")
    signing_key: str = _opt("", "This member's private signing key (PEM file outside the repository; mode 0600).")
    signing_cert: str = _opt("", "This member's signing certificate (PEM), issued by the registry authority.")
    delivery_interval: int = _opt(5, "Seconds between passes of the background loop (outbox delivery, audit "
                                  "checkpoints) in `gateway serve`.")
    log_level: str = _opt("INFO", "Logging level (DEBUG, INFO, WARNING, ERROR).")

    @property
    def base_url(self) -> str:
        """Where other members reach this gateway."""
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    @property
    def database_path(self) -> Path:
        """The SQLite file this gateway uses."""
        return Path(self.database) if self.database else Path(self.data_dir) / "gateway.db"

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some settings changed (validated again)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Check values that would otherwise fail late.

        :raises ConfigError: a setting has an unusable value.
        """
        try:
            check_uscc(self.issuer_uscc)
        except IdentifierError as exc:
            raise ConfigError(exc.message, "issuer_uscc") from None
        if not _valid_offset(self.timezone):
            raise ConfigError(f"timezone {self.timezone!r} must look like +08:00", "timezone")
        for name in ("http_port", "mllp_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} {port} is not a TCP port", name)
        if self.mllp_ack not in ("processed", "received"):
            raise ConfigError(f"mllp_ack {self.mllp_ack!r} must be 'processed' or 'received'", "mllp_ack")
        for name in ("max_message_bytes", "max_request_bytes", "workers", "threads", "delivery_interval",
                     "mllp_workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive", name)


def _valid_offset(text: str) -> bool:
    return (
        len(text) == 6
        and text[0] in "+-"
        and text[1:3].isdigit()
        and text[3] == ":"
        and text[4:].isdigit()
        and int(text[1:3]) <= 14
    )


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if kind in (int, "int"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {value!r}", name) from None
    return str(value)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from defaults, a TOML file, ``GATEWAY_*`` env and overrides.

    :raises ConfigError: unreadable file, unknown key or invalid value.
    """
    env = os.environ if environ is None else environ
    known = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or env.get("GATEWAY_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", "GATEWAY_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", "GATEWAY_CONFIG") from None
        section = data.get("gateway", data)
        for key, value in section.items():
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r}", key)
            values[key] = _coerce(key, known[key], value)

    for key, kind in known.items():
        env_value = env.get(f"GATEWAY_{key.upper()}")
        if env_value is not None:
            values[key] = _coerce(key, kind, env_value)

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}", key)
        values[key] = _coerce(key, known[key], value)

    settings = Settings(**values)
    settings.validate()
    return settings


def settings_table() -> str:
    """The README's settings table (Markdown), generated so that the two never disagree."""
    rows = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for name, default, text in settings_help():
        shown = default.replace(str(REPO_ROOT), "<checkout>")  # the same table on every machine
        rows.append(f"| `{name}` | `GATEWAY_{name.upper()}` | `{shown}` | {text} |")
    return "\n".join(rows) + "\n"


def settings_help() -> list[tuple[str, str, str]]:
    """(name, default, help) for every setting, for ``gateway settings`` and the README."""
    return [(f.name, repr(f.default), f.metadata["help"]) for f in fields(Settings)]


if __name__ == "__main__":  # print the README's settings table
    print(settings_table(), end="")
