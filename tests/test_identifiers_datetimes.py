"""Identifier check algorithms (GB 32100, GB 11714, GB 11643) and source timestamps to FHIR."""
from __future__ import annotations

import pytest

from gateway.datetimes import DateTimeError, to_fhir_date, to_fhir_datetime, to_fhir_instant
from gateway.errors import IdentifierError
from gateway.identifiers import (
    check_id_card,
    check_uscc,
    id_card_birth_date,
    id_card_sex,
    org_code_check_char,
    province_of_division,
    uscc_check_char,
)


@pytest.mark.parametrize("code", ["91350100M000100Y43", "11500000MB1670604W", "11500103MB1849823N",
                                  "12330000470051726F"])
def test_uscc_public_examples_pass(code: str) -> None:
    assert check_uscc(code) == code
    assert check_uscc(code.lower()) == code


def test_uscc_worked_example_sum() -> None:
    # DOMAIN.md §4.1: Σ = 1640, 1640 mod 31 = 28, 31 - 28 = 3
    assert uscc_check_char("91350100M000100Y4") == "3"


@pytest.mark.parametrize("code, message", [
    ("91350100M000100Y44", "check character is '4', expected '3'"),
    ("91350100M000100Y4", "has 17 characters"),
    ("91350100M000100YI3", "character 17 .I. is not allowed"),
    ("", "has 0 characters"),
])
def test_uscc_bad(code: str, message: str) -> None:
    with pytest.raises(IdentifierError, match=message):
        check_uscc(code)


def test_org_code_check() -> None:
    assert org_code_check_char("MB167060") == "4"  # DOMAIN.md §4.1: Σ 271 -> 4


def test_id_card_standard_example() -> None:
    assert check_id_card("11010519491231002X") == "11010519491231002X"
    assert check_id_card("11010519491231002x") == "11010519491231002X"
    assert id_card_sex("11010519491231002X") == "female"  # 17th digit 2 is even
    assert id_card_birth_date("11010519491231002X") == "1949-12-31"


def test_id_card_typed_full_width_is_the_same_number() -> None:
    """Typed with a Chinese input method (full-width digits, Ｘ or ｘ, an ideographic space around it): the same
    number, checked and given back in ASCII; a full-width letter other than X is refused as before."""
    assert check_id_card("１１０１０５１９４９１２３１００２Ｘ") == "11010519491231002X"
    assert check_id_card("\u3000１１０１０５１９４９１２３１００２ｘ") == "11010519491231002X"
    assert check_id_card("１１０１０５４９１２３１００２") == "11010519491231002X"  # 15 digits, widened
    with pytest.raises(IdentifierError, match="check digit"):
        check_id_card("１１０１０５１９４９１２３１００２１")
    with pytest.raises(IdentifierError, match="17 digits followed by a digit or X"):
        check_id_card("１１０１０５１９４９１２３１００２Ｙ")


def test_id_card_legacy_15_digits_is_widened() -> None:
    assert check_id_card("110105491231002") == "11010519491231002X"


@pytest.mark.parametrize("number, message", [
    ("110105194912310021", "check digit is '1', expected 'X'"),
    ("110105194913310020", "is not a calendar date"),
    ("11010519491231002", "has 17 characters"),
    ("1101051949123100AX", "17 digits followed by a digit or X"),
])
def test_id_card_bad(number: str, message: str) -> None:
    with pytest.raises(IdentifierError, match=message):
        check_id_card(number)


def test_remembered_checks_answer_as_the_first_time() -> None:
    """A code or number found good is remembered; one found bad is refused again each time, and the message date
    is part of what a 身份证号 was checked with."""
    import datetime as dt

    for _ in range(2):
        assert check_uscc(" 12330000470051726f ") == "12330000470051726F"
        with pytest.raises(IdentifierError, match="check character"):
            check_uscc("12330000470051726G")
        assert check_id_card("11010519491231002X", on=dt.date(2026, 1, 1)) == "11010519491231002X"
        with pytest.raises(IdentifierError, match="after the message date"):
            check_id_card("11010519491231002X", on=dt.date(1949, 12, 30))
        with pytest.raises(IdentifierError, match="check digit"):
            check_id_card("110105194912310021")
    with pytest.raises(IdentifierError):
        check_uscc(None)  # type: ignore[arg-type]


def test_province_of_division() -> None:
    assert province_of_division("511921") == "51"
    assert province_of_division("500102") == "50"
    assert province_of_division("110105") is None


@pytest.mark.parametrize("source, fhir", [
    ("2024", "2024"), ("202403", "2024-03"), ("20240315", "2024-03-15"),
    ("2024031508", "2024-03-15T08:00:00+08:00"),
    ("202403150830", "2024-03-15T08:30:00+08:00"),
    ("20240315083012", "2024-03-15T08:30:12+08:00"),
    ("20240315083012.123", "2024-03-15T08:30:12.123+08:00"),
    ("20240315083012+0000", "2024-03-15T08:30:12+00:00"),
    ("20240315083012-0500", "2024-03-15T08:30:12-05:00"),
    ("2024-03-15 08:30", "2024-03-15T08:30:00+08:00"),
    ("2024-3-5", "2024-03-05"),
    ("2024/03/15 08:30:12", "2024-03-15T08:30:12+08:00"),
    ("2024.03.15", "2024-03-15"), ("2024.3.5 8:30", "2024-03-05T08:30:00+08:00"),  # as spreadsheets in China write
    ("2024年3月15日", "2024-03-15"), ("2024年03月15日 08:30", "2024-03-15T08:30:00+08:00"),
    ("2024年3月15日8：30：05", "2024-03-15T08:30:05+08:00"),
])
def test_source_times_get_an_offset(source: str, fhir: str) -> None:
    assert to_fhir_datetime(source) == fhir


@pytest.mark.parametrize("source", ["20241301", "20240230", "2024031525", "20240315086000", "abc", "17001231",
                                    "20240315083012+1500", "2024/3.15", "03/15/2024", "45366", "2024年2月30日",
                                    "2024.03", "2024.5", "202403150830.5"])  # (a fraction only after seconds)
def test_impossible_times_are_errors(source: str) -> None:
    with pytest.raises(DateTimeError) as caught:
        to_fhir_datetime(source)
    if "not a date/time" in str(caught.value):  # the forms that are taken, named
        assert "2024/3/15 8:30, 2024.03.15 or 2024年3月15日" in str(caught.value)


def test_instant_needs_a_time_and_date_drops_it() -> None:
    assert to_fhir_instant("20240315083012") == "2024-03-15T08:30:12+08:00"
    with pytest.raises(DateTimeError, match="no time of day"):
        to_fhir_instant("20240315")
    assert to_fhir_date("20240315083012") == "2024-03-15"
    assert to_fhir_datetime("20240315083012", "+09:00").endswith("+09:00")


def test_remembered_timestamps_answer_as_the_converter_does_on_fuzzed_ones() -> None:
    """``to_fhir_datetime`` remembers what it answered for the timestamps seen last; each answer, and each
    error's text, is the one :func:`convert_datetime` (the reference, worked out every time) gives, asked twice
    (the second from memory), with both offsets, over the memory's limit (emptied and filled again)."""
    import random

    from gateway import datetimes
    from gateway.datetimes import convert_datetime

    rng = random.Random(19)
    pieces = ["2024", "1999", "1700", "0315", "1301", "0230", "0229", "1231", "08", "24", "60", "59", "00", "30",
              ".5", ".1234", "+0800", "-0530", "+1500", "Z", "-", "/", " ", "T", ":", "a", "", "12", "3", "年"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(10_000)]
    for _ in range(20_000):  # timestamps as sources write them, some fields out of range, cut at any place
        y, mo, d, h, mi, sec = (rng.randint(1790, 2100), rng.randint(0, 13), rng.randint(0, 32), rng.randint(0, 25),
                                rng.randint(0, 61), rng.randint(0, 61))
        tz = rng.choice(["", "", "+0800", "-0500", "+1430", "Z", "+08:00", "-1200"])
        frac = rng.choice(["", "", ".5", ".123", ".12345"])
        form = rng.randrange(3)
        if form == 0:
            text = f"{y:04d}{mo:02d}{d:02d}{h:02d}{mi:02d}{sec:02d}"[:rng.choice([4, 6, 8, 10, 12, 14, 14])] + frac + tz
        elif form == 1:
            text = f"{y}-{mo}-{d:02d}" + rng.choice(["", f" {h}:{mi:02d}", f"T{h:02d}:{mi:02d}:{sec:02d}{frac}{tz}"])
        else:
            text = f"{y}/{mo}/{d}" + rng.choice(["", f" {h}:{mi:02d}", f"  {h}:{mi:02d}:{sec:02d}"])
        texts.append(rng.choice(["", " "]) + text + rng.choice(["", "", " "]))
    texts += ["2024-03-05 08:30:00", "2024/3/5 8:30", "20240305083000.12+0800", "2024-03-05T08:30:00Z",
              "x" * 100, "2024" + " " * 60]

    def answer(convert: object, text: str, offset: str) -> tuple[str, str]:
        try:
            return "value", convert(text, offset)  # type: ignore[operator]
        except DateTimeError as exc:
            return "error", str(exc)

    datetimes._SEEN.clear()
    kinds = set()
    for text in texts:
        for offset in ("+08:00", "+00:00"):
            expected = answer(convert_datetime, text, offset)
            kinds.add(expected[0])
            assert answer(to_fhir_datetime, text, offset) == expected, (text, offset)
            assert answer(to_fhir_datetime, text, offset) == expected, (text, offset)  # remembered
    assert kinds == {"value", "error"}
    assert sum(1 for text in texts if answer(convert_datetime, text, "+08:00")[0] == "value") > 10_000
    assert 0 < len(datetimes._SEEN) <= datetimes._SEEN_MAX
    assert not any(len(text) > datetimes._SEEN_LONGEST for text, _ in datetimes._SEEN), "long texts not kept"
