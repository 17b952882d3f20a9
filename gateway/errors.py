"""Errors: the one exception tree of the gateway.

Every error carries a machine ``code``, a human ``message`` and a ``location``
(an HL7 v2 field such as ``"OBX[2]-5"``, a FHIRPath such as
``"Observation.valueQuantity"``, an XPath or a CSV column). The HTTP API renders
any of them as one OperationOutcome (``gateway.api.errors``), the HL7 listener
as an ACK with ERR segments, and the CLI as one readable line.

::

    GatewayError
      InputError            400/422, ACK AE (AR when unsupported)
        UnsupportedFormat   ACK AR
        ParseError
        MappingError
          UnmappedCode
        IdentifierError
        InvalidSearch       400
      ProfileViolation      422, carries issues[]
      TrustError            401/403
        BadSignature        (says nothing about why)
        UnknownIssuer
        IssuerNotQualified
      ExchangeError         502
        PeerUnavailable
        PeerRejected
      NotFound              404
      ConfigError           exit 2 at start-up
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = [
    "GatewayError",
    "InputError",
    "UnsupportedFormat",
    "ParseError",
    "MappingError",
    "UnmappedCode",
    "IdentifierError",
    "InvalidSearch",
    "ProfileViolation",
    "TrustError",
    "BadSignature",
    "UnknownIssuer",
    "IssuerNotQualified",
    "ExchangeError",
    "PeerUnavailable",
    "PeerRejected",
    "NotFound",
    "WaitingBehind",
    "ConfigError",
    "Issue",
    "shown",
]

#: How much of an offending value an issue quotes, and how long an issue's text may get at all.
SHOWN_CHARS = 60
_MAX_MESSAGE = 400
_LONG_WORD = 200
_LONG_RUN = re.compile(r"[^\s,;]{%d,}" % (_LONG_WORD + 1))
_LONG_STEP = re.compile(r"[^\s.\[\]/]{%d,}" % (_LONG_WORD // 2 + 1))


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an issue's text: at most ``limit`` characters, then how long it was.

    Answers (ACKs, OperationOutcomes, CLI lines) never echo an unbounded value back.
    """
    text = str(Decimal(value)) if type(value) is int else str(value)  # (str() refuses ints of over 4,300 digits)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


@dataclass(frozen=True)
class Issue:
    """One finding about an input: where it is, how bad, and what is wrong.

    ``severity`` is ``error`` (the input is refused), ``warning`` (accepted but
    worth a look, e.g. an unmapped code) or ``information``.
    ``code`` follows the FHIR IssueType value set (``invalid``, ``value``,
    ``required``, ``code-invalid``, ``not-supported``, ``duplicate``, ...).
    ``hl7_error`` is the HL7 table 0357 code used in ACK ERR segments.
    """

    severity: str
    code: str
    location: str
    message: str
    hl7_error: str = "207"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # the last guard against echoing unbounded input: a value quoted whole (a word of the text longer than
        # any XPath or FHIRPath we write, a step of a location longer than any name) is cut to a prefix, and no
        # text gets longer than _MAX_MESSAGE
        for name in ("message", "location"):
            text = getattr(self, name)
            run, longest = (_LONG_RUN, _LONG_WORD) if name == "message" else (_LONG_STEP, _LONG_WORD // 2)
            if len(text) > longest:  # (a location's steps: an element name that was sent, a column's name)
                text = run.sub(lambda m: f"{m.group(0)[:SHOWN_CHARS]}… ({len(m.group(0))} characters)", text)
            if len(text) > _MAX_MESSAGE:
                text = f"{text[:_MAX_MESSAGE - 60]}… ({len(text)} characters)"
            object.__setattr__(self, name, text)

    def line(self) -> str:
        """One readable line: ``OBX[3]-5 'abc' is not a number ...``."""
        if not self.location or self.message.startswith(self.location):  # (a message naming its place itself)
            return self.message
        return f"{self.location} {self.message}"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    code = "exception"
    http_status = 500
    hl7_error = "207"  # application internal error

    def __init__(self, message: str, location: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        if code is not None:
            self.code = code

    def issues(self) -> list[Issue]:
        """The error as a list of issues (one, unless the subclass carries many)."""
        return [Issue("error", self.code, self.location, self.message, self.hl7_error)]

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class InputError(GatewayError):
    """What a member system sent cannot be accepted as it is."""

    code = "invalid"
    http_status = 422
    hl7_error = "102"


class Conflict(InputError):
    """What was sent contradicts what is held here under the same name (a Bundle's id naming another report)."""

    code = "conflict"
    http_status = 409


class UnsupportedFormat(InputError):
    """Message type, version or document type the gateway does not take."""

    code = "not-supported"
    http_status = 415
    hl7_error = "200"


class ParseError(InputError):
    """The input is not well-formed for its format."""

    code = "structure"
    http_status = 400
    hl7_error = "100"


class MappingError(InputError):
    """A value could not be mapped through the tables in ``mappings/``."""

    code = "code-invalid"
    hl7_error = "103"


class UnmappedCode(MappingError):
    """A code is mapped to nothing on purpose (empty target in a concept table)."""


class IdentifierError(InputError):
    """An identifier (身份证号, 统一社会信用代码, ...) fails its check algorithm."""

    code = "value"
    hl7_error = "102"


class InvalidSearch(InputError):
    """A search or paging parameter is unknown or malformed."""

    code = "invalid"
    http_status = 400


class ProfileViolation(InputError):
    """A resource breaks one of our profiles; carries every issue found."""

    code = "invariant"
    http_status = 422

    def __init__(self, issues: list[Issue], message: str = "resource does not conform to its profile") -> None:
        super().__init__(message, issues[0].location if issues else "")
        self._issues = list(issues)

    def issues(self) -> list[Issue]:
        return list(self._issues)


class TrustError(GatewayError):
    """Who sent or signed something cannot be trusted for it."""

    code = "security"
    http_status = 403


class BadSignature(TrustError):
    """A signature does not verify. Deliberately says nothing about why."""

    http_status = 401

    def __init__(self, message: str = "signature verification failed", location: str = "Bundle.signature") -> None:
        super().__init__(message, location)


class UnknownIssuer(TrustError):
    """The issuer or signer is not in the registry snapshot.

    ``member``: the member a trusted registry authority certified (its 统一社会信用代码, proven by that
    certificate) when the refusal is that it is not listed at the time (removed, i.e. revoked); None when the
    signer cannot be told (a certificate no trusted authority issued, or one that names no member).
    """

    def __init__(self, message: str, location: str = "", *, code: str | None = None,
                 member: str | None = None) -> None:
        super().__init__(message, location, code=code)
        self.member = member


class IssuerNotQualified(TrustError):
    """The issuer is known but not qualified for what it issued."""


class ExchangeError(GatewayError):
    """Talking to another member gateway failed."""

    code = "transient"
    http_status = 502


class PeerUnavailable(ExchangeError):
    """The peer could not be reached or answered 5xx/timeout: retry later."""


class PeerRejected(ExchangeError):
    """The peer refused what we sent (4xx): retrying will not help."""


class NotFound(GatewayError):
    """A resource or record that was asked for does not exist."""

    code = "not-found"
    http_status = 404


class DatabaseUnavailable(GatewayError):
    """The database cannot be reached or refused the connection (a PostgreSQL server down, a wrong password)."""

    code = "transient"
    http_status = 503
    #: Why, in the server's or driver's words, without which database it is (for what anyone may read).
    reason = ""


class WaitingBehind(GatewayError):
    """A message that cannot be worked now: earlier messages of its sender wait in the processing queue, and a
    sender's messages are recorded in the order they came. A passing state: the sender sends it again."""

    code = "transient"
    http_status = 503


class ConfigError(GatewayError):
    """Configuration, mapping tables or profiles are wrong: the gateway does not start."""

    code = "exception"
    http_status = 500
