"""Input that no signed report may carry: control characters, oversized fields and exams, stray 0x1C, odd digits.

Each is refused with the field named (HL7 ERR segment, CSV row and column, CDA
line, FHIRPath) and nothing of it reaches a stored Bundle.
"""
from __future__ import annotations

import copy
import io
import json
import socket
import time

import pytest

from conftest import DATA, ROOT
from gateway.adapters.base import MAX_TEXT_BYTES, RawUnit
from gateway.adapters.hl7v2 import HL7v2Adapter, split_messages
from gateway.adapters.labcsv import LabCSVAdapter
from gateway.fhir.profiles import Guide, load_guide
from gateway.mllp import MLLPServer, frame
from gateway.pipeline import Pipeline, Status


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


GOOD = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[0]
GOLDEN = json.loads((DATA / "expected" / "lis-v24-gbk.1.json").read_text(encoding="utf-8"))
CSV_HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,"
              "接害工龄,体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期")
CSV_EXAM = ("{n},王演示,51132219800707331X,男,1980-07-07,通江演示建材有限公司,91511921MA62Q0A1XC,破碎工,1001,矽尘,6.5,"
            "在岗期间,2024-03-15,XCG-WBC,白细胞计数,{value},10^9/L,3.5-9.5,,目前未见异常,吴主检,2024-03-22 16:30:00")


def msa(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")


def errs(ack: bytes) -> list[str]:
    return [s for s in ack.decode("utf-8").split("\r") if s.startswith("ERR")]


def hl7(pipeline: Pipeline, data: bytes):
    return pipeline.ingest(data, "hl7v2", channel="http")


# -- HL7 v2: control characters, free text, MSA-2 and table 0357 ------------------------------------------------


@pytest.mark.parametrize("old, new, erl", [
    (b"R2406100001", b"R24061\x0000001", "OBR^1^3"),
    (b"|\xe5\xbc\xa0^", b"|\xe5\xbc\xa0\x00^", "PID^1^5"),
    (b"|\xe5\xbc\xa0^", b"|\xe5\xbc\xa0\\X01\\^", "PID^1^5"),  # a hex escape decoding to one
    (b"|TJ2406100001|", b"|TJ24061\x1f00001|", "MSH^1^10"),
])
def test_a_control_character_refuses_the_message_naming_its_field(stored_pipeline: Pipeline, old, new, erl) -> None:
    assert old in GOOD
    out = hl7(stored_pipeline, GOOD.replace(old, new))[0]
    assert out.ack_code == "AE" and out.status == Status.REFUSED
    assert errs(out.answer)[0].startswith(f"ERR||{erl}|102^Data type error^HL70357|E")
    assert "control character 0x" in errs(out.answer)[0]
    assert not any(b in out.answer for b in (b"\x00", b"\x01", b"\x1f"))  # the answer echoes none of it raw
    assert stored_pipeline.store.db.execute("SELECT count(*) FROM resources").fetchone()[0] == 0


def test_a_tab_in_a_field_is_taken(pipeline: Pipeline) -> None:
    assert hl7(pipeline, GOOD.replace(b"|\xe5\xbc\xa0^", b"|\xe5\xbc\xa0\t^"))[0].ack_code == "AA"


def test_free_text_beyond_64_kib_is_refused_naming_the_field(pipeline: Pipeline) -> None:
    long_text = b"x" * (MAX_TEXT_BYTES + 1)
    obx = GOOD.rstrip(b"\r") + b"\rOBX|3|TX|NOTE^note^L||" + long_text + b"||||||F\r"
    out = hl7(pipeline, obx)[0]
    assert out.ack_code == "AE"
    assert any(e.startswith("ERR||OBX^3^5|102") and "65537 bytes" in e for e in errs(out.answer))
    nte = GOOD.replace(b"TJ2406100001", b"TJ2406100002").rstrip(b"\r") + b"\rNTE|1||" + long_text + b"\r"
    out = hl7(pipeline, nte)[0]
    assert out.ack_code == "AE" and errs(out.answer)[0].startswith("ERR||NTE^1^3|102")
    assert len(out.answer) < 2000  # never echoed
    ok = GOOD.replace(b"TJ2406100001", b"TJ2406100003").rstrip(b"\r") + b"\rNTE|1||" + b"x" * 60_000 + b"\r"
    assert hl7(pipeline, ok)[0].ack_code == "AA"


def test_an_unsupported_character_set_is_table_0211_and_msa_2_is_filled(pipeline: Pipeline) -> None:
    out = hl7(pipeline, GOOD.replace(b"UNICODE UTF-8", b"UNICODE UTF-8\x00"))[0]
    assert out.ack_code == "AR"
    assert msa(out.answer)[2] == "TJ2406100001"
    assert errs(out.answer)[0].startswith("ERR||MSH^1^18|103^Table value not found^HL70357|E")
    assert b"\x00" not in out.answer


def test_an_oversized_message_is_answered_with_its_control_id(pipeline: Pipeline) -> None:
    adapter = HL7v2Adapter(pipeline.channel("hl7v2").adapter.table, max_message_bytes=200)
    msg = adapter.read(RawUnit(GOOD, 1))
    assert [i.code for i in msg.errors] == ["too-long"] and msg.message_id == "TJ2406100001"
    ack = pipeline.channel("hl7v2").answer(msg, "AR")
    assert msa(ack)[1:3] == ["AR", "TJ2406100001"]


# -- HTTP and files: 0x1C ends a message only as MLLP framing -------------------------------------------------


def test_a_stray_0x1c_stays_in_its_message_and_refuses_it(pipeline: Pipeline) -> None:
    broken = GOOD.replace(b"|P|2.5", b"|P\x1c|2.5")
    assert split_messages(broken) == [broken]
    assert split_messages(b"\x0b" + broken + b"\x1c\r") == [broken]
    out = hl7(pipeline, b"\x0b" + broken + b"\x1c\r")
    assert len(out) == 1 and out[0].ack_code == "AE"
    assert errs(out[0].answer)[0].startswith("ERR||MSH^1^11|102")


def test_0x1c_followed_by_the_next_frame_or_the_end_ends_a_message() -> None:
    second = GOOD.replace(b"TJ2406100001", b"TJ2406100009")
    assert split_messages(b"\x0b" + GOOD + b"\x1c\x0b" + second + b"\x1c") == [GOOD, second]
    assert split_messages(b"\x0b" + GOOD + b"\x1c\r\n\x0b" + second + b"\x1c\r\n") == [GOOD, second]


# -- MLLP framing ---------------------------------------------------------------------------------------------


@pytest.fixture
def server(pipeline):
    srv = MLLPServer(pipeline, "127.0.0.1", 0)
    srv.start_in_thread()
    yield srv
    srv.stop()


def read_acks(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\x1c\x0d") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [a.strip(b"\x0b") for a in data.split(b"\x1c\x0d") if a.strip()]


def test_mllp_frame_without_final_cr_is_answered_after_a_pause(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"\x0b" + GOOD + b"\x1c")
        acks = read_acks(sock, 1)
        assert msa(acks[0])[1:3] == ["AA", "TJ2406100001"]
        assert time.monotonic() - started < 5


def test_mllp_0x1c_then_the_next_frame_ends_the_first(server) -> None:
    second = GOOD.replace(b"TJ2406100001", b"TJ2406100009")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x0b" + GOOD + b"\x1c\x0b" + second + b"\x1c\x0d")
        acks = read_acks(sock, 2)
    assert [msa(a)[1:3] for a in acks] == [["AA", "TJ2406100001"], ["AA", "TJ2406100009"]]


def test_mllp_and_http_agree_on_a_stray_0x1c(server, stored_pipeline) -> None:
    broken = GOOD.replace(b"TJ2406100001", b"TJ2406100007").replace(b"|P|2.5", b"|P\x1c|2.5")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(frame(broken))
        ack = read_acks(sock, 1)[0]
    assert msa(ack)[1:3] == ["AE", "TJ2406100007"]
    assert errs(ack)[0].startswith("ERR||MSH^1^11|102")


def test_mllp_oversized_frame_ar_names_the_control_id(stored_pipeline) -> None:
    srv = MLLPServer(stored_pipeline, "127.0.0.1", 0, max_message_bytes=300)
    srv.start_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(frame(GOOD + b"NTE|1||" + b"x" * 5000 + b"\r"))
            ack = read_acks(sock, 1)[0]
        assert msa(ack)[1:3] == ["AR", "TJ2406100001"]
    finally:
        srv.stop()


# -- CDC CSV: cells and exams bounded, control characters named ------------------------------------------------


def csv_adapter(pipeline: Pipeline, max_exam_bytes: int = 1_048_576) -> LabCSVAdapter:
    layouts = [s for s in pipeline.mappings.structures.values() if s.get("format") == "cdc-csv"]
    return LabCSVAdapter(layouts, max_exam_bytes=max_exam_bytes)


def read_all(adapter: LabCSVAdapter, data: bytes):
    return [adapter.read(u) for u in adapter.split_stream(io.BytesIO(data))]


def csv_of(*rows: str) -> bytes:
    return ("\n".join([CSV_HEADER, *rows]) + "\n").encode("utf-8")


def test_csv_control_character_is_named_by_row_and_column(pipeline: Pipeline) -> None:
    msgs = read_all(csv_adapter(pipeline), csv_of(CSV_EXAM.format(n="TJ1", value="6.\x008"),
                                                  CSV_EXAM.format(n="TJ2", value="6.8")))
    assert [(i.location, i.code) for i in msgs[0].errors] == [("row 2 column 结果", "value")]
    assert "0x00" in msgs[0].errors[0].message
    assert not msgs[1].errors


def test_csv_cell_beyond_64_kib_is_named(pipeline: Pipeline) -> None:
    msgs = read_all(csv_adapter(pipeline), csv_of(CSV_EXAM.format(n="TJ1", value="y" * (MAX_TEXT_BYTES + 1))))
    assert [(i.location, i.code) for i in msgs[0].errors] == [("row 2 column 结果", "too-long")]


def test_csv_exam_beyond_the_limit_is_refused_at_its_row_and_not_held(pipeline: Pipeline) -> None:
    adapter = csv_adapter(pipeline, max_exam_bytes=2000)
    rows = [CSV_EXAM.format(n="TJ1", value=f"6.{k}") for k in range(20)] + [CSV_EXAM.format(n="TJ2", value="7")]
    units = list(adapter.split_stream(io.BytesIO(csv_of(*rows))))
    assert len(units) == 2 and len(units[0].data) <= 2000
    first = adapter.read(units[0])
    assert first.label().startswith("体检编号 TJ1")
    assert [i.code for i in first.errors] == ["too-long"]
    assert first.errors[0].location == "row 9" and "2000 bytes" in first.errors[0].message
    assert not adapter.read(units[1]).errors


def test_csv_one_huge_row_is_skipped_streaming_and_the_next_exam_read(pipeline: Pipeline) -> None:
    adapter = csv_adapter(pipeline, max_exam_bytes=10_000)
    huge = CSV_EXAM.format(n="TJ1", value='"' + "z\n" * 100_000 + '"')  # quoted, spanning lines
    units = list(adapter.split_stream(io.BytesIO(csv_of(huge, CSV_EXAM.format(n="TJ2", value="7")))))
    assert len(units) == 2 and all(len(u.data) <= 10_000 for u in units)
    assert [(i.location, i.code) for i in adapter.read(units[0]).errors] == [("row 2", "too-long")]
    second = adapter.read(units[1])
    assert not second.errors and second.reports[0].number == "TJ2"


def test_csv_over_the_pipeline_answers_with_the_exam_and_row(stored_pipeline: Pipeline) -> None:
    big = "w" * 40_000
    rows = [CSV_EXAM.format(n="TJ1", value=big)] * 30  # 1.2 MB: over max_message_bytes (1 MiB)
    outs = stored_pipeline.ingest(csv_of(*rows), "cdc-csv", channel="http")
    assert len(outs) == 1 and outs[0].status == Status.REFUSED
    assert [i.code for i in outs[0].issues if i.severity == "error"] == ["too-long"]


# -- CDA: XML cannot carry them at all -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"&#0;", b"\x01", b"&#xD800;"])
def test_cda_control_character_is_refused_with_its_line(stored_pipeline: Pipeline, bad: bytes) -> None:
    data = (DATA / "cda" / "lab-report-full.xml").read_bytes()
    at = data.index(b"<title>") + len(b"<title>")
    out = stored_pipeline.ingest(data[:at] + bad + data[at:], "cda", channel="http")[0]
    assert out.status == Status.REFUSED
    assert out.issues[0].location == "/" and "line " in out.issues[0].message


# -- FHIR JSON and the profile validator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guide() -> Guide:
    return load_guide(ROOT / "profiles")


def test_validator_reports_control_characters_and_lone_surrogates(guide: Guide) -> None:
    patient = json.loads((ROOT / "profiles" / "examples" / "Patient-example.json").read_text(encoding="utf-8"))
    patient["name"][0]["text"] = "王\u0000建国"
    patient["identifier"][0]["system"] = "urn:x\ud800"
    patient["gender"] = "male\u001f"
    lines = [f"{i.severity} {i.code} {i.hl7_error} {i.location} [{i.extra['rule']}] {i.message}"
             for i in guide.validate(patient) if i.severity == "error"]
    assert lines == [
        "error value 102 Patient.identifier[0].system [format] holds a lone surrogate U+D800 at character 6, "
        "which FHIR strings do not allow (uri)",
        "error value 102 Patient.name[0].text [format] holds a control character U+0000 at character 2, "
        "which FHIR strings do not allow (string)",
        "error value 102 Patient.gender [format] holds a control character U+001F at character 5, "
        "which FHIR strings do not allow (code)",
    ]
    patient["name"][0]["text"] = "王建国\r\n\t"  # allowed
    assert not any(i.location == "Patient.name[0].text" for i in guide.validate(patient))


def test_validate_endpoint_no_longer_calls_a_lone_surrogate_ok(client) -> None:
    patient = (ROOT / "profiles" / "examples" / "Patient-example.json").read_text(encoding="utf-8")
    body = patient.replace('"family": "', '"family": "\\ud800', 1)
    assert body != patient
    resp = client.post("/fhir/Patient/$validate", data=body, content_type="application/fhir+json")
    issues = [i for i in resp.get_json()["issue"] if i["severity"] == "error"]
    # read strictly, as a submission is: refused as JSON, before the profiles are asked
    assert resp.status_code == 400 and any("unpaired UTF-16 surrogate" in i["diagnostics"] for i in issues)


def test_fhir_submission_with_a_control_character_is_refused_at_its_path(client) -> None:
    bad = copy.deepcopy(GOLDEN)
    bad["type"] = "collection"
    patient = next(e for e in bad["entry"] if e["resource"]["resourceType"] == "Patient")["resource"]
    patient["name"][0]["text"] = "王\u0000建国"
    resp = client.post("/fhir", data=json.dumps(bad), content_type="application/fhir+json")
    assert resp.status_code in (400, 422)
    body = resp.get_json()
    n = next(k for k, e in enumerate(bad["entry"]) if e["resource"] is patient)
    assert any(i.get("expression") == [f"Bundle.entry[{n}].resource.name[0].text"] for i in body["issue"])
    assert "\\u0000" not in resp.get_data(as_text=True)


# -- search parameters: ASCII digits only --------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["_count=١٢", "_count=１２", "_offset=٣", "_count=1_0", "_count=" + "9" * 5000,
                                   "_page_until=٣", "_page_until=-1", "_page_until=latest"])
def test_search_numbers_take_ascii_digits_only(client, query: str) -> None:
    resp = client.get(f"/fhir/Observation?{query}")
    assert resp.status_code == 400
    assert resp.get_json()["resourceType"] == "OperationOutcome"


def test_search_date_takes_ascii_digits_only(client) -> None:
    assert client.get("/fhir/Observation?date=２０２４").status_code == 400
    assert client.get("/fhir/Observation?date=2024").status_code == 200


# -- search values a database or a clock cannot hold: 400 naming the parameter, never a 500 --------------------------


@pytest.mark.parametrize("path, param", [
    ("/fhir/Observation?date=2026-11-20T07:30:00%2B24:00", "date"),
    ("/fhir/Observation?_lastUpdated=ge2026-11-20T07:30:00-25:00", "_lastUpdated"),
    ("/fhir/Patient?birthdate=2026-11-20T07:30:00%2B05:60", "birthdate"),
    ("/fhir/AuditEvent?date=2026-11-20T07:30:00%2B24:00", "date"),
    ("/fhir/AuditEvent?_id=99999999999999999999999", "_id"),
    ("/fhir/AuditEvent?_id=1,-99999999999999999999999", "_id"),
])
def test_search_values_out_of_range_are_a_clear_400(app, path: str, param: str) -> None:
    from conftest import make_token

    resp = app.test_client().get(path, headers={"Authorization": f"Bearer {make_token(app, 'it', ['admin'])}"})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    issue = resp.get_json()["issue"][0]
    assert issue["expression"] == [param] or issue.get("location") == [param]
    assert "internal" not in issue["diagnostics"]


def test_an_audit_cursor_holding_numbers_too_large_is_refused(app) -> None:
    import base64

    from conftest import make_token

    client = app.test_client()
    auditor = {"Authorization": f"Bearer {make_token(app, 'auditor', ['auditor'])}"}
    for cursor in ([10 ** 30, 1, 1], [1, 1.5, 1], ["1", 1, 1]):
        value = base64.urlsafe_b64encode(json.dumps(cursor).encode()).rstrip(b"=").decode()
        resp = client.get(f"/fhir/AuditEvent?_cursor={value}", headers=auditor)
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert "paging cursor" in resp.get_json()["issue"][0]["diagnostics"]


def test_an_unencoded_plus_in_a_search_date_is_read_as_the_offset(client) -> None:
    """A client that leaves the zone's "+" unencoded sends a space: read as the offset, as the AuditEvent search
    does, not refused."""
    plain = client.get("/fhir/Observation?date=ge2026-11-20T07:30:00+08:00")
    encoded = client.get("/fhir/Observation?date=ge2026-11-20T07:30:00%2B08:00")
    assert plain.status_code == encoded.status_code == 200, plain.get_data(as_text=True)
    assert plain.get_json()["total"] == encoded.get_json()["total"]


def test_a_search_with_too_many_parameters_is_a_400_not_a_503(client) -> None:
    """Each parameter is one more condition; past a limit the answer says so (a 503 would have the client send
    it again and again)."""
    many = "&".join(["code=1"] * 988)
    for resp in (client.get(f"/fhir/Observation?{many}"),
                 client.post("/fhir/Observation/_search", data=many,
                             content_type="application/x-www-form-urlencoded")):
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert "at most 50" in resp.get_json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Observation?" + "&".join(["code=1"] * 50)).status_code == 200


@pytest.mark.parametrize("method", ["DELETE", "GET", "PATCH", None])
def test_a_transaction_entry_asking_for_what_is_not_storing_is_refused_at_its_method(client, method) -> None:
    """The entries of a submitted Bundle are stored: an entry whose request asks to delete, read or patch is not
    quietly stored as a create; POST and PUT are taken as storing."""
    bundle = copy.deepcopy(GOLDEN)
    bundle["type"] = "transaction"
    for entry in bundle["entry"]:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
    bundle["entry"][1]["request"]["method"] = method
    resp = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert resp.status_code in (400, 422), resp.get_data(as_text=True)
    issues = resp.get_json()["issue"]
    assert any(i.get("expression") == ["Bundle.entry[1].request.method"] for i in issues), issues
    for entry in bundle["entry"]:
        entry["request"]["method"] = "PUT"
    bundle["id"] = "ae789ec2-3b88-5dfd-8969-3cf95b2063f3"  # (another submission, not a resend of the first)
    bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle['id']}"}
    taken = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json").get_json()
    # (this Bundle claims our report profile, which wants a collection: refused for that, not for its methods)
    assert not any("request.method" in str(i.get("expression")) for i in taken.get("issue", [])), taken
