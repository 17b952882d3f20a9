"""Identifiers: check algorithms for Chinese national identifiers.

- 统一社会信用代码 (USCC, GB 32100-2015): 18 characters, check character over a
  31-character set with weights ``3**i mod 31``.
- 组织机构代码 (GB 11714, positions 9-17 of a USCC): mod 11, 10 -> ``X``.
- 公民身份号码 (GB 11643-1999): ISO 7064 MOD 11-2 check digit, embedded birth
  date (never after the message time), address code (GB/T 2260, see
  :mod:`gateway.divisions`), sex from position 17.

Each ``check_*`` function returns the normalised identifier or raises
:class:`~gateway.errors.IdentifierError` with a message a clerk can act on.
"""
from __future__ import annotations

import datetime as _dt
import functools
import re

from gateway.divisions import id_card_region_problem, id_card_region_warning
from gateway.errors import IdentifierError, shown
from gateway.naming import SYSTEM_ID_CARD, SYSTEM_INSTITUTION, SYSTEM_USCC

__all__ = [
    "id_card_or_none",
    "OID_ID_CARD",
    "OID_INSTITUTION",
    "USCC_SYSTEM",
    "uscc_check_char",
    "check_uscc",
    "org_code_check_char",
    "id_card_check_char",
    "check_id_card",
    "id_card_warnings",
    "check_birth_date",
    "message_date",
    "birth_date_problem",
    "id_card_sex",
    "id_card_birth_date",
    "province_of_division",
]

OID_ID_CARD = SYSTEM_ID_CARD
OID_INSTITUTION = SYSTEM_INSTITUTION
USCC_SYSTEM = SYSTEM_USCC

_USCC_CHARSET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = [pow(3, i, 31) for i in range(17)]
_USCC_RE = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-Z]{9}[0-9A-HJ-NPQRTUWXY]$")
_ORG_WEIGHTS = [3, 7, 9, 10, 5, 8, 4, 2]
_ID_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
_ID_RE = re.compile(r"^[0-9]{17}[0-9X]$")
#: Full-width digits and letter X (as a Chinese input method types them) to their ASCII forms.
_FULL_WIDTH_ID = str.maketrans("０１２３４５６７８９Ｘｘ", "0123456789XX")


def uscc_check_char(code17: str) -> str:
    """The GB 32100 check character for the first 17 characters of a USCC.

    :raises IdentifierError: a character outside the USCC character set.
    """
    total = 0
    for pos, (char, weight) in enumerate(zip(code17, _USCC_WEIGHTS), start=1):
        value = _USCC_CHARSET.find(char)
        if value < 0:
            raise IdentifierError(f"统一社会信用代码 character {pos} {char!r} is not allowed (I, O, S, V, Z never occur)")
        total += value * weight
    return _USCC_CHARSET[(31 - total % 31) % 31]


def org_code_check_char(code8: str) -> str:
    """The GB 11714 check character for an 8-character organisation code body."""
    total = 0
    for char, weight in zip(code8, _ORG_WEIGHTS):
        value = int(char) if char.isdigit() else ord(char) - ord("A") + 10
        total += value * weight
    check = 11 - total % 11
    return {10: "X", 11: "0"}.get(check, str(check))


def check_uscc(value: str) -> str:
    """Validate a 统一社会信用代码 and return it upper-cased.

    A code found good is remembered (a received Bundle names its issuer once for every result).

    :raises IdentifierError: wrong length, characters or check character.
    """
    return _checked_uscc(value) if type(value) is str else _check_uscc(value)


def _check_uscc(value: str) -> str:
    code = (value or "").strip().upper()
    if len(code) != 18:
        raise IdentifierError(f"统一社会信用代码 {shown(code)} has {len(code)} characters, expected 18")
    if not _USCC_RE.match(code):
        raise IdentifierError(f"统一社会信用代码 {shown(code)} has characters outside GB 32100")
    expected = uscc_check_char(code[:17])
    if code[17] != expected:
        raise IdentifierError(f"统一社会信用代码 {shown(code)} check character is {code[17]!r}, expected {expected!r}")
    return code


# what check_uscc found good, by the text it was given (an error is not remembered: it is raised again)
_checked_uscc = functools.lru_cache(maxsize=4096)(_check_uscc)


def id_card_check_char(id17: str) -> str:
    """The GB 11643 (ISO 7064 MOD 11-2) check character for 17 digits."""
    total = sum(int(c) * w for c, w in zip(id17, _ID_WEIGHTS))
    return "10X98765432"[total % 11]


_CN = _dt.timezone(_dt.timedelta(hours=8))


def message_date(value: str | None) -> _dt.date:
    """The date a message was written (the date part of its FHIR date/dateTime, as the sender wrote it);
    today in China Standard Time when the message has no usable time."""
    try:
        return _dt.date.fromisoformat(str(value or "")[:10])
    except ValueError:
        return _dt.datetime.now(_CN).date()


def check_birth_date(birth: _dt.date, on: _dt.date | None, what: str = "birth date") -> None:
    """Refuse a birth date after ``on`` (the message time's date); nothing is checked when ``on`` is None.

    :raises IdentifierError: the birth date is in the future.
    """
    if on is not None and birth > on:
        raise IdentifierError(f"{what} {birth.isoformat()} is after the message date {on.isoformat()}")


def birth_date_problem(fhir_date: str, on: _dt.date | None) -> str | None:
    """Why a FHIR birth ``date`` (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``) is after ``on``, or None.

    A partial date is in the future only when its first possible day is.
    """
    text = (fhir_date or "")[:10]
    if on is None or not text:
        return None
    try:
        year = int(text[:4])
        month = int(text[5:7]) if len(text) >= 7 else 1
        day = int(text[8:10]) if len(text) >= 10 else 1
        first = _dt.date(year, month, day)
    except ValueError:
        return None  # not a date: the date parser reports it
    if first > on:
        return f"birth date {text} is after the message date {on.isoformat()}"
    return None


def check_id_card(value: str, *, on: _dt.date | None = None) -> str:
    """Validate a 18-digit 公民身份号码 and return it normalised (``x`` -> ``X``, full-width digits and Ｘ to ASCII).

    A legacy 15-digit number is widened to 18 digits (``19`` inserted after the
    region code, check digit computed). The address code is the code of first
    registration and never changes, so a 川渝 code is accepted when it was valid
    at any time on or after the birth date (GB/T 2260 history in
    :mod:`gateway.divisions`) and refused when it stopped being valid before;
    elsewhere the province prefix must exist. ``on`` is the message date: a
    birth date after it is refused.

    A number found good is remembered with ``on`` (a received Bundle names its patient once for every result).

    :raises IdentifierError: wrong length, characters, birth date, address code or check digit.
    """
    if type(value) is str and (on is None or type(on) is _dt.date):
        return _checked_id_card(value, on)
    return _check_id_card(value, on)


def id_card_or_none(value: str) -> str | None:
    """``value`` as :func:`check_id_card` normalises it, or None when it is not a 身份证号: the form in which the
    gateway names a patient (decisions, audit entries, searches of them) whatever way the number was typed."""
    try:
        return check_id_card(value)
    except IdentifierError:
        return None


def _check_id_card(value: str, on: _dt.date | None) -> str:
    number = (value or "").strip().upper()
    if not number.isascii():  # typed with a Chinese input method: full-width digits and Ｘ are the same number
        number = number.translate(_FULL_WIDTH_ID)
    if len(number) == 15 and number.isascii() and number.isdigit():
        body = number[:6] + "19" + number[6:]
        number = body + id_card_check_char(body)
    if len(number) != 18:
        raise IdentifierError(f"身份证号 has {len(number)} characters, expected 18")
    if not _ID_RE.match(number):
        raise IdentifierError("身份证号 must be 17 digits followed by a digit or X")
    try:
        birth = _dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise IdentifierError(f"身份证号 birth date {number[6:14]} is not a calendar date") from None
    if birth.year < 1880:
        raise IdentifierError(f"身份证号 birth date {number[6:14]} is implausible")
    expected = id_card_check_char(number[:17])
    if number[17] != expected:
        raise IdentifierError(f"身份证号 check digit is {number[17]!r}, expected {expected!r}")
    check_birth_date(birth, on, "身份证号 birth date")
    problem = id_card_region_problem(number, birth)
    if problem:
        raise IdentifierError(problem)
    return number


_checked_id_card = functools.lru_cache(maxsize=4096)(_check_id_card)


def id_card_warnings(number: str) -> list[str]:
    """Doubts about a 身份证号 that :func:`check_id_card` accepted (a 川渝 address code the table does not know)."""
    warning = id_card_region_warning(number)
    return [warning] if warning else []


def id_card_sex(number: str) -> str:
    """FHIR administrative gender from position 17 (odd male, even female)."""
    return "male" if int(number[16]) % 2 else "female"


def id_card_birth_date(number: str) -> str:
    """The embedded birth date as a FHIR ``date`` (YYYY-MM-DD)."""
    return f"{number[6:10]}-{number[10:12]}-{number[12:14]}"


def province_of_division(code: str) -> str | None:
    """``"51"`` (四川) or ``"50"`` (重庆) for a GB/T 2260 code in 川渝, else None."""
    if re.match(r"^5[01][0-9]{4}$", code or ""):
        return code[:2]
    return None
