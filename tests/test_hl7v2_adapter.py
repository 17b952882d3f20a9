"""HL7 v2 adapter: splitting, character sets, filters, datatypes and error locations."""
from __future__ import annotations

from decimal import Decimal

import pytest

from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import HL7v2Adapter, ack_code_for, build_ack, split_messages
from gateway.config import REPO_ROOT
from gateway.mapping.tables import load_mappings

MSH = "MSH|^~\\&|LIS|TJXRMYY|||20240601090000||ORU^R01^ORU_R01|{id}|P|{ver}||||||{cs}"
PID = "PID|1||511921198001011237^^^^NNCHN||张^三||19800101|M"
OBR = "OBR|1||R1|BLRT^血常规^L|||20240601080000|||||||||||||||20240601085900|||F"
OBX = "OBX|1|NM|WBC^白细胞^L||6.1|10*9/L|3.5-9.5|N|||F"


@pytest.fixture(scope="module")
def adapter() -> HL7v2Adapter:
    return HL7v2Adapter(load_mappings(REPO_ROOT / "mappings").structure("hl7v2-oru-r01"))


def message(*segments: str, msg_id: str = "M1", ver: str = "2.5.1", cs: str = "UNICODE UTF-8") -> str:
    return "\r".join([MSH.format(id=msg_id, ver=ver, cs=cs), *segments]) + "\r"


def read(adapter: HL7v2Adapter, text: str | bytes):
    data = text.encode("utf-8") if isinstance(text, str) else text
    return adapter.read(RawUnit(data, 1))


def lines(msg) -> list[str]:
    return [f"{i.severity}: {i.line()}" for i in msg.issues]


# -- splitting --------------------------------------------------------------------------


def test_split_plain_crlf_lf_and_mllp_framed_files() -> None:
    one = message(PID, OBR, OBX, msg_id="A").encode()
    two = message(PID, OBR, OBX, msg_id="B").encode()
    assert split_messages(one + two) == [one.rstrip(b"\r"), two.rstrip(b"\r")]
    crlf = (one + two).replace(b"\r", b"\r\n")
    assert split_messages(crlf) == [one.rstrip(b"\r"), two.rstrip(b"\r")]
    lf = (one + b"\n" + two).replace(b"\r", b"\n")
    assert split_messages(lf) == [one.rstrip(b"\r"), two.rstrip(b"\r")]
    framed = b"\x0b" + one + b"\x1c\x0d" + b"\x0b" + two + b"\x1c\x0d"
    assert split_messages(framed) == [one.rstrip(b"\r"), two.rstrip(b"\r")]
    assert split_messages(b"\r\n  \n") == []


def test_split_does_not_cut_inside_gbk_text() -> None:
    # GBK trail bytes include 0x5C ('\\') and 0x7C ('|') but never CR/LF or MLLP framing bytes.
    text = message(PID.replace("张^三", "欧阳^锋"), OBR, OBX, cs="").encode("gbk")
    assert split_messages(text) == [text.rstrip(b"\r")]


# -- character sets ---------------------------------------------------------------------


def test_gbk_without_msh18_falls_back_to_gb18030(adapter) -> None:
    msg = read(adapter, message(PID, OBR, "OBX|1|NM|WBC^白细胞^L||6.1|10*9/L|3.5-9.5|N|||F", cs="").encode("gbk"))
    assert msg.charset == "gb18030"
    assert msg.errors == []
    assert msg.patient.name == "张三"
    assert msg.reports[0].results[0].code.display == "白细胞"


def test_msh18_gb18030_is_honoured(adapter) -> None:
    text = message(PID, OBR, "OBX|1|ST|X^说明^L||阴性||||||F", cs="GB 18030-2000")
    msg = read(adapter, text.encode("gb18030"))
    assert msg.charset == "gb18030" and msg.reports[0].results[0].value == "阴性"


def test_declared_utf8_that_is_not_utf8_is_refused_naming_msh18(adapter) -> None:
    msg = read(adapter, message(PID, OBR, OBX, cs="UNICODE UTF-8").encode("gbk"))
    assert ack_code_for(msg) == "AR"
    assert msg.errors[0].location == "MSH-18"
    assert "declares 'UNICODE UTF-8'" in msg.errors[0].message


def test_declared_ascii_with_chinese_text_is_read_with_a_warning(adapter) -> None:
    msg = read(adapter, message(PID, OBR, OBX, cs="ASCII").encode("gbk"))
    assert msg.errors == []
    assert msg.charset == "gb18030"
    assert any(i.severity == "warning" and i.location == "MSH-18" for i in msg.issues)


@pytest.mark.parametrize("cs", ["", "ASCII"])
@pytest.mark.parametrize("name", ["郑^伟", "谢^平", "欧阳^娜娜", "王^建国"])
def test_gbk_bytes_that_are_also_utf8_are_read_as_the_chinese_they_are(adapter, cs: str, name: str) -> None:
    """An analyser sends GBK without saying so: 郑伟 in GBK (D6 A3 CE B0) is valid UTF-8 too, and was stored as
    the Armenian and Greek ``֣ ΰ`` with an AA. Of the readings, the one that looks like a laboratory's text."""
    pid = PID.replace("张^三", name)
    data = message(pid, OBR.replace("血常规", "CBC"), OBX.replace("白细胞", "WBC"), cs=cs).encode("gbk")
    assert data.decode("utf-8") if name in ("郑^伟", "谢^平") else True  # (the case: both readings are possible)
    msg = read(adapter, data)
    assert msg.errors == [] and msg.charset == "gb18030"
    assert msg.patient.name == name.replace("^", "")


@pytest.mark.parametrize("name", ["郑^伟", "谢^平", "张^三", "鑫^淼"])
def test_utf8_chinese_without_msh18_stays_utf8(adapter, name: str) -> None:
    msg = read(adapter, message(PID.replace("张^三", name), OBR, OBX, cs="").encode("utf-8"))
    assert msg.errors == [] and msg.charset == "utf-8" and msg.patient.name == name.replace("^", "")


@pytest.mark.parametrize("cs, encoding, escaped", [
    ("UNICODE UTF-8", "utf-8", "\\XE5BBBAE59BBD\\"), ("GB 18030-2000", "gb18030", "\\XBDA8B9FA\\"),
    ("", "gbk", "\\XBDA8B9FA\\")])
def test_hexadecimal_escapes_are_bytes_of_the_messages_character_set(adapter, cs, encoding, escaped) -> None:
    """``\\Xhh..\\`` (HL7 v2 2.7: bytes in hexadecimal) read in the message's character set: 建国, not the
    Latin-1 letters of each byte (王å»ºå\\x9b½)."""
    pid = PID.replace("张^三", "王^" + escaped)
    msg = read(adapter, message(pid, OBR, OBX, cs=cs).encode(encoding))
    assert msg.errors == [] and msg.patient.name == "王建国", (msg.patient.name, lines(msg))


def test_a_hexadecimal_escape_not_of_the_character_set_is_read_as_before(adapter) -> None:
    msg = read(adapter, message(PID.replace("张^三", "M\\XFC\\ller^Jos\\XE9\\"), OBR, OBX, cs="UNICODE UTF-8"))
    assert msg.errors == [] and msg.patient.name == "Müller José"


def test_indented_segments_are_read(adapter) -> None:
    """A file wrapped for reading (``\\r PID``): the segment is the PID, not an unknown one (the message was
    filtered as a QC message for want of a PID, and the patient's results dropped with an AA)."""
    for indent in (" ", "\t", "  \t"):
        text = message(PID, OBR, OBX).replace("\r", "\r" + indent).rstrip()
        msg = read(adapter, text)
        assert msg.errors == [] and not msg.filtered, lines(msg)
        assert msg.patient.name == "张三" and len(msg.reports[0].results) == 1


@pytest.mark.parametrize("bad", ["obx", "OB", "O X", "0BX"])
def test_a_segment_whose_name_is_no_segment_name_refuses_the_message(adapter, bad: str) -> None:
    """``obx|2|...`` was passed over as an unknown segment: its result vanished and the message was answered AA."""
    second = "OBX|2|NM|HGB^血红蛋白^L||135|g/L|130-175|N|||F".replace("OBX", bad, 1)
    msg = read(adapter, message(PID, OBR, OBX, second))
    assert ack_code_for(msg) in ("AE", "AR")
    assert msg.errors[0].location == "OBX[1]"  # (the segment before it: a name the answer's ERR-2 can carry)
    assert f"named {bad!r}, which is no segment name" in msg.errors[0].message


def test_a_zsegment_and_blank_lines_are_still_read(adapter) -> None:
    msg = read(adapter, message(PID, "ZPI|1|x", OBR, OBX).replace("\r" + "OBR", "\r\r" + "OBR"))
    assert msg.errors == [], lines(msg)


def test_unknown_charset_is_unsupported(adapter) -> None:
    msg = read(adapter, message(PID, OBR, cs="EBCDIC"))
    assert ack_code_for(msg) == "AR" and "EBCDIC" in msg.errors[0].message


# -- filters ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, reason", [
    (message(OBR, "OBX|1|NM|ALT||41||||||F"), "no PID segment"),
    (message(PID, OBR, "OBX|1|NM|ALT||41||||||F").replace("|UNICODE UTF-8", "|UNICODE UTF-8").replace(
        "ORU_R01|M1|P|2.5.1||||", "ORU_R01|M1|P|2.5.1||||2"), "quality-control"),
    (message(PID, OBR, "OBX|1|NM|ALT||41||||||F", "SPM|1|S1||SER|||||||Q^Control specimen^HL70369"),
     "control/calibrator"),
])
def test_qc_and_calibration_messages_are_filtered(adapter, text: str, reason: str) -> None:
    msg = read(adapter, text)
    assert reason in msg.filtered
    assert msg.reports == [] and ack_code_for(msg) == "AA"


# -- header checks ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1"])
def test_supported_versions(adapter, version: str) -> None:
    msg = read(adapter, message(PID, OBR, "OBX|1|NM|WBC||6.1|10*9/L||||||F", ver=version))
    assert msg.errors == [] and msg.version == version


def test_unsupported_type_and_version_are_rejected(adapter) -> None:
    adt = read(adapter, message(PID).replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01"))
    assert ack_code_for(adt) == "AR" and adt.errors[0].location == "MSH[1]-9"
    old = read(adapter, message(PID, OBR, ver="2.2"))
    assert ack_code_for(old) == "AR" and old.errors[0].location == "MSH[1]-12"


def test_garbage_is_rejected_not_raised(adapter) -> None:
    for data in (b"hello world", b"\xff\xfe\x00garbage", b"MSH"):
        msg = adapter.read(RawUnit(data, 1))
        assert ack_code_for(msg) == "AR"


def test_oversized_message_is_rejected(adapter) -> None:
    small = HL7v2Adapter(adapter.table, max_message_bytes=100)
    msg = small.read(RawUnit(message(PID, OBR, OBX).encode(), 1))
    assert ack_code_for(msg) == "AR" and "limit is 100" in msg.errors[0].message


# -- values and datatypes ---------------------------------------------------------------


def obx(adapter, *obx_segments: str):
    msg = read(adapter, message(PID, OBR, *obx_segments))
    return msg, (msg.reports[0].results if msg.reports else [])


def test_numeric_values_keep_their_precision_and_comparators(adapter) -> None:
    msg, results = obx(adapter, "OBX|1|NM|A||5.60||||||F", "OBX|2|NM|B||<0.5||||||F", "OBX|3|NM|C||≥ 10||||||F",
                       "OBX|4|NM|D||+.5||||||F")
    assert msg.errors == []
    assert [(r.value.value, r.value.comparator) for r in results] == [
        (Decimal("5.60"), ""), (Decimal("0.5"), "<"), (Decimal("10"), ">="), (Decimal(".5"), "")]
    assert str(results[0].value.value) == "5.60"


def test_text_in_a_numeric_field_names_message_segment_and_field(adapter) -> None:
    msg, _ = obx(adapter, "OBX|1|NM|A||1||||||F", "OBX|2|NM|B||2||||||F", "OBX|3|NM|HGB||abc|g/L|||||F")
    assert lines(msg) == ["error: OBX[3]-5 'abc' is not a number for value type NM"]
    assert ack_code_for(msg) == "AE"


def test_structured_numeric_range_ratio_and_comparator(adapter) -> None:
    msg, results = obx(adapter, "OBX|1|SN|A||^10^-^20||||||F", "OBX|2|SN|B||^1^:^128||||||F",
                       "OBX|3|SN|C||>^5||||||F", "OBX|4|SN|D||<>^5||||||F")
    assert [r.value_kind for r in results][:3] == ["range", "ratio", "quantity"]
    assert results[1].value[1].value == Decimal("128")
    assert results[2].value.comparator == ">"
    assert lines(msg) == ["error: OBX[4]-5 SN comparator '<>' is not supported"]


def test_coded_string_and_escaped_values(adapter) -> None:
    msg, results = obx(adapter, "OBX|1|CWE|ABO^血型^L||A^A型^L||||||F", "OBX|2|ST|X||a\\F\\b\\S\\c||||||F",
                       "OBX|3|TX|Y||第一行\\.br\\第二行~第三行||||||F")
    assert msg.errors == []
    assert (results[0].value.code, results[0].value.display) == ("A", "A型")
    assert results[1].value == "a|b^c"
    assert results[2].value == "第一行\n第二行\n第三行"


def test_unsupported_value_type_names_obx2(adapter) -> None:
    msg, _ = obx(adapter, "OBX|1|ED|IMG||^application^pdf^Base64^AAAA||||||F")
    assert lines(msg) == ["error: OBX[1]-2 value type ED is not supported (supported: CE, CWE, DT, DTM, FT, NM, SN, "
                          "ST, TS, TX)"]


def test_unescaped_caret_in_unit_is_read_as_one_unit_with_a_warning(adapter) -> None:
    msg, results = obx(adapter, "OBX|1|NM|WBC||6.1|10^9/L|3.5-9.5|N|||F")
    assert results[0].unit == "10^9/L"
    assert lines(msg) == ["warning: OBX[1]-6 unit '10^9/L' contains an unescaped '^' (should be \\S\\); read as one "
                          "unit"]


def test_empty_local_code_is_an_error(adapter) -> None:
    msg, _ = obx(adapter, "OBX|1|NM|^白细胞||6.1||||||F")
    assert lines(msg) == ["error: OBX[1]-3 observation identifier (local item code) is empty"]


def test_bad_times_name_their_field(adapter) -> None:
    msg = read(adapter, message(PID.replace("||19800101|", "||19801301|"), OBR, OBX))
    assert lines(msg) == ["error: PID[1]-7 month 13 in '19801301' does not exist"]
    msg, _ = obx(adapter, "OBX|1|NM|A||1||||||F|||20240230120000")
    assert lines(msg) == ["error: OBX[1]-14 '20240230120000' is not a calendar date"]


# -- patient identifiers ----------------------------------------------------------------


@pytest.mark.parametrize("pid, expected", [
    ("PID|1||MR1^^^^MR~511921198001011237^^^^NNCHN||张^三", "511921198001011237"),
    ("PID|1||511921198001011237^^^^ID||张^三", "511921198001011237"),
    ("PID|1||MR1^^^^MR||张^三||||||||||||||511921198001011237", "511921198001011237"),  # PID-19
    ("PID|1||511921198001011237||张^三", "511921198001011237"),  # untyped, as analysers send it
    ("PID|1||11010519491231002x^^^^NNCHN||张^三", "11010519491231002X"),  # lower-case x normalised
])
def test_id_card_found_where_real_systems_put_it(adapter, pid: str, expected: str) -> None:
    msg = read(adapter, message(pid, OBR, OBX))
    assert msg.patient.id_card == expected
    assert msg.errors == []


def test_bad_id_card_check_digit_is_an_error_for_that_message(adapter) -> None:
    msg = read(adapter, message("PID|1||511921198001011230^^^^NNCHN||张^三", OBR, OBX))
    assert lines(msg) == ["error: PID[1]-3 repetition 1 (type NNCHN): 身份证号 check digit is '0', expected '7'"]


def test_missing_id_card_is_a_warning_and_other_ids_are_kept(adapter) -> None:
    msg = read(adapter, message("PID|1||MR88^^^^MR||张^三", OBR, OBX))
    assert msg.errors == [] and msg.patient.other_ids == [("MR", "MR88")]
    assert any("no 身份证号" in i.message and i.severity == "warning" for i in msg.issues)


def test_more_than_one_patient_is_refused(adapter) -> None:
    msg = read(adapter, message(PID, OBR, PID.replace("PID|1", "PID|2"), OBR))
    assert lines(msg)[0].startswith("error: PID[2] more than one patient")


# -- ACK --------------------------------------------------------------------------------


def test_ack_v251_names_the_field_in_err2_and_err3(adapter) -> None:
    import datetime as dt

    msg, _ = obx(adapter, "OBX|1|NM|A||x|||||F")
    ack = build_ack(msg, "AE", application="GW", facility="F", now=dt.datetime(2024, 6, 1, 9, 0), control_id="C1")
    segs = ack.split("\r")
    assert segs[0].startswith("MSH|^~\\&|GW|F|LIS|TJXRMYY|20240601090000||ACK^R01^ACK|C1|P|2.5.1")
    assert segs[1] == "MSA|AE|M1|OBX[1]-5 'x' is not a number for value type NM"
    assert segs[2] == "ERR||OBX^1^5|102^Data type error^HL70357|E||||OBX[1]-5 'x' is not a number for value type NM"


def test_ack_v231_uses_err1_eld(adapter) -> None:
    import datetime as dt

    msg = read(adapter, message(PID, OBR, "OBX|1|NM|A||x|||||F", ver="2.3.1"))
    ack = build_ack(msg, "AE", application="GW", facility="F", now=dt.datetime(2024, 6, 1, 9, 0), control_id="C1")
    assert "MSH|^~\\&|GW|F|LIS|TJXRMYY|20240601090000||ACK^R01|C1|P|2.3.1" in ack
    assert "\rERR|OBX^1^5^102&Data type error&HL70357\r" in ack


def test_sample_files_read_without_exceptions(adapter) -> None:
    for path in sorted((DATA / "hl7v2").glob("*.hl7")):
        for unit in adapter.split(path.read_bytes(), path.name):
            adapter.read(unit)  # never raises; problems are issues
