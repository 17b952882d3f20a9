"""Identifiers: check algorithms for Chinese national identifiers.

- 统一社会信用代码 (USCC, GB 32100-2015): 18 characters, check character over a
  31-character set with weights ``3**i mod 31``.
- 组织机构代码 (GB 11714, positions 9-17 of a USCC): mod 11, 10 -> ``X``.
- 公民身份号码 (GB 11643-1999): ISO 7064 MOD 11-2 check digit, embedded birth
  date, sex from position 17.

Each ``check_*`` function returns the normalised identifier or raises
:class:`~gateway.errors.IdentifierError` with a message a clerk can act on.
"""
from __future__ import annotations

import datetime as _dt
import re

from gateway.errors import IdentifierError, shown
from gateway.naming import SYSTEM_ID_CARD, SYSTEM_INSTITUTION, SYSTEM_USCC

__all__ = [
    "OID_ID_CARD",
    "OID_INSTITUTION",
    "USCC_SYSTEM",
    "uscc_check_char",
    "check_uscc",
    "org_code_check_char",
    "id_card_check_char",
    "check_id_card",
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

    :raises IdentifierError: wrong length, characters or check character.
    """
    code = (value or "").strip().upper()
    if len(code) != 18:
        raise IdentifierError(f"统一社会信用代码 {shown(code)} has {len(code)} characters, expected 18")
    if not _USCC_RE.match(code):
        raise IdentifierError(f"统一社会信用代码 {shown(code)} has characters outside GB 32100")
    expected = uscc_check_char(code[:17])
    if code[17] != expected:
        raise IdentifierError(f"统一社会信用代码 {shown(code)} check character is {code[17]!r}, expected {expected!r}")
    return code


def id_card_check_char(id17: str) -> str:
    """The GB 11643 (ISO 7064 MOD 11-2) check character for 17 digits."""
    total = sum(int(c) * w for c, w in zip(id17, _ID_WEIGHTS))
    return "10X98765432"[total % 11]


def check_id_card(value: str) -> str:
    """Validate a 18-digit 公民身份号码 and return it normalised (``x`` -> ``X``).

    A legacy 15-digit number is widened to 18 digits (``19`` inserted after the
    region code, check digit computed). Region codes are not checked against
    today's GB/T 2260 list: the code at the time of issue may be obsolete.

    :raises IdentifierError: wrong length, characters, birth date or check digit.
    """
    number = (value or "").strip().upper()
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
    return number


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
