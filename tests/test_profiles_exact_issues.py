"""The validator's exact answer on wrong input: every issue's severity, code, location, message and rule.

The other profile tests compare (location, rule) pairs; members' systems and the
HL7 v2 ACKs show the full issue, so its wording, HL7 error code and order are
held here too, one mistake at a time on the guide's own examples. Each variant
goes down one path of the checks (the base walk's common and uncommon cases, the
strings it remembers, cardinality, choices, slices, patterns, fixed values,
bindings, invariants), so that making the validator faster cannot change what it
tells a member.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from conftest import ROOT
from gateway import jsonutil
from gateway.errors import Issue
from gateway.fhir.profiles import Guide, load_guide

EXAMPLES = ROOT / "profiles" / "examples"
SD = "https://fhir.cyhr.org.cn/StructureDefinition/"


@pytest.fixture(scope="module")
def guide() -> Guide:
    return load_guide(ROOT / "profiles")


def example(name: str) -> dict[str, Any]:
    return jsonutil.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))


def line(issue: Issue) -> str:
    """One issue in full: ``severity code hl7 location [rule@profile] message``."""
    rule = issue.extra["rule"]
    profile = issue.extra.get("profile")
    assert set(issue.extra) <= {"rule", "profile"}
    if profile is not None:
        assert profile.startswith(SD)
        rule += "@" + profile[len(SD):]
    return f"{issue.severity} {issue.code} {issue.hl7_error} {issue.location} [{rule}] {issue.message}"


def obs_entry(bundle: dict[str, Any]) -> dict[str, Any]:
    return bundle["entry"][3]["resource"]


Change = Callable[[dict[str, Any]], Any]

# (name, example, change, every issue in order)
VARIANTS: list[tuple[str, str, Change, list[str]]] = [
    # ---- the base walk: strings, codes, dates, objects, arrays, null
    ("blank string", "Patient-example", lambda p: p["name"][0].update(text="  "), [
        "error value 102 Patient.name[0].text [format] must not be empty or blank (string)",
    ]),
    ("dateTime without seconds and offset", "Observation-glucose",
     lambda o: o.update(effectiveDateTime="2026-11-20T08:12"), [
         "error value 102 Observation.effectiveDateTime [format] '2026-11-20T08:12' is not a valid dateTime (a time "
         "needs seconds and a UTC offset such as +08:00)",
     ]),
    ("code with two spaces", "Observation-glucose", lambda o: o.update(status="final  x"), [
        "error value 102 Observation.status [format] 'final  x' is not a valid code",
    ]),
    ("uri with a space", "Observation-glucose",
     lambda o: o["code"]["coding"][1].update(system="http://loinc .org"), [
         "error value 102 Observation.code.coding[1].system [format] 'http://loinc .org' is not a valid uri",
     ]),
    ("a valid dateTime is not a valid instant", "Observation-glucose",
     lambda o: o.update(effectiveDateTime="2026-11-20", issued="2026-11-20"), [
         "error value 102 Observation.issued [format] '2026-11-20' is not a valid instant",
     ]),
    ("string where an object belongs", "Observation-glucose", lambda o: o.update(code="GLU"), [
        "error structure 102 Observation.code [type] must be a JSON object (CodeableConcept), not str",
        "error invariant 102 Observation [cyhr-obs-1@cyhr-lab-observation] fails cyhr-obs-1: 首个编码为签发机构本地项目编码 / The "
        "first coding is the issuer's own item code",
    ]),
    ("object where a code belongs", "Observation-glucose", lambda o: o.update(status={"code": "final"}), [
        "error value 102 Observation.status [format] must be a JSON string (code)",
    ]),
    ("array where one value belongs", "Observation-glucose", lambda o: o.update(status=["final"]), [
        "error structure 102 Observation.status [array] holds one value, not an array",
    ]),
    ("one object where an array belongs", "Observation-glucose", lambda o: o.update(category=o["category"][0]), [
        "error structure 102 Observation.category [array] must be a JSON array",
    ]),
    ("empty array", "Observation-glucose", lambda o: o.update(note=[]), [
        "error structure 102 Observation.note [structure] must not be an empty array",
    ]),
    ("null value", "Observation-glucose", lambda o: o.update(issued=None), [
        "error structure 102 Observation.issued [structure] null is not allowed in FHIR JSON",
    ]),
    ("null in an array", "Patient-example", lambda p: p["name"][0].update(given=["三", None]), [
        "error structure 102 Patient.name[0].given[1] [structure] null is not allowed in FHIR JSON",
    ]),
    ("empty object", "Observation-glucose", lambda o: o.update(valueQuantity={}), [
        "error structure 102 Observation.valueQuantity [structure] must have a value or children (ele-1)",
    ]),
    ("unknown element and primitive extension", "Patient-example",
     lambda p: p.update(nmae="x", _gender=3, _birthDate={"extension": [{"url": "u", "valueString": "y"}]}), [
         "error structure 102 Patient.nmae [unknown-element] is not an element of Patient",
         "error structure 102 Patient._gender [structure] must be an object (or array of objects)",
     ]),
    ("boolean as a string", "Organization-issuer", lambda o: o.update(active="true"), [
        "error value 102 Organization.active [format] must be true or false (boolean)",
    ]),
    ("decimal as a string", "Observation-glucose", lambda o: o["valueQuantity"].update(value="5.6"), [
        "error value 102 Observation.valueQuantity.value [format] must be a JSON number (decimal)",
    ]),
    ("decimal as a Decimal", "Observation-glucose", lambda o: o["valueQuantity"].update(value=Decimal("5.60")), []),
    ("integer out of range", "Patient-example", lambda p: p.update(multipleBirthInteger=2147483648), [
        "error value 102 Patient.multipleBirthInteger [format] 2147483648 is out of range for integer",
    ]),
    ("whole decimal as an integer", "Patient-example", lambda p: p.update(multipleBirthInteger=Decimal("2")), []),
    ("contained resource of no known type", "Observation-glucose",
     lambda o: o.update(contained=[{"resourceType": "Observatoin", "id": "x"}]), [
         "error structure 102 Observation.contained[0].resourceType [structure] 'Observatoin' is not an R4 resource "
         "type",
     ]),
    ("contained resource checked in turn", "Observation-glucose",
     lambda o: o.update(contained=[{"resourceType": "Patient", "id": "p", "gender": "m f", "name": {"text": 1}}]),
     [
         "error code-invalid 103 Observation.contained[0].gender [binding] code 'm f' is not in the required value "
         "set http://hl7.org/fhir/ValueSet/administrative-gender (one of female, male, other, unknown)",
         "error structure 102 Observation.contained[0].name [array] must be a JSON array",
         "error value 102 Observation.contained[0].name.text [format] must be a JSON string (string)",
     ]),
    # ---- R4's own required bindings on codes (HL7's value sets, gateway/fhir/r4-required-codes.json)
    ("a status R4 does not define", "Observation-glucose", lambda o: o.update(status="done"),
     [
         "error code-invalid 103 Observation.status [binding] code 'done' is not in the required value set "
         "http://hl7.org/fhir/ValueSet/observation-status (one of amended, cancelled, corrected, entered-in-error, "
         "final, preliminary, registered, unknown)",
     ]),
    ("a code of a datatype and a code in an array", "Observation-glucose",
     lambda o: (o["valueQuantity"].update(comparator="~"),
                o.update(contained=[{"resourceType": "Patient", "id": "p",
                                     "telecom": [{"system": "wechat", "value": "x"}]}])),
     [
         "error code-invalid 103 Observation.valueQuantity.comparator [binding] code '~' is not in the required "
         "value set http://hl7.org/fhir/ValueSet/quantity-comparator (one of <, <=, >, >=)",
         "error code-invalid 103 Observation.contained[0].telecom[0].system [binding] code 'wechat' is not in the "
         "required value set http://hl7.org/fhir/ValueSet/contact-point-system (one of email, fax, other, pager, "
         "phone, sms, url)",
     ]),
    ("a code that is not a well-formed code is reported as such, once", "Observation-glucose",
     lambda o: o.update(status=" final"),
     ["error value 102 Observation.status [format] ' final' is not a valid code"]),
    # ---- extensions
    ("extension without url and with both value and extensions", "Observation-glucose",
     lambda o: o["extension"].append({"valueString": "x", "extension": [{"url": "a", "valueString": "b"}]}), [
         "error invariant 102 Observation.extension[2] [ext-1] must have either a value or extensions, not both or "
         "neither (ext-1)",
         "error required 101 Observation.extension[2].url [cardinality] is required: an extension needs its url",
     ]),
    ("unknown extension of ours", "Observation-glucose",
     lambda o: o["extension"].append({"url": SD + "nope", "valueString": "x"}), [
         "error extension 102 Observation.extension[2].url [unknown-extension] names an extension this guide does "
         "not define: https://fhir.cyhr.org.cn/StructureDefinition/nope",
     ]),
    ("extension in the wrong place", "Observation-glucose",
     lambda o: o["code"].update(extension=[copy.deepcopy(o["extension"][0])]), [
         "error extension 102 Observation.code.extension[0] [extension-context] is not allowed here: extension "
         "https://fhir.cyhr.org.cn/StructureDefinition/recognition-mark may sit on Observation, DiagnosticReport, "
         "not Observation.code",
     ]),
    ("mark that does not end in HR", "Observation-glucose", lambda o: o["extension"][0].update(valueString="川渝"),
     [
         "error invariant 102 Observation.extension[0] [cyhr-mark-1@recognition-mark] fails cyhr-mark-1: 互认标识为地域前缀"
         "加 HR / The mark is a region prefix followed by HR",
     ]),
    ("a bare HR, no region", "Observation-glucose", lambda o: o["extension"][0].update(valueString="HR"),
     [
         "error invariant 102 Observation.extension[0] [cyhr-mark-1@recognition-mark] fails cyhr-mark-1: 互认标识为地域前缀"
         "加 HR / The mark is a region prefix followed by HR",
     ]),
    # ---- cardinality, choices and fixed values of the profiles
    ("required elements missing", "Observation-glucose", lambda o: [o.pop("subject"), o.pop("performer")], [
        "error required 101 Observation.subject [cardinality@cyhr-lab-observation] needs at least 1 "
        "(Observation.subject), found 0",
        "error required 101 Observation.performer [cardinality@cyhr-lab-observation] needs at least 1 "
        "(Observation.performer), found 0",
    ]),
    ("two values of one choice, one of a type the profile forbids", "Observation-glucose",
     lambda o: o.update(effectivePeriod={"start": "2026-11-20T08:12:00+08:00"}), [
         "error structure 102 Observation.effective[x] [cardinality@cyhr-lab-observation] only one of "
         "effectiveDateTime, effectivePeriod may be present",
         "error structure 102 Observation.effectivePeriod [type@cyhr-lab-observation] is not allowed: "
         "Observation.effective[x] may be dateTime, not Period",
     ]),
    ("value of a type the profile forbids", "Observation-glucose",
     lambda o: [o.pop("valueQuantity"), o.update(valueBoolean=True)], [
         "error structure 102 Observation.valueBoolean [type@cyhr-lab-observation] is not allowed: "
         "Observation.value[x] may be Quantity | string | CodeableConcept | Range | Ratio | dateTime, not boolean",
     ]),
    ("no value and no reason", "Observation-glucose", lambda o: o.pop("valueQuantity"), [
        "error invariant 102 Observation [cyhr-obs-2@cyhr-lab-observation] fails cyhr-obs-2: 有结果值或缺失原因 / A result "
        "has a value or a data-absent reason",
    ]),
    ("local code not first", "Observation-glucose", lambda o: o["code"]["coding"].reverse(), [
        "error invariant 102 Observation [cyhr-obs-1@cyhr-lab-observation] fails cyhr-obs-1: 首个编码为签发机构本地项目编码 / The "
        "first coding is the issuer's own item code",
    ]),
    ("fixed code differs", "Bundle-lab-report", lambda b: b.update(type="document"), [
        'error value 102 Bundle.type [fixed@cyhr-report-bundle] must be exactly "collection", found "document"',
    ]),
    ("fixed system differs on a sliced identifier", "DiagnosticReport-occupational",
     lambda r: r["identifier"][0]["assigner"]["identifier"].update(system="https://example.org/uscc"), [
         "error value 102 DiagnosticReport.identifier[0].assigner.identifier.system "
         '[fixed@cyhr-occupational-exam-report] must be exactly "https://fhir.cyhr.org.cn/sid/uscc", found '
         '"https://example.org/uscc"',
     ]),
    ("too many of a slice", "Observation-glucose", lambda o: o["category"].append(copy.deepcopy(o["category"][0])),
     [
         "error structure 102 Observation.category [cardinality@cyhr-lab-observation] allows at most 1 "
         "(Observation.category:laboratory), found 2",
     ]),
    # ---- slices and patterns
    ("category not laboratory", "Observation-glucose", lambda o: o["category"][0]["coding"][0].update(code="imaging"),
     [
         "error required 101 Observation.category [cardinality@cyhr-lab-observation] needs at least 1 "
         "(Observation.category:laboratory), found 0",
     ]),
    ("required slice missing", "Organization-issuer", lambda o: o["identifier"].pop(0), [
        "error required 101 Organization.identifier [cardinality@cyhr-organization] needs at least 1 "
        "(Organization.identifier:uscc), found 0",
    ]),
    ("sliced element absent altogether", "DiagnosticReport-occupational", lambda r: r.pop("identifier"), [
        "error required 101 DiagnosticReport.identifier [cardinality@cyhr-occupational-exam-report] needs at least "
        "1 (DiagnosticReport.identifier:reportNumber), found 0",
    ]),
    ("slice pattern not met", "Organization-issuer",
     lambda o: o["identifier"][0]["type"]["coding"][0].update(code="MIPLRN"), [
         'error value 102 Organization.identifier[0].type [pattern@cyhr-organization] must contain {"coding": '
         '[{"system": "https://fhir.cyhr.org.cn/CodeSystem/member-identifier-type", "code": "USCC"}]}, found '
         '{"coding": [{"system": "https://fhir.cyhr.org.cn/CodeSystem/member-identifier-type", "code": "MIPLRN"}]}',
     ]),
    ("required extension slices missing", "DiagnosticReport-occupational", lambda r: r.pop("extension"), [
        "error required 101 DiagnosticReport.extension [cardinality@cyhr-occupational-exam-report] needs at least 1 "
        "(DiagnosticReport.extension:examType), found 0",
        "error required 101 DiagnosticReport.extension [cardinality@cyhr-occupational-exam-report] needs at least 1 "
        "(DiagnosticReport.extension:hazardFactor), found 0",
    ]),
    ("identity card check digit and birth date", "Patient-example",
     lambda p: p["identifier"][0].update(value="510104198513071239"), [
         "warning invariant 102 Patient [cyhr-pat-3@cyhr-patient] fails cyhr-pat-3: 出生日期与身份证号一致 / The birth date "
         "agrees with the identity card number",
         "error invariant 102 Patient.identifier[0] [cyhr-pat-1@cyhr-patient] fails cyhr-pat-1: 身份证号须为 17 "
         "位数字加校验位，校验位符合 GB 11643-1999 / The identity card number is 17 digits and a GB 11643-1999 check character",
         "error invariant 102 Patient.identifier[0] [cyhr-pat-2@cyhr-patient] fails cyhr-pat-2: 身份证号中的出生日期是真实日期 / "
         "The birth date inside the identity card number is a calendar date",
     ]),
    # ---- bindings and FHIRPath invariants
    ("conclusion not in the value set", "DiagnosticReport-occupational",
     lambda r: r["conclusionCode"][0]["coding"][0].update(code="healthy"), [
         "error code-invalid 103 DiagnosticReport.conclusionCode[0] [binding@cyhr-occupational-exam-report] none of "
         "its codings is in the required value set https://fhir.cyhr.org.cn/ValueSet/exam-conclusion",
     ]),
    ("coded extension value not in the value set", "DiagnosticReport-occupational",
     lambda r: r["extension"][0]["valueCoding"].update(code="annual"), [
         "error code-invalid 103 DiagnosticReport.extension[0].valueCoding [binding@exam-type] "
         '"https://fhir.cyhr.org.cn/CodeSystem/exam-type"#annual is not in the required value set '
         "https://fhir.cyhr.org.cn/ValueSet/exam-type",
     ]),
    ("hazard factor without its category", "DiagnosticReport-occupational",
     lambda r: r["extension"][1]["extension"].pop(1), [
         "error invariant 102 DiagnosticReport.extension[1] [cyhr-haz-1@hazard-factor] fails cyhr-haz-1: "
         "目录中的危害因素须带类别 / A factor of the catalogue carries its exposure category",
     ]),
    ("negative exposure years", "DiagnosticReport-occupational",
     lambda r: r["extension"][3].update(valueDecimal=Decimal("-1")), [
         "error invariant 102 DiagnosticReport.extension[3] [cyhr-expo-1@exposure-years] fails cyhr-expo-1: 接害工龄不为负 "
         "/ Years of exposure are not negative",
     ]),
    # ---- a Bundle and its entries
    ("reference to no entry", "Bundle-lab-report",
     lambda b: obs_entry(b)["subject"].update(reference="urn:uuid:00000000-0000-0000-0000-000000000000"), [
         "error invariant 102 Bundle [cyhr-bdl-6@cyhr-report-bundle] fails cyhr-bdl-6: 包内 urn:uuid 引用均指向包内条目 / "
         "Every urn:uuid reference points to an entry of the Bundle",
     ]),
    ("entry resource of no known type", "Bundle-lab-report",
     lambda b: b["entry"][2].update(resource={"resourceType": "Specimin"}), [
         "error structure 102 Bundle.entry[2].resource.resourceType [structure] 'Specimin' is not an R4 resource "
         "type",
     ]),
    ("entry without its profile and a second patient", "Bundle-lab-report",
     lambda b: [obs_entry(b).pop("meta"), b["entry"].append(copy.deepcopy(b["entry"][1]))], [
         "error invariant 102 Bundle [cyhr-bdl-2@cyhr-report-bundle] fails cyhr-bdl-2: 恰有一名患者 / Exactly one Patient",
         "error invariant 102 Bundle [cyhr-bdl-4@cyhr-report-bundle] fails cyhr-bdl-4: 患者与检验结果声明本指南的 profile / "
         "Patient and Observation entries declare this guide's profile",
         "error duplicate 102 Bundle.entry[7].fullUrl [bdl-7] fails bdl-7: its fullUrl "
         "'urn:uuid:700df50a-e6a9-5256-b3e2-f924f5605297' is also the one of entry 1: two resources of the Bundle "
         "have one identity",
     ]),
]


@pytest.mark.parametrize("name, source, change, expected", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_wrong_input_gives_exactly_these_issues(guide: Guide, name: str, source: str, change: Change,
                                                expected: list[str]) -> None:
    resource = example(source)
    assert guide.validate(resource) == []
    change(resource)
    assert [line(i) for i in guide.validate(resource)] == expected


def test_a_string_once_found_well_formed_is_still_judged_by_its_type(guide: Guide) -> None:
    """The walk remembers good codes and dates; that must not let a good date pass as an instant, or a bad one by."""
    obs = example("Observation-glucose")
    obs["effectiveDateTime"] = "2026-11-20"
    for _ in range(3):  # the second and third time round, every string has been seen before
        assert guide.validate(obs) == []
        wrong = copy.deepcopy(obs)
        wrong["issued"] = "2026-11-20"  # a good dateTime, just seen, but not an instant
        wrong["status"] = "final "  # a good code, just seen, with a trailing space
        assert [line(i) for i in guide.validate(wrong)] == [
            "error value 102 Observation.status [format] 'final ' is not a valid code",
            "error value 102 Observation.issued [format] '2026-11-20' is not a valid instant",
        ]


def test_a_list_or_object_where_a_bound_code_belongs_is_an_issue(guide: Guide) -> None:
    """validate() never raises for bad input."""
    report = example("DiagnosticReport-occupational")
    report["extension"][0]["valueCoding"].update(code=["annual"], system={"x": 1})
    found = [line(i) for i in guide.validate(report)]
    assert any(f.startswith("error code-invalid 103 DiagnosticReport.extension[0].valueCoding [binding@exam-type]")
               for f in found), found


def test_a_value_nested_thousands_deep_where_a_fixed_value_applies_is_an_issue(guide: Guide) -> None:
    deep: Any = "x"
    for _ in range(3000):
        deep = [deep]
    bundle = example("Bundle-lab-report")
    bundle["type"] = deep  # Bundle.type is fixed to collection: the message names what was found instead
    issues = guide.validate(bundle)  # must not raise
    assert "Bundle.type" in {i.location for i in issues if i.severity == "error"}


def test_a_code_held_as_a_str_subclass_is_read_as_its_text(guide: Guide) -> None:
    """R4's bindings on codes, as the other string checks, read a ``str`` subclass as the text it holds."""

    class Code(str):
        pass

    resource = example("Observation-glucose")
    resource["status"] = Code("final")
    assert guide.validate(resource) == []
    resource["status"] = Code("done")
    assert [(i.location, i.extra["rule"]) for i in guide.validate(resource)] == [("Observation.status", "binding")]


def test_resource_type_inside_a_backbone_element_is_an_element_like_any_other(guide: Guide) -> None:
    """Only a resource's own ``resourceType`` is passed over: in a backbone element it is unknown, or, where R4
    has an element of that name (ExampleScenario.instance), checked as one. Both validators agree."""
    observation = example("Observation-glucose")
    observation["component"] = [{"code": {"text": "x"}, "resourceType": "Observation"}]
    scenario = {"resourceType": "ExampleScenario", "status": "draft",
                "instance": [{"resourceId": "a", "resourceType": "Bogus"}]}
    assert [(i.location, i.extra["rule"]) for i in guide.validate(observation)] == [
        ("Observation.component[0].resourceType", "unknown-element")]
    assert [(i.location, i.extra["rule"]) for i in guide.validate(scenario)] == [
        ("ExampleScenario.instance[0].resourceType", "binding")]
    scenario["instance"][0]["resourceType"] = "Patient"
    assert guide.validate(scenario) == []
