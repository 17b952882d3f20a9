"""Date and time: source timestamps to FHIR ``date``/``dateTime``/``instant``.

Sources (HL7 v2 TS/DTM, CDA TS, CSV exports) write ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]``
or ``YYYY-MM-DD[ HH:MM[:SS]]``. FHIR requires an offset whenever a time is
given, so a time without one gets the gateway's configured offset (+08:00,
China Standard Time) — never a bare local time.
"""
from __future__ import annotations

import datetime as _dt
import re

from gateway.errors import shown

__all__ = ["to_fhir_datetime", "convert_datetime", "to_fhir_date", "to_fhir_instant", "parse_fhir_datetime",
           "DateTimeError", "seconds_since"]

_HL7_TS = re.compile(
    r"^(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})"
    r"(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?(?P<tz>[+-]\d{4})?$",  # (each part after the one before it)
    re.ASCII,  # (digits are 0-9: Python's \d and int() take ٢٠٢٤ for 2024 as well)
)
_ISO_LIKE = re.compile(
    r"^(?P<y>\d{4})-(?P<mo>\d{1,2})-(?P<d>\d{1,2})"
    r"(?:[ T](?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?$", re.ASCII
)
_SLASHED = re.compile(  # 2024/3/15 8:30, and 2024.03.15 as spreadsheets in China also write it
    r"^(?P<y>\d{4})(?P<sep>[/.])(?P<mo>\d{1,2})(?P=sep)(?P<d>\d{1,2})"
    r"(?:\s+(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2}))?)?$", re.ASCII
)
_CHINESE = re.compile(  # 2024年3月15日, 2024年3月15日 8:30
    r"^(?P<y>\d{4})年(?P<mo>\d{1,2})月(?P<d>\d{1,2})日(?:\s*(?P<h>\d{1,2})[:：](?P<mi>\d{2})(?:[:：](?P<s>\d{2}))?)?$",
    re.ASCII,
)


class DateTimeError(ValueError):
    """A timestamp that is not a real date or time; the message says why."""


def _offset(tz: str | None, default: str) -> str:
    if not tz:
        return default
    if tz == "Z":
        return "+00:00"
    tz = tz.replace(":", "")
    hours, minutes = int(tz[1:3]), int(tz[3:5])
    if hours > 14 or minutes > 59:
        raise DateTimeError(f"time zone offset {tz} is out of range")
    return f"{tz[0]}{tz[1:3]}:{tz[3:5]}"


#: Full-width forms of ASCII and the ideographic space, as their ASCII characters (２０２４年３月１５日 typed with a
#: Chinese input method is the date it shows); as ``gateway.adapters.base.FULL_WIDTH``.
_FULL_WIDTH = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: 0x20}


def _parts(text: str) -> dict[str, str | None]:
    value = text.strip()
    if not value.isascii():
        value = value.translate(_FULL_WIDTH)
        if "日" in value and "时" in value:  # 2024年03月05日 08时30分(15秒): the hour and minute as words
            value = value.replace("时", ":").replace("分", ":").replace("秒", "").rstrip(":")
    for pattern in (_HL7_TS, _ISO_LIKE, _SLASHED, _CHINESE):
        m = pattern.match(value)
        if m:
            return m.groupdict()
    raise DateTimeError(f"{shown(text)} is not a date/time (expected e.g. 2024-03-15 08:30:00, 20240315083000, "
                        "2024/3/15 8:30, 2024.03.15 or 2024年3月15日)")


# What to_fhir_datetime answered for the timestamps seen last: a message's results, an export's exams, mostly
# share a handful of them. A value, or a 1-tuple holding the error's text; short texts only; emptied when full.
_SEEN: dict[tuple[str, str], str | tuple[str]] = {}
_SEEN_MAX = 512  # (a batch of 32 messages has some 150 distinct ones; 512 hold about 100 KiB)
_SEEN_LONGEST = 40  # (the longest timestamp any source writes is 35 characters)


def to_fhir_datetime(text: str, default_offset: str = "+08:00") -> str:
    """A FHIR ``dateTime`` from a source timestamp, keeping its precision.

    Date-only values stay dates (``2024-03-05``); a value with a time gets
    seconds and an offset (``2024-03-05T08:30:00+08:00``). What it answers is
    :func:`convert_datetime`'s, remembered for the timestamps seen last.

    :raises DateTimeError: not a timestamp, or not a real calendar date/time.
    """
    key = (text, default_offset)
    found = _SEEN.get(key)
    if found is None:
        try:
            found = convert_datetime(text, default_offset)
        except DateTimeError as exc:
            found = (str(exc),)
        if len(text) <= _SEEN_LONGEST:
            if len(_SEEN) >= _SEEN_MAX:
                _SEEN.clear()
            _SEEN[key] = found
    if type(found) is str:
        return found
    raise DateTimeError(found[0])


def convert_datetime(text: str, default_offset: str = "+08:00") -> str:
    """:func:`to_fhir_datetime` worked out every time (the reference its remembered answers are held to).

    :raises DateTimeError: not a timestamp, or not a real calendar date/time.
    """
    p = _parts(text)
    year = int(p["y"] or 0)
    if year < 1800:
        raise DateTimeError(f"year {year} in {shown(text)} is implausible")
    if not p["mo"]:
        return f"{year:04d}"
    month = int(p["mo"])
    if not 1 <= month <= 12:
        raise DateTimeError(f"month {month} in {shown(text)} does not exist")
    if not p["d"]:
        return f"{year:04d}-{month:02d}"
    try:
        day = _dt.date(year, month, int(p["d"]))
    except ValueError:
        raise DateTimeError(f"{shown(text)} is not a calendar date") from None
    if p["h"] is None:
        return day.isoformat()
    hour, minute, second = int(p["h"]), int(p["mi"] or 0), int(p["s"] or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise DateTimeError(f"time in {shown(text)} does not exist")
    frac = f".{p['f']}" if p.get("f") else ""
    return f"{day.isoformat()}T{hour:02d}:{minute:02d}:{second:02d}{frac}{_offset(p.get('tz'), default_offset)}"


def to_fhir_date(text: str) -> str:
    """A FHIR ``date`` (time part dropped).

    :raises DateTimeError: not a date.
    """
    return to_fhir_datetime(text)[:10]


def to_fhir_instant(text: str, default_offset: str = "+08:00") -> str:
    """A FHIR ``instant``: needs at least seconds and an offset.

    :raises DateTimeError: not a timestamp, or only a date (an instant needs a time).
    """
    value = to_fhir_datetime(text, default_offset)
    if "T" not in value:
        raise DateTimeError(f"{shown(text)} has no time of day, an instant needs one")
    return value


def parse_fhir_datetime(value: str) -> _dt.datetime:
    """A timezone-aware datetime from a FHIR dateTime/instant (date-only: midnight +08:00).

    :raises DateTimeError: not a FHIR dateTime.
    """
    try:
        if "T" not in value:
            parts = [int(x) for x in value.split("-")] + [1, 1]
            return _dt.datetime(parts[0], parts[1], parts[2], tzinfo=_dt.timezone(_dt.timedelta(hours=8)))
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, IndexError):
        raise DateTimeError(f"{shown(value)} is not a FHIR dateTime") from None


def seconds_since(stamp: str | None, now: _dt.datetime) -> float | None:
    """Seconds from an ISO time the gateway wrote (a naive one is in ``now``'s offset) to ``now``.

    None when there is no time or it cannot be read; negative when the time is after ``now``.
    """
    if not stamp:
        return None
    try:
        then = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=now.tzinfo)
    return (now - then).total_seconds()
