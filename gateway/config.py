"""Config: the gateway's settings and how they are layered.

Layers, later wins: built-in defaults < TOML file (``GATEWAY_CONFIG`` or
``--config``) < ``GATEWAY_<NAME>`` environment variables < command-line flags.
Every setting has a default and help text; ``gateway settings`` lists them.
Secrets (private keys) are only ever *paths* to files outside the repository.
A relative path in a config file is taken relative to that file's folder, so a
member's folder (config, keys, snapshot, data) can be moved or run from anywhere.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, IdentifierError
from gateway.identifiers import check_uscc

__all__ = ["Settings", "load_settings", "REPO_ROOT", "PATH_SETTINGS", "settings_help", "LOG_LEVELS"]

#: The checkout this package runs from; mappings/ and profiles/ live here.
REPO_ROOT = Path(__file__).resolve().parent.parent


#: The shortest ``hung_restart_after`` (but 0): five heartbeats (gateway.heartbeat.BEAT_SECONDS).
HUNG_RESTART_MINIMUM = 10

#: The levels ``log_level`` takes, in any case (kept upper-case: ``debug`` is ``DEBUG``).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: A locator with a scheme (``mysql://``, ``sqlite:///``): a database URL, never a SQLite file's name.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


#: What ``public_url`` may be: an http(s) URL of a host (a port and a path allowed), no query, fragment or spaces.
_PUBLIC_URL = re.compile(r"https?://[^\s/?#@]+(?:/[^\s?#]*)?", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """Settings of one member gateway. Frozen: build a new one with ``replace``."""

    data_dir: str = _opt("./gateway-data", "Directory for the SQLite database and spooled files.")
    database: str = _opt("", "The database: a SQLite file (empty means <data_dir>/gateway.db), or a PostgreSQL URL "
                         "postgresql://user@host:port/dbname (the password from PGPASSWORD or ~/.pgpass).")
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
    queue_readers: int = _opt(1, "With mllp_ack = 'received': queue reader processes working the queue together. "
                              "Several take the next messages of any sender, four at a time, and work them side "
                              "by side; each message is recorded once every earlier message of its sender has "
                              "its outcome, so a sender's messages are recorded in arrival order all the same. "
                              "On 2 cores or more set 2: on this project's 2-core machine two stored some 20% "
                              "more than one (188 to 197 messages/s at 200 offered on a quick hour, 163 to 180 on "
                              "a slow one), the receipts' ACK p99 a few ms higher (the README's performance "
                              "section). On one core keep 1.")
    queue_reader_nice: int = _opt(10, "With mllp_ack = 'received': how much less CPU priority the queue readers "
                                  "take than the listeners (Unix nice, 0 to 19; 0: the same), so that a receipt "
                                  "is not kept waiting for a core the readers' work holds. The readers still have "
                                  "every core nothing else wants.")
    queue_record_group: int = _opt(1, "With mllp_ack = 'received': messages a queue reader records per "
                                   "transaction, each in a savepoint of its own. More makes the reader faster "
                                   "(4: some 15% on a 2-core machine) and the receipts slower, since the "
                                   "listeners wait for the write lock while it writes (ACK p99 some 10 ms more).")
    mllp_ack: str = _opt(
        "processed",
        "When the MLLP listener answers: 'processed' (the ACK carries the outcome, AA/AE/AR with the fields in error) "
        "or 'received' (accept, then process: the ACK - CA in enhanced mode, else AA - says the raw message is "
        "stored; a queue reader works it next, in arrival order, and keeps its application ACK for `gateway "
        "messages show`). A message whose MSH is already wrong is answered with its error either way.")
    workers: int = _opt(2, "HTTP worker processes (waitress, each reading whole requests in an event loop).")
    threads: int = _opt(4, "Threads per HTTP worker.")
    max_message_bytes: int = _opt(1_048_576, "Largest single HL7 v2 message or document accepted, in bytes.")
    max_request_bytes: int = _opt(16_777_216, "Largest HTTP request body accepted, in bytes.")
    ack_application: str = _opt("CYHR-GATEWAY", "MSH-3 of the ACKs this gateway sends.")
    public_url: str = _opt("", "URL other members reach this gateway at (as listed in the registry: its base URL; "
                           "a FHIR base ending in /fhir means the same); empty means http://<http_host>:<http_port>.")
    registry_snapshot: str = _opt("", "Signed registry snapshot file (from the registry authority).")
    registry_authority: str = _opt(
        str(REPO_ROOT / "certs" / "registry-authority.pem"),
        "Certificate (PEM) of the registry authority that signs snapshots.")
    signing_key: str = _opt("", "This member's private signing key (PEM file outside the repository; mode 0600).")
    signing_cert: str = _opt("", "This member's signing certificate (PEM), issued by the registry authority.")
    signing_key_password_file: str = _opt(
        "", "File holding the password of an encrypted signing key (outside the repository; mode 0600). "
        "Empty: the key is not encrypted.")
    mllp_idle_timeout: int = _opt(600, "Seconds an MLLP connection may stay idle between messages before the "
                                  "gateway closes it.")
    mllp_read_timeout: int = _opt(30, "Seconds an MLLP sender has to finish a message once its first byte "
                                  "arrived; a connection that trickles is closed (nothing partial is stored).")
    http_read_timeout: int = _opt(30, "Seconds an HTTP client has to send a whole request (headers and body) "
                                  "once it started; slower clients are disconnected without holding a worker.")
    http_idle_timeout: int = _opt(60, "Seconds an idle keep-alive HTTP connection is kept open.")
    http_connection_limit: int = _opt(1000, "Open HTTP connections accepted per worker process; slow clients "
                                      "wait in the event loop, not in a worker thread.")
    processing_lease: int = _opt(300, "Seconds a process holds a message it is working on. A message whose "
                                 "holder died (its lease expired) is worked again at start, by the queue "
                                 "reader, or when its sender resends it.")
    delivery_interval: int = _opt(5, "Seconds between passes of the background loop (outbox delivery, audit "
                                  "checkpoints) in `gateway serve`.")
    delivery_timeout: int = _opt(30, "Seconds to wait for another member's gateway to answer one delivery.")
    delivery_concurrency: int = _opt(2, "Deliveries in flight at once per destination. Each destination has its "
                                     "own lane, so a slow or hung member never delays deliveries to others.")
    snapshot_warn_days: int = _opt(2, "/health answers 503 when the registry snapshot expires within this many "
                                   "days (a new snapshot must be installed before then).")
    certificate_warn_days: int = _opt(14, "/health answers 503 when this member's signing certificate expires "
                                      "within this many days (the registry authority issues a new one).")
    health_max_backlog: int = _opt(1000, "/health answers 503 when more messages than this wait in the "
                                   "processing queue.")
    health_max_backlog_age: int = _opt(300, "/health answers 503 when the oldest message waiting in the "
                                       "processing queue has waited longer than this, in seconds.")
    health_max_delivery_wait: int = _opt(3600, "/health answers 503 when a delivery to another member has waited "
                                         "longer than this, in seconds.")
    restart_limit: int = _opt(5, "`gateway serve` restarts a dead process of its own (HTTP worker, MLLP listener, "
                              "queue reader, background loop); more restarts than this within 10 minutes and the "
                              "whole gateway stops with a non-zero exit instead of running half. A process that cannot "
                              "reach the database as it starts is started again until it answers, not counted.")
    hung_restart_after: int = _opt(30, "`gateway serve` kills and starts again a process of its own that has not "
                                   "reported alive for this many seconds, at least 10 (they report every 2 s): an "
                                   "MLLP listener, queue reader, background loop or catch-up that hangs (a blocked "
                                   "event loop, a stopped process, a pass that never ends), which may hold the "
                                   "database's write lock meanwhile. The restart counts toward restart_limit. 0: never "
                                   "(a WARNING line says it once).")
    metrics_token_file: str = _opt(
        "", "File holding the bearer token that GET /metrics requires (outside the repository; mode 0600). Empty: "
        "/metrics is open to whoever reaches the HTTP port, so serve it on an internal interface only.")
    log_format: str = _opt("text", "Log lines of every process: 'text' (timestamp, level, logger, message) or "
                           "'json' (one JSON object a line: timestamp, level, process, request id, user, route, "
                           "status, latency; never patient data).")
    http_first_byte_timeout: int = _opt(10, "Seconds a new HTTP connection has to send the first byte of its "
                                        "request; a connection that sends nothing is closed.")
    http_connections_per_client: int = _opt(100, "Open HTTP connections one client address may hold per worker "
                                            "process; past it, the client's oldest idle connection is closed.")
    cors_origins: str = _opt("", "Comma-separated origins (https://app.example.org) whose browser pages may call "
                             "the FHIR API (CORS); empty: none (the default).")
    log_level: str = _opt("INFO", "Logging level (DEBUG, INFO, WARNING, ERROR).")

    def __post_init__(self) -> None:
        if isinstance(self.log_level, str):  # (``debug`` in a config file or GATEWAY_LOG_LEVEL means DEBUG)
            object.__setattr__(self, "log_level", self.log_level.strip().upper())

    @property
    def base_url(self) -> str:
        """Where other members reach this gateway."""
        base = (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")
        return base.removesuffix("/fhir")  # the FHIR base given for the gateway's base: the same gateway

    @property
    def database_locator(self) -> Path | str:
        """The database this gateway uses: a SQLite file (a Path), or a ``postgresql://`` URL (a str)."""
        if self.database.startswith(("postgresql://", "postgres://")):
            return self.database
        return Path(self.database) if self.database else Path(self.data_dir) / "gateway.db"

    @property
    def database_file(self) -> Path | None:
        """The SQLite file this gateway uses, or None when its database is PostgreSQL."""
        locator = self.database_locator
        return locator if isinstance(locator, Path) else None

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
        if self.public_url and not _PUBLIC_URL.fullmatch(self.public_url):
            # (every link the gateway answers, and the audience of SMART assertions, are made from it)
            raise ConfigError(f"public_url {self.public_url[:80]!r} must be an http or https URL, such as "
                              "https://gw.tongjiang.example (no query or fragment)", "public_url")
        if not 0 <= self.queue_reader_nice <= 19:
            raise ConfigError(f"queue_reader_nice {self.queue_reader_nice} must be 0 to 19 (0: the listeners' own "
                              "priority)", "queue_reader_nice")
        for name in ("max_message_bytes", "max_request_bytes", "workers", "threads", "delivery_interval",
                     "mllp_workers", "queue_readers", "queue_record_group", "mllp_idle_timeout", "mllp_read_timeout",
                     "http_read_timeout", "http_idle_timeout", "http_connection_limit", "processing_lease",
                     "delivery_timeout", "delivery_concurrency", "health_max_backlog", "health_max_backlog_age",
                     "health_max_delivery_wait", "restart_limit", "http_first_byte_timeout",
                     "http_connections_per_client"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive", name)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format {self.log_format!r} must be 'text' or 'json'", "log_format")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not a logging level: write one of "
                              f"{', '.join(LOG_LEVELS)} (in any case)", "log_level")
        for name in ("snapshot_warn_days", "certificate_warn_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative", name)
        if self.hung_restart_after != 0 and self.hung_restart_after < HUNG_RESTART_MINIMUM:
            raise ConfigError(f"hung_restart_after {self.hung_restart_after} must be 0 (never) or at least "
                              f"{HUNG_RESTART_MINIMUM} seconds: the processes report alive every 2 s, and a "
                              "shorter wait kills healthy ones", "hung_restart_after")
        if self.database.startswith(("postgresql://", "postgres://")):
            check_database_url(self.database)
        elif _URL_SCHEME.match(self.database):
            raise ConfigError(f"database {self.database!r} is neither a SQLite file nor a PostgreSQL URL: write the "
                              "path of the SQLite file, or postgresql://user@host:port/dbname", "database")


def check_database_url(url: str) -> None:
    """A PostgreSQL URL that can be taken apart (libpq reads the rest when it connects: several hosts, a Unix socket
    folder, ``service=``; the password is never repeated).

    :raises ConfigError: it cannot.
    """
    from urllib.parse import urlsplit

    try:
        urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"database URL cannot be read ({exc}): write it as "
                          "postgresql://user@host:port/dbname", "database") from None


#: Settings that name files or directories. In a config file, a relative one is relative to the file's folder;
#: in an environment variable or a flag, to the current directory.
PATH_SETTINGS = frozenset({"data_dir", "database", "mappings_dir", "profiles_dir", "registry_snapshot",
                           "registry_authority", "signing_key", "signing_cert", "signing_key_password_file",
                           "metrics_token_file"})


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
        if isinstance(value, bool):  # (a flag is no number: True is not 1)
            raise ConfigError(f"{name} must be a whole number, not {value!r}", name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {value!r}", name) from None
    return str(value)


def _toml_kind(value: Any) -> str:
    """What a TOML value is, in words, for a message saying it is the wrong kind."""
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, float):
        return f"a decimal number ({value!r})"
    if isinstance(value, int):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (_dt.date, _dt.time)):
        return f"a date or time ({value.isoformat()})"
    return type(value).__name__


def _from_toml(path: str | os.PathLike[str], name: str, kind: Any, value: Any) -> Any:
    """A value of a config file, which must be of its setting's kind: a whole number (or a quoted one, as the
    environment gives it) for a number, text in quotes for the others. Nothing else is converted: ``mllp_port =
    true`` is not port 1, ``http_port = 27310.5`` not 27310, a list not the text ``"['...']"``.

    :raises ConfigError: the value is of another kind, naming the setting and the kind it must be.
    """
    if kind in (int, "int"):
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return _coerce(name, kind, value)
        expected = "a whole number"
    elif isinstance(value, str):
        return value
    else:
        expected = "text in quotes"
    raise ConfigError(f"config file {path}: {name} must be {expected}, not {_toml_kind(value)}", name)


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
        named = "--config" if config_file and str(config_file) != env.get("GATEWAY_CONFIG") else "GATEWAY_CONFIG"
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            # a byte order mark (Windows Notepad saves one) is no part of the TOML
            data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", named) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a TOML file is)", named) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", named) from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory", named) from None
        except OSError as exc:  # (permissions: the service's user may not read it)
            raise ConfigError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__})",
                              named) from None
        section = data.get("gateway", data)
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [gateway] must be a table of settings", named)
        # the settings are either the file's own keys or its [gateway] table's, never both, and no other table is
        # read: keys above a [gateway] table, or a table of another name ([gatway]), were dropped without a word
        # (the gateway ran on another database, under the built-in identity)
        if "gateway" in data:
            others = sorted(k for k in data if k != "gateway")
            if others:
                raise ConfigError(f"config file {path}: {', '.join(repr(k) for k in others[:5])} "
                                  f"{'is' if len(others) == 1 else 'are'} outside its [gateway] table, which holds "
                                  "the settings: put every setting in that table, or none in a table", others[0])
        tables = sorted(k for k, v in section.items() if isinstance(v, dict))
        if tables:
            raise ConfigError(f"config file {path}: [{tables[0]}] is not a table of settings (the settings are keys "
                              "of the file itself, or of one [gateway] table)", tables[0])
        base = Path(path).resolve().parent
        for key, value in section.items():
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r}", key)
            values[key] = _from_toml(path, key, known[key], value)
            if (key in PATH_SETTINGS and values[key] and not Path(values[key]).expanduser().is_absolute()
                    and not _URL_SCHEME.match(str(values[key]))):
                # a relative path in a config file means beside that file, wherever the command runs from
                values[key] = str(base / Path(values[key]).expanduser())

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
