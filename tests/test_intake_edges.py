"""Intake edges an outside tester found: CDC CSV exams and technical-service reports sent again, shared parties, and
messages that named the wrong cause.

CSV samples: tests/data/intake-edges/ (made by hand after an outside tester's files; see its README.md). Service
reports: the samples of tests/data/service-report/, changed in the test.
"""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import DATA, Clock
from gateway.config import load_settings
from gateway.pipeline import Pipeline, Status
from test_service_reports import NOW, YUAN, YUAN_NAME, json_body, meta, multipart_body, pdf

EDGES = DATA / "intake-edges"
CSV_MEMBER, CSV_MEMBER_NAME = "12511921MB0001003C", "通江县人民医院（演示）"
STEM = "yuan-personal-dose-monitoring"


def _pipeline(tmp_path: Path, database: str, uscc: str, name: str, **more: Any) -> Iterator[Pipeline]:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": uscc,
                                                    "issuer_name": name, "database": database, **more})
    p = Pipeline(settings, clock=Clock(NOW))
    yield p
    p.close()


@pytest.fixture
def yuan(tmp_path: Path, database: str) -> Iterator[Pipeline]:
    yield from _pipeline(tmp_path, database, YUAN, YUAN_NAME)


@pytest.fixture
def cdc(tmp_path: Path, database: str) -> Iterator[Pipeline]:
    yield from _pipeline(tmp_path, database, CSV_MEMBER, CSV_MEMBER_NAME)


def _one(pipeline: Pipeline, body: bytes, fmt: str) -> Any:
    [outcome] = pipeline.ingest(body, fmt, channel="http")
    return outcome


def _resources(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


# -- 1. a service report sent again ----------------------------------------------------------------------------------


def test_a_service_report_resent_with_other_content_is_a_conflict_not_a_duplicate(yuan: Pipeline) -> None:
    """Other content under a report number stored before was answered "duplicate … not processed again" and dropped."""
    first = _one(yuan, json_body(STEM), "service-report")
    assert first.status is Status.STORED, first.issues
    same = _one(yuan, multipart_body(STEM), "service-report")  # the same report in the other wrapper
    assert same.status is Status.DUPLICATE and same.ack_code == "AA"
    changed_pdf = pdf(STEM) + b"% another measurement\n%%EOF\n"
    for body in (json_body(STEM, pdf=base64.b64encode(changed_pdf).decode("ascii")),
                 json_body(STEM, project="另一个项目")):
        other = _one(yuan, body, "service-report")
        assert other.status is Status.REFUSED, other.issues
        [issue] = other.errors
        assert issue.code == "conflict" and issue.location == "metadata.report_number"
        assert "report_number" in issue.message and meta(STEM)["report_number"] in issue.message
        assert "status corrected" in issue.message


def test_a_service_report_refused_then_fixed_is_processed_as_new(yuan: Pipeline) -> None:
    """A number refused before was answered with that old error for ever."""
    bad = _one(yuan, json_body(STEM, report_date="2026-13-40"), "service-report")
    assert bad.status is Status.REFUSED
    fixed = _one(yuan, json_body(STEM), "service-report")
    assert fixed.status is Status.STORED, fixed.issues


# -- 2. a CSV exam exported again -------------------------------------------------------------------------------------


def _dates_rewritten(data: bytes) -> bytes:
    return data.replace(b"2026-11-16 16:30:00", b"2026/11/16 16:30").replace(b"1980-11-11", b"1980/11/11")


@pytest.mark.parametrize("first, again", [
    ("same_lf_a", "same_lf_b"), ("same_gbk_a", "same_gbk_b"), ("same_q_a", "same_q_b"), ("same_x_a", "same_x_b"),
    ("ord1", "ord2"), ("same_lf_a", "dates")])
def test_an_exam_exported_again_in_another_form_is_a_duplicate(cdc: Pipeline, first: str, again: str) -> None:
    """Only the form changed (line ends, encoding, quotes, an unread column, row order, date spelling): it was
    stored as a correction of itself, pushed to members and their decisions withdrawn."""
    data = (EDGES / f"{first}.csv").read_bytes()
    stored = _one(cdc, data, "cdc-csv")
    assert stored.status is Status.STORED, stored.issues
    resent = _dates_rewritten(data) if again == "dates" else (EDGES / f"{again}.csv").read_bytes()
    assert resent != data
    outcome = _one(cdc, resent, "cdc-csv")
    assert outcome.status is Status.DUPLICATE, outcome.issues
    assert outcome.record_id == stored.record_id


def test_a_changed_value_is_still_a_correction(cdc: Pipeline) -> None:
    stored = _one(cdc, (EDGES / "chg0.csv").read_bytes(), "cdc-csv")
    assert stored.status is Status.STORED
    corrected = _one(cdc, (EDGES / "chg1.csv").read_bytes(), "cdc-csv")
    assert corrected.status is Status.STORED
    assert any("this exam corrects it" in i.message for i in corrected.issues), corrected.issues


def _stored_as_an_earlier_release_stored_it(cdc: Pipeline, data: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``data``'s exam stored under the id an earlier release gave it (its exam number and the digest of its
    bytes): the outcome."""
    adapter = cdc.channel("cdc-csv").adapter
    with monkeypatch.context() as m:
        m.setattr(adapter, "identify", lambda unit: (str(unit.meta["layout"]), adapter.former_id(unit)))
        stored = _one(cdc, data, "cdc-csv")
    assert stored.status is Status.STORED
    return stored


def test_an_exam_stored_under_its_bytes_digest_is_still_a_duplicate_when_resent_as_it_was(
        cdc: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exams stored before content digests were keyed on their bytes: a byte-identical resend is that copy's."""
    adapter = cdc.channel("cdc-csv").adapter
    data = (EDGES / "same_lf_a.csv").read_bytes()
    stored = _stored_as_an_earlier_release_stored_it(cdc, data, monkeypatch)
    assert cdc.store.get_message(stored.record_id).message_id == adapter.former_id(next(adapter.split(data)))
    again = _one(cdc, data, "cdc-csv")
    assert again.status is Status.DUPLICATE and again.record_id == stored.record_id


@pytest.mark.parametrize("again", ["same_lf_b", "dates"])
def test_an_exam_an_earlier_release_stored_is_a_duplicate_when_resent_in_another_form(
        cdc: Pipeline, monkeypatch: pytest.MonkeyPatch, again: str) -> None:
    """An exam an earlier release stored (keyed on its bytes), exported again with other line ends or dates spelt
    another way after the upgrade: it was taken as a correction of itself, sent to the members and their decisions
    withdrawn. The stored copy's content is worked out again from its raw input: the same exam, a duplicate."""
    data = (EDGES / "same_lf_a.csv").read_bytes()
    stored = _stored_as_an_earlier_release_stored_it(cdc, data, monkeypatch)
    resent = _dates_rewritten(data) if again == "dates" else (EDGES / f"{again}.csv").read_bytes()
    outcome = _one(cdc, resent, "cdc-csv")
    assert outcome.status is Status.DUPLICATE, outcome.issues
    assert outcome.record_id == stored.record_id
    changed = _one(cdc, (EDGES / "same_lf_a.csv").read_bytes().replace(b",139,", b",141,"), "cdc-csv")
    assert changed.status is Status.STORED  # (other content is still a correction, or an exam of its own)


# -- 3. shared parties of a CSV exam ----------------------------------------------------------------------------------


def _edited(data: bytes, **cells: str) -> bytes:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    header = rows[0]
    for row in rows[1:]:
        for name, value in cells.items():
            row[header.index(name)] = value
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode("utf-8")


def test_empty_birth_date_and_sex_cells_are_read_from_the_id_card(cdc: Pipeline) -> None:
    """A later exam with empty 出生日期/性别 cells wrote a Patient version without them (both follow from the 身份证号);
    one with an empty 用人单位名称 named the employer by its 统一社会信用代码."""
    data = (EDGES / "same_lf_a.csv").read_bytes()
    first = _one(cdc, data, "cdc-csv")
    assert first.status is Status.STORED
    later = _one(cdc, _edited(data, 体检编号="SAMElf-2", 性别="", 出生日期="", 用人单位名称=""), "cdc-csv")
    assert later.status is Status.STORED, later.issues
    [patient] = _resources(later.bundle, "Patient")
    assert patient["gender"] == "female" and patient["birthDate"] == "1980-11-11"  # 51010719801111430X
    employer = next(o for o in _resources(later.bundle, "Organization")
                    if o["identifier"][0]["value"] == "91511921MA62Q0A1XC")
    assert employer.get("name") != "91511921MA62Q0A1XC"


def test_a_sex_cell_that_contradicts_the_id_card_is_kept_and_said(cdc: Pipeline) -> None:
    """(As before: the cell given is kept, and the answer says it disagrees with the 身份证号.)"""
    data = _edited((EDGES / "same_lf_a.csv").read_bytes(), 性别="男")
    outcome = _one(cdc, data, "cdc-csv")
    [patient] = _resources(outcome.bundle, "Patient")
    assert patient["gender"] == "male"
    assert any("性别" in i.location for i in outcome.issues if i.severity == "warning"), outcome.issues


# -- 4. the issuer of a service report is this member ------------------------------------------------------------------


def test_a_service_reports_issuer_name_does_not_rename_the_member(yuan: Pipeline) -> None:
    sent = {"name": "渝安改名公司", "uscc": YUAN}
    outcome = _one(yuan, json_body(STEM, issuer=sent), "service-report")
    assert outcome.status is Status.STORED, outcome.issues
    org = next(o for o in _resources(outcome.bundle, "Organization") if o["identifier"][0]["value"] == YUAN)
    assert org["name"] == YUAN_NAME
    [report] = _resources(outcome.bundle, "DiagnosticReport")
    assert report["performer"][0]["display"] == YUAN_NAME
    [said] = [i for i in outcome.issues if i.location == "metadata.issuer.name"]
    assert said.severity == "warning" and "渝安改名公司" in said.message and "issuer.name" in said.message


# -- 5. messages -------------------------------------------------------------------------------------------------------


def test_metadata_with_a_byte_order_mark_is_read(yuan: Pipeline) -> None:
    body = b"\xef\xbb\xbf" + json_body(STEM)
    outcome = list(yuan.convert(body, "service-report", "test"))[0]
    assert outcome.status is Status.CONVERTED, outcome.issues
    boundary = "----cyhrFormBoundary7MA4YWxkTrZu0gW"
    multipart = multipart_body(STEM).replace(b"Content-Type: application/json\r\n\r\n",
                                             b"Content-Type: application/json\r\n\r\n\xef\xbb\xbf", 1)
    assert boundary.encode() in multipart
    outcome = list(yuan.convert(multipart, "service-report", "test"))[0]
    assert outcome.status is Status.CONVERTED, outcome.issues


def test_base64_wrapped_at_76_characters_is_read_and_bad_base64_names_the_report(yuan: Pipeline) -> None:
    encoded = base64.encodebytes(pdf(STEM)).decode("ascii")  # (76 characters a line, as `base64` writes it)
    assert "\n" in encoded
    outcome = list(yuan.convert(json_body(STEM, pdf=encoded), "service-report", "test"))[0]
    assert outcome.status is Status.CONVERTED, outcome.issues
    bad = list(yuan.convert(json_body(STEM, pdf="not*base64"), "service-report", "test"))[0]
    assert bad.status is Status.REFUSED
    assert meta(STEM)["report_number"] in bad.label and "(no id)" not in bad.label


def test_a_date_with_a_time_is_said_not_to_be_a_date(yuan: Pipeline) -> None:
    outcome = list(yuan.convert(json_body(STEM, report_date="2026-11-12 10:00"), "service-report", "test"))[0]
    [issue] = [i for i in outcome.errors if i.location == "metadata.report_date"]
    assert "is not a date (YYYY-MM-DD)" in issue.message and "characters" not in issue.message


def test_a_csv_with_lines_ended_by_cr_alone_is_read(cdc: Pipeline) -> None:
    data = (EDGES / "e_cr.csv").read_bytes()
    assert b"\n" not in data and b"\r" in data
    outcomes = list(cdc.convert(data, "cdc-csv", "e_cr.csv"))
    assert outcomes and all(o.status is Status.CONVERTED for o in outcomes), [o.issues for o in outcomes]


def test_an_exam_over_the_size_limit_names_the_setting(tmp_path: Path, database: str) -> None:
    """It advised "send it as a file of its own, or split its rows" to an exam alone in its file; split, its rows
    are taken as corrections that leave items out."""
    data = (EDGES / "same_lf_a.csv").read_bytes()
    header, *rows = data.split(b"\r\n")
    big = header + b"\r\n" + b"".join(rows[0] + b"\r\n" for _ in range(400))
    for p in _pipeline(tmp_path, database, CSV_MEMBER, CSV_MEMBER_NAME, max_message_bytes=65_536):
        [outcome] = p.convert(big, "cdc-csv", "big.csv")
        [issue] = [i for i in outcome.errors if i.code == "too-long"]
        assert "max_message_bytes" in issue.message and "split its rows" not in issue.message
        assert json.dumps(issue.message)
