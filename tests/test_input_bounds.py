"""Hostile values the fuzzer found: answered quickly, refused with the field named, never echoed whole.

Each test repeats one root cause found by tests/test_fuzz.py or while fixing it:
patterns that took exponential or quadratic time on long values, a number of
months read as years and months, ids and names quoted back whole, integers too
long for ``str()``.
"""
from __future__ import annotations

import time
from decimal import Decimal

import pytest

from conftest import make_token
from gateway.adapters.base import number_problem, parse_number
from gateway.adapters.labcsv import parse_exposure_years
from gateway.errors import Issue, shown
from gateway.fhir.profiles import load_guide

LONG = "x" * 5000


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


def quickly(fn, *args, limit: float = 0.25):
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        assert time.perf_counter() - started < limit, f"{fn.__name__} took {time.perf_counter() - started:.2f} s"


@pytest.mark.parametrize("text", [" " * 5000 + "x", "9" * 5000 + "x", "<" + " " * 5000 + "1x", "1." + "0" * 5000 + "."])
def test_a_long_value_is_no_number_at_once(text: str) -> None:
    assert quickly(parse_number, text) is None
    assert quickly(number_problem, text) == "is not a number"


def test_a_number_beyond_double_range_is_said_to_be_one() -> None:
    assert parse_number("9" * 400) is None
    assert number_problem("9" * 400) == "is beyond the range of a number (±1.7e308)"
    assert parse_number(" ≥ 10 ") is not None and parse_number("12.") is not None


@pytest.mark.parametrize("text, number, comparator", [
    ("６．８", "6.8", ""), ("６.８", "6.8", ""), ("＜０．５", "0.5", "<"), ("－３", "-3", ""), ("\u3000６．８\u3000", "6.8", ""),
    ("１．２３Ｅ＋０５", "123000", ""), ("6.8", "6.8", "")])
def test_full_width_numbers_as_an_input_method_types_them_are_numbers(text: str, number: str,
                                                                      comparator: str) -> None:
    """A Chinese input method types ６．８ (full-width digits and point): the number 6.8, as ６.８ already was."""
    from decimal import Decimal

    found = parse_number(text)
    assert found is not None and (found.value, found.comparator) == (Decimal(number), comparator)


@pytest.mark.parametrize("text", ["10²", "1,230", "６,８", "1_000", "NaN", "0x1A", "三", "٣", "١٢.٥", "১২", "๓"])
def test_what_only_looks_like_a_number_is_none(text: str) -> None:
    """(Digits of other scripts — Arabic-Indic ٣, Bengali ১২ — were read as 3 and 12: Python's \\d and Decimal
    take them. A result value is 0-9, or their full-width forms.)"""
    assert parse_number(text) is None and number_problem(text) == "is not a number"  # (10² is not 102)


@pytest.mark.parametrize("text", ["9" * 5000 + "x", "9 " * 2500 + "x", "9" * 30 + "年" + "9" * 30 + "x"])
def test_exposure_years_of_a_long_value_are_refused_at_once(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a number of years") as caught:
        quickly(parse_exposure_years, text)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("text, months", [("36个月", 36), ("12个月", 12)])
def test_twelve_months_or_more_without_years_are_refused_not_read_as_years_and_months(text: str, months: int) -> None:
    with pytest.raises(ValueError, match=f"has {months} months; write 12 months or more as years"):
        parse_exposure_years(text)
    assert parse_exposure_years("3年0个月") == Decimal("3")
    assert parse_exposure_years("11个月") == Decimal("0.92")


def test_base64_with_spaces_is_checked_in_linear_time() -> None:
    guide = load_guide(None)
    report = {"resourceType": "DiagnosticReport", "id": "a", "status": "final", "code": {"text": "血常规"},
              "presentedForm": [{"contentType": "application/pdf", "data": "AAAA  " * 2000 + "!"}]}
    issues = quickly(guide.validate, report, limit=1.0)
    [bad] = [i for i in issues if i.location == "DiagnosticReport.presentedForm[0].data"]
    assert "(12001 characters) is not a valid base64Binary" in bad.message
    report["presentedForm"][0]["data"] = "QUJD  REVG\nR0hJ"
    assert not [i for i in guide.validate(report) if i.location.endswith(".data")]


def test_shown_quotes_a_prefix_even_of_an_integer_str_refuses() -> None:
    assert shown(10 ** 5000 - 1) == f"{'9' * 60!r}… (5000 characters)"
    assert shown("abc") == "'abc'"


def test_an_issue_cuts_values_quoted_whole_and_steps_made_of_what_was_sent() -> None:
    xpath = ("/ClinicalDocument/component/structuredBody/component[2]/section/entry[6]/organizer/component[1]/"
             "observation/entryRelationship/observation/effectiveTime/low/@value")
    assert Issue("error", "value", xpath, "is not a calendar date").location == xpath
    issue = Issue("error", "structure", "Bundle.entry[3].resource.code.coding[0].c" + "9" * 5000,
                  f"unknown element {'x' * 300} here")
    assert issue.location == f"Bundle.entry[3].resource.code.coding[0].c{'9' * 59}… (5001 characters)"
    assert issue.message == f"unknown element {'x' * 60}… (300 characters) here"


def test_a_cda_document_id_of_5000_characters_is_cut_in_its_label(pipeline) -> None:
    from conftest import DATA

    data = next((DATA / "cda").glob("*.xml")).read_bytes()
    start = data.index(b"<id ", data.index(b"<ClinicalDocument"))
    end = data.index(b"/>", start)
    tag = data[start:end]
    assert b'extension="' in tag
    before, _, rest = tag.partition(b'extension="')
    new_tag = before + b'extension="' + b"9" * 5000 + b'"' + rest[rest.index(b'"') + 1:]
    [outcome] = pipeline.convert(data[:start] + new_tag + data[end:], "cda", "test")
    assert outcome.label == f"文档流水号 {'9' * 74}… (5006 characters)"
    assert b"9" * 100 not in outcome.answer


@pytest.fixture
def auth(app):
    token = make_token(app, "operator", ["admin"])
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path, status, location", [
    (f"/fhir/Observation?_format={LONG}", 406, None),
    (f"/fhir/Observation?{LONG}=1", 400, "x" * 60),
    (f"/fhir/Observation?status={LONG}", 400, "status"),
    (f"/fhir/{LONG}", 404, "x" * 60),
    (f"/fhir/{LONG}/1", 404, "x" * 60),
    (f"/fhir/Observation/{'9' * 400}", 404, "Observation"),
    (f"/fhir/AuditEvent?{LONG}=1", 400, "x" * 60),
    (f"/fhir/AuditEvent?type={LONG}", 400, "type"),
    (f"/fhir/AuditEvent?patient:identifier=http://a|{LONG}", 400, "patient:identifier"),
    (f"/fhir/StructureDefinition?{LONG}=1", 400, "x" * 60),
    (f"/fhir/StructureDefinition?_id=ge{LONG}", 400, "_id"),
    (f"/fhir/ValueSet?url={LONG}", 400, "url"),
    (f"/audit/stats?{LONG}=1", 400, "x" * 60),
    (f"/audit/checkpoints?{LONG}=1", 400, "x" * 60),
])
def test_http_never_quotes_a_long_name_or_value_back(app, auth, path: str, status: int, location: str | None) -> None:
    resp = app.test_client().get(path, headers=auth)
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    assert b"x" * 100 not in resp.data and b"9" * 100 not in resp.data
    [issue] = resp.get_json()["issue"]
    assert issue.get("expression", [None]) == [location]
    assert len(issue["diagnostics"]) < 300


@pytest.mark.parametrize("value", ["9999-12-31", "9999-12", "9999", "9999-12-31T23:59:59-08:00",
                                   "0001-01-01T00:00:00+08:00"])
def test_dates_at_the_ends_of_the_calendar_have_bounds(value: str) -> None:
    from gateway.fhir.search import date_bounds, date_range

    low, high = date_bounds(value)
    assert low < high
    assert date_range(value)[0] < date_range(value)[1]


def test_a_lenient_search_ignores_a_long_name(app, auth) -> None:
    resp = app.test_client().get(f"/fhir/Observation?{LONG}=1", headers={**auth, "Prefer": "handling=lenient"})
    assert resp.status_code == 200
    assert all(LONG[:100] not in link["url"] for link in resp.get_json()["link"])


def _hl7_with(msh7: bytes, obr22: bytes | None) -> bytes:
    from conftest import DATA

    segments = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes().split(b"\r")
    msh = segments[0].split(b"|")
    msh[6] = msh7
    segments[0] = b"|".join(msh)
    if obr22 is not None:
        for i, seg in enumerate(segments):
            if seg.startswith(b"OBR|"):
                fields = seg.split(b"|") + [b""] * 30
                fields[22] = obr22
                segments[i] = b"|".join(fields[:max(23, len(seg.split(b"|")))])
    return b"\r".join(segments)


@pytest.mark.parametrize("msh7", [b"", b" ", b"20240520"])
def test_a_message_without_a_time_is_timed_by_its_report_or_refused_at_msh7(pipeline, msh7: bytes) -> None:
    [timed] = pipeline.convert(_hl7_with(msh7, b"20240520161000"), "hl7v2", "test")
    assert timed.bundle is not None and timed.bundle["timestamp"] == "2024-05-20T16:10:00+08:00"
    [untimed] = pipeline.convert(_hl7_with(msh7, b""), "hl7v2", "test")
    assert [(i.location, i.code) for i in untimed.issues if i.severity == "error"] == [("MSH[1]-7", "required")]


@pytest.mark.parametrize("text, value, comparator", [
    ("1.23E+05", "123000", ""),  # HBV-DNA as analysers write it
    ("8.2e-1", "0.82", ""),
    ("8.2E0", "8.2", ""),
    ("<1.0e-3", "0.0010", "<"),  # the significant digits kept
    ("-3e2", "-300", ""),
    (" 2.5E+3 ", "2500", ""),
])
def test_scientific_notation_is_a_number_written_out_in_full(text: str, value: str, comparator: str) -> None:
    q = parse_number(text)
    assert q is not None and (str(q.value), q.comparator) == (value, comparator)


@pytest.mark.parametrize("text, problem", [("1e400", "is beyond the range of a number (±1.7e308)"),
                                           ("1E", "is not a number"), ("e5", "is not a number"),
                                           ("1e5e5", "is not a number"), ("1e12345", "is not a number")])
def test_what_is_not_scientific_notation_or_is_too_large(text: str, problem: str) -> None:
    assert parse_number(text) is None and number_problem(text) == problem


def test_a_long_exponent_is_no_number_at_once() -> None:
    assert quickly(parse_number, "1" + "e" * 5000) is None
    assert quickly(parse_number, "1e" + "9" * 5000) is None


def test_a_number_a_double_holds_as_zero_is_not_taken() -> None:
    assert parse_number("1E-400") is None and parse_number("0E-400") is not None


@pytest.mark.parametrize("text", ["٢٠٢٤٠٦٠١", "٢٠٢٤-٠٦-٠١", "২০২৪০৬০১"])
def test_a_timestamp_in_digits_of_another_script_is_no_timestamp(text: str) -> None:
    """٢٠٢٤٠٦٠١ was read as 2024-06-01; full-width digits, as a Chinese input method types them, still are."""
    from gateway.datetimes import DateTimeError, to_fhir_datetime

    with pytest.raises(DateTimeError):
        to_fhir_datetime(text)
    assert to_fhir_datetime("２０２４０６０１") == "2024-06-01"
    assert to_fhir_datetime("２０２４年３月１５日 ８：３０") == "2024-03-15T08:30:00+08:00"


@pytest.mark.parametrize("text, fhir", [("2024年03月05日 08时30分", "2024-03-05T08:30:00+08:00"),
                                        ("2024年3月5日 8时30分15秒", "2024-03-05T08:30:15+08:00"),
                                        ("2024年3月5日8时05分", "2024-03-05T08:05:00+08:00")])
def test_a_time_written_in_words_is_a_time(text: str, fhir: str) -> None:
    """时 and 分, as Chinese systems write the time of a date written 年月日 (it was "not a date/time")."""
    from gateway.datetimes import to_fhir_datetime

    assert to_fhir_datetime(text) == fhir


def test_exposure_years_are_digits_0_to_9_or_full_width() -> None:
    from decimal import Decimal

    assert parse_exposure_years("６年") == Decimal("6") and parse_exposure_years("3年6个月") == Decimal("3.50")
    with pytest.raises(ValueError):
        parse_exposure_years("٣")
