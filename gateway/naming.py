"""Naming: every URI the gateway writes into FHIR, in one place.

The canonical base of our implementation guide is provisional until the
registry authority registers a domain for it; change it here only.
"""
from __future__ import annotations

__all__ = [
    "IG_BASE",
    "IG_VERSION",
    "sd_url",
    "cs_url",
    "vs_url",
    "ext_url",
    "local_item_system",
    "local_mrn_system",
    "message_system",
    "SYSTEM_USCC",
    "SYSTEM_MIPLRN",
    "SYSTEM_ID_CARD",
    "SYSTEM_INSTITUTION",
    "SYSTEM_LAB_REPORT_NO",
    "SYSTEM_SPECIMEN_NO",
    "SYSTEM_STAFF",
    "SYSTEM_LOINC",
    "SYSTEM_UCUM",
    "SYSTEM_V2_0074",
    "SYSTEM_V2_0203",
    "SYSTEM_V2_0487",
    "SYSTEM_OBS_CATEGORY",
    "SYSTEM_INTERPRETATION",
    "SYSTEM_DATA_ABSENT",
]

IG_BASE = "https://fhir.cyhr.org.cn"
IG_VERSION = "0.1.0"


def sd_url(name: str) -> str:
    """Canonical URL of one of our StructureDefinitions."""
    return f"{IG_BASE}/StructureDefinition/{name}"


def cs_url(name: str) -> str:
    """Canonical URL of one of our CodeSystems."""
    return f"{IG_BASE}/CodeSystem/{name}"


def vs_url(name: str) -> str:
    """Canonical URL of one of our ValueSets."""
    return f"{IG_BASE}/ValueSet/{name}"


def ext_url(name: str) -> str:
    """Canonical URL of one of our extensions."""
    return f"{IG_BASE}/StructureDefinition/{name}"


def local_item_system(uscc: str) -> str:
    """Code system of one issuer's own (LIS) item codes: kept beside LOINC, never replaced."""
    return f"{IG_BASE}/sid/local-item/{uscc}"


def local_mrn_system(uscc: str) -> str:
    """Identifier system of one issuer's patient numbers (病案号/门诊号 in PID-3)."""
    return f"{IG_BASE}/sid/mrn/{uscc}"


def message_system(uscc: str) -> str:
    """Identifier system of the messages one issuer's systems send (sender + MSH-10)."""
    return f"{IG_BASE}/sid/message/{uscc}"


SYSTEM_USCC = f"{IG_BASE}/sid/uscc"  # no national OID for the 统一社会信用代码 is known
SYSTEM_MIPLRN = f"{IG_BASE}/sid/miplrn"  # 医疗机构执业许可证登记号
SYSTEM_ID_CARD = "urn:oid:2.16.156.10011.1.3"  # 患者身份证号
SYSTEM_INSTITUTION = "urn:oid:2.16.156.10011.1.5"  # 医疗卫生机构 ID
SYSTEM_LAB_REPORT_NO = "urn:oid:2.16.156.10011.1.33"  # 检验报告单号
SYSTEM_SPECIMEN_NO = "urn:oid:2.16.156.10011.1.14"  # 检验标本编号
SYSTEM_STAFF = "urn:oid:2.16.156.10011.1.4"  # 医务人员 ID
SYSTEM_LOINC = "http://loinc.org"
SYSTEM_UCUM = "http://unitsofmeasure.org"
SYSTEM_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
SYSTEM_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SYSTEM_V2_0487 = "http://terminology.hl7.org/CodeSystem/v2-0487"
SYSTEM_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SYSTEM_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SYSTEM_DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
