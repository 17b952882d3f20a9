"""What real senders put on the wire and in files, beyond the clean case: bytes between MLLP blocks, two messages in
one block, byte order marks, batch envelopes, a character set that contradicts MSH-18, repeated values a result
holds one of, a unit sent as text alone, a CSV column named twice.

Inputs: ``tests/data/hl7v2/mllp-*.mllp``, ``batch-fhs-bhs.mllp``, ``lis-latin1-declared-utf8.hl7``,
``lis-bom-first.hl7``, ``lis-obx-repetitions.hl7`` and ``tests/data/csv/cdc-duplicate-result-column.csv`` (see
``tests/data/README.md``). The MLLP tests send the files' bytes as they are over a real socket and read every ACK.
"""
from __future__ import annotations

import socket
from typing import Any

import pytest

from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.mllp import MLLPServer

HL7 = DATA / "hl7v2"
_END = b"\x1c\r"


@pytest.fixture
def server(pipeline: Any) -> Any:
    srv = MLLPServer(pipeline, "127.0.0.1", 0)
    srv.start_in_thread()
    yield srv
    srv.stop()


def _acks(port: int, data: bytes, expected: int, *, then_more: bytes = b"") -> list[list[str]]:
    """Send ``data`` over one connection and read ``expected`` ACK blocks (their MSA fields); ``then_more`` is sent
    after them on the same connection (a connection left usable answers it too)."""
    found: list[list[str]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        for payload, count in ((data, expected), (then_more, 1 if then_more else 0)):
            if not payload:
                continue
            sock.sendall(payload)
            buf = b""
            while buf.count(_END) < count:
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed after {buf.count(_END)} of {count} ACKs"
                buf += chunk
            for block in buf.split(_END)[:count]:
                msa = next(s for s in block.strip(b"\x0b").decode("utf-8").split("\r") if s.startswith("MSA"))
                found.append(msa.split("|"))
    return found


@pytest.mark.parametrize("name, ids", [
    ("mllp-lf-after-frame.mllp", ["RP-LF-1", "RP-LF-2"]),
    ("mllp-bom-before-frame.mllp", None),
])
def test_bytes_between_mllp_blocks_lose_no_message(server: Any, pipeline: Any, name: str, ids: Any) -> None:
    """A line feed after each block (some Windows senders write one), a byte order mark before the first 0x0B: every
    message is answered AA and stored, and the connection stays usable."""
    data = (HL7 / name).read_bytes()
    wanted = ids or [m.split(b"|")[9].decode() for m in split_messages(data)]
    follow = split_messages(data)[0].replace(wanted[0].encode(), b"RP-AFTER-1")
    acks = _acks(server.port, data, len(wanted), then_more=b"\x0b" + follow + b"\x1c\r")
    assert [a[1:3] for a in acks] == [["AA", i] for i in wanted] + [["AA", "RP-AFTER-1"]]
    assert pipeline.store.counts() == {"stored": len(wanted) + 1}


def test_two_messages_in_one_mllp_block_are_refused_not_merged(server: Any, pipeline: Any) -> None:
    """A patient's message and an analyser's QC message in one block: the QC results must never become the
    patient's. The block is refused (AR) naming the second MSH, and kept as it came."""
    data = (HL7 / "mllp-two-messages-one-block.mllp").read_bytes()
    acks = _acks(server.port, data, 1)
    assert acks[0][1:3] == ["AR", "RP-MRG-1"]
    records = pipeline.store.list_messages()
    assert [(r.status, r.message_id) for r in records] == [("refused", "RP-MRG-1")]
    assert [(i["location"], "second message" in i["message"]) for i in records[0].issues] == [("MSH[2]", True)]
    assert pipeline.store.search("DiagnosticReport", []).total == 0


def test_a_second_message_behind_a_byte_order_mark_is_still_a_second_message(pipeline: Any) -> None:
    """Two files saved with a byte order mark and joined (``cat``): in one MLLP block the second MSH, behind its
    mark, is refused as a second message, not read as an unknown segment whose results join the first patient;
    as a file, the two are two messages."""
    first, second = split_messages((HL7 / "mllp-two-messages-one-block.mllp").read_bytes())[:1] * 2
    second = second.replace(b"RP-MRG-1", b"RP-MRG-2")
    block = b"\xef\xbb\xbf" + first + b"\r\xef\xbb\xbf" + second
    [outcome] = pipeline.ingest_batch(pipeline.channel("hl7v2"), [RawUnit(block, 1, "mllp:test")], channel="mllp")
    assert outcome.status.value == "refused" and outcome.errors[0].location == "MSH[2]", outcome.issues
    assert [m[:3] for m in split_messages(block)] == [b"MSH", b"MSH"]


def test_a_batch_file_is_read_as_its_messages(pipeline: Any) -> None:
    """A file (or HTTP body) holding an FHS/BHS batch: the envelope segments are not messages, nor parts of the
    last message; both messages are converted."""
    data = (HL7 / "batch-fhs-bhs.mllp").read_bytes()
    units = split_messages(data)
    assert [u[:3] for u in units] == [b"MSH", b"MSH"] and not any(b"BTS" in u or b"FTS" in u for u in units)
    outcomes = list(pipeline.convert(data, "hl7v2"))
    assert [(o.status.value, o.message.message_id) for o in outcomes] == [
        ("converted", "RP-B-1"), ("converted", "RP-B-2")]


def test_a_batch_in_one_mllp_block_is_refused_with_its_reason(server: Any) -> None:
    acks = _acks(server.port, (HL7 / "batch-fhs-bhs.mllp").read_bytes(), 1)
    assert acks[0][1] == "AR"
    # and the reason says what to do instead
    block = (HL7 / "batch-fhs-bhs.mllp").read_bytes().strip().strip(b"\x0b").split(b"\x1c")[0]
    msg = server.pipeline.channel("hl7v2").adapter.read(RawUnit(block, 1, "mllp:test"))
    assert [i.message for i in msg.issues] == [
        "message does not start with an MSH segment (FHS: a batch is not taken as one message; send its messages one "
        "to an MLLP block, or the batch as a file: POST /ingest/hl7v2)"]


def test_a_byte_order_mark_before_msh_is_not_part_of_the_message(pipeline: Any) -> None:
    outcomes = list(pipeline.convert((HL7 / "lis-bom-first.hl7").read_bytes(), "hl7v2"))
    assert [o.status.value for o in outcomes] == ["converted"], [o.issues for o in outcomes]
    adapter = pipeline.channel("hl7v2").adapter
    assert adapter.identify(RawUnit((HL7 / "lis-bom-first.hl7").read_bytes(), 1, ""))[1] == \
        outcomes[0].message.message_id  # (a resend is still known as one)


def test_utf8_under_an_iso_8859_1_msh18_is_refused_not_stored_garbled(pipeline: Any) -> None:
    outcomes = list(pipeline.convert((HL7 / "lis-latin1-declared-utf8.hl7").read_bytes(), "hl7v2"))
    assert [o.status.value for o in outcomes] == ["refused"]
    issue = outcomes[0].errors[0]
    assert issue.location == "MSH-18" and "UTF-8" in issue.message, issue


def test_gbk_under_an_iso_8859_1_msh18_is_refused(pipeline: Any) -> None:
    text = (HL7 / "lis-latin1-declared-utf8.hl7").read_bytes().decode("utf-8")
    outcomes = list(pipeline.convert(text.encode("gbk"), "hl7v2"))
    assert [o.status.value for o in outcomes] == ["refused"]
    assert outcomes[0].errors[0].location == "MSH-18"
    # a message in ISO 8859-1 that says so is read as such
    latin = text.replace("王^建国", "Müller^José").replace("血常规", "Hemogram").encode("utf-8")
    plain = latin.decode("utf-8").encode("latin-1", errors="replace")
    read = pipeline.channel("hl7v2").adapter.read(RawUnit(plain, 1, ""))
    assert not [i for i in read.issues if i.location == "MSH-18"], read.issues
    assert read.patient is not None and "Müller" in str(read.patient.__dict__)
    # Windows-1252 punctuation under an ISO 8859-1 MSH-18 (a common mislabel) is not taken for Chinese
    western = {"王^建国": "O’Brien^Zoë", "血常规": "Hämogramm 10–20 …", "陈&明": "Chen&Ming", "全血": "Vollblut",
               "白细胞计数": "Leukozyten", "血红蛋白": "Hämoglobin"}
    for chinese, latin in western.items():
        text = text.replace(chinese, latin)
    quoted = text.encode("cp1252")
    read = pipeline.channel("hl7v2").adapter.read(RawUnit(quoted, 1, ""))
    assert not [i for i in read.issues if i.location == "MSH-18"], read.issues


def test_repeated_values_a_result_holds_one_of_are_refused_naming_obx5(pipeline: Any) -> None:
    outcomes = {o.message.message_id: o for o in pipeline.convert((HL7 / "lis-obx-repetitions.hl7").read_bytes(),
                                                                  "hl7v2")}
    for mid in ("RP-CE-1", "RP-SN-1"):
        assert outcomes[mid].status.value == "refused", outcomes[mid].issues
        assert any(i.location == "OBX[1]-5" and "2 repetitions" in i.message for i in outcomes[mid].errors)
    # a unit sent as its text alone (OBX-6 ^10*9/L) is kept
    unit = outcomes["RP-U-1"]
    assert unit.status.value == "converted", unit.issues
    quantity = next(e["resource"]["valueQuantity"] for e in unit.bundle["entry"]
                    if e["resource"]["resourceType"] == "Observation")
    assert quantity["unit"] == "10*9/L" or quantity.get("code") == "10*9/L", quantity


def test_a_csv_column_named_twice_is_refused_naming_it(pipeline: Any) -> None:
    data = (DATA / "csv" / "cdc-duplicate-result-column.csv").read_bytes()
    outcomes = list(pipeline.convert(data, "cdc-csv"))
    assert [o.status.value for o in outcomes] == ["refused"]
    issue = outcomes[0].errors[0]
    assert issue.location == "row 1" and "结果 (columns 16, 23)" in issue.message, issue
