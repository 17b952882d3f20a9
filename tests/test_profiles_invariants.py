"""Invariants: each Python twin in NATIVE_CHECKS gives fhirpathpy's answer to the published FHIRPath.

The profiles carry FHIRPath (what other members' validators run); the gateway
runs a Python twin for the hot ones. For every twin, a deterministic corpus
of good, bad and odd inputs is evaluated both ways and must agree. The two
identifier invariants are also held against gateway.identifiers.
"""
from __future__ import annotations

import copy
import json
import random
from decimal import Decimal

import pytest

from conftest import ROOT
from gateway.errors import IdentifierError
from gateway.fhir.profiles import NATIVE_CHECKS, Guide, load_guide
from gateway.identifiers import check_id_card, check_uscc, id_card_check_char, uscc_check_char
from gateway.naming import SYSTEM_ID_CARD, SYSTEM_USCC, ext_url, local_item_system, sd_url

EXAMPLES = ROOT / "profiles" / "examples"
USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"


@pytest.fixture(scope="module")
def guide() -> Guide:
    return load_guide(ROOT / "profiles")


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def id_cards() -> list[object]:
    rnd = random.Random(11643)
    out: list[object] = ["11010519491231002X", "510104198503071239", "500103199202290047", "11010519491231002x",
                         "1101051949123100", "110105194912310021X", None, 11010519491231002, ""]
    for date in ("19000229", "20000229", "19990229", "19991301", "19990431", "19990430", "18791231", "18800101",
                 "20261122", "00000101"):
        body = f"510104{date}123"
        out += [body + id_card_check_char(body), body + "0"]
    for _ in range(60):
        body = "".join(rnd.choice("0123456789") for _ in range(6)) + f"{rnd.randint(1850, 2030)}" \
               f"{rnd.randint(1, 13):02d}{rnd.randint(1, 31):02d}" + "".join(rnd.choice("0123456789") for _ in range(3))
        out += [body + id_card_check_char(body), body + rnd.choice("0123456789X")]
    return out


def usccs() -> list[object]:
    rnd = random.Random(32100)
    out: list[object] = ["12510104MB1F02934G", "91350100M000100Y43", "11500000MB1670604W", "12330000470051726F",
                         "12510104mb1f02934g", "12510104MB1F0293IG", "12510104MB1F02934", "12510104MB1F02934GG",
                         None, 12, ""]
    for _ in range(80):
        body = "".join(rnd.choice(USCC_CHARS) for _ in range(2)) + "".join(rnd.choice("0123456789") for _ in range(6)) \
               + "".join(rnd.choice(USCC_CHARS + "IOSVZ") for _ in range(9))
        check = uscc_check_char(body) if all(c in USCC_CHARS for c in body) else "0"
        out += [body + check, body + rnd.choice(USCC_CHARS)]
    return out


def identifiers(system: str, values: list[object]) -> list[dict]:
    out = []
    for v in values:
        ident: dict = {"system": system}
        if v is not None:
            ident["value"] = v
        out.append(ident)
    return out


def observations() -> list[dict]:
    base = example("Observation-glucose.json")
    out = [base]
    local = base["code"]["coding"][0]

    def variant(change) -> None:
        obs = copy.deepcopy(base)
        change(obs)
        out.append(obs)

    variant(lambda o: o["code"]["coding"].reverse())
    variant(lambda o: o["code"].pop("coding"))
    variant(lambda o: o.pop("code"))
    variant(lambda o: o["code"]["coding"][0].pop("system"))
    variant(lambda o: o["code"]["coding"][0].update(system=local_item_system("")))
    variant(lambda o: o["code"]["coding"][0].update(system="https://fhir.cyhr.org.cn/sid/local-items/X"))
    variant(lambda o: o["code"].update(coding=dict(local)))
    for status in ("final", "cancelled", "entered-in-error", "preliminary", None):
        for value in ("valueQuantity", "valueString", "valueBoolean", "valuePeriod", "dataAbsentReason", None):
            obs = copy.deepcopy(base)
            obs.pop("valueQuantity")
            if value:
                obs[value] = {"text": "x"} if value in ("dataAbsentReason",) else base["valueQuantity"]
            if status:
                obs["status"] = status
            else:
                obs.pop("status")
            out.append(obs)
    return out


def extensions(url: str, kind: str, values: list[object]) -> list[dict]:
    out = [{"url": url}]
    for v in values:
        out.append({"url": url, kind: v})
    out.append({"url": url, "valueCode": "HR"})
    return out


def bundles() -> list[dict]:
    lab = example("Bundle-lab-report.json")
    occ = example("Bundle-occupational-signed.json")
    out = [lab, occ, {"resourceType": "Bundle", "type": "collection"}]

    def variant(source: dict, change) -> None:
        b = copy.deepcopy(source)
        change(b)
        out.append(b)

    variant(lab, lambda b: b["entry"][0].update(fullUrl="Organization/1"))
    variant(lab, lambda b: b["entry"][0].pop("fullUrl"))
    variant(lab, lambda b: b["entry"][1]["resource"].pop("meta"))
    variant(lab, lambda b: b["entry"][3]["resource"]["meta"].update(profile=[sd_url("cyhr-lab-observation") + "|1"]))
    variant(lab, lambda b: b["entry"][3]["resource"]["meta"].update(profile=[sd_url("cyhr-patient")]))
    variant(lab, lambda b: b["entry"][-1]["resource"]["meta"].update(profile=[sd_url("cyhr-occupational-exam-report")]))
    variant(lab, lambda b: b["entry"][-1]["resource"]["meta"].update(profile=[sd_url("cyhr-lab-observation")]))
    variant(lab, lambda b: b["entry"][-1]["resource"]["result"].append({"reference": "urn:uuid:0000"}))
    variant(lab, lambda b: b["entry"][-1]["resource"]["result"].append({"reference": "Observation/1"}))
    variant(lab, lambda b: b["entry"][3]["resource"].update(
        extension=[{"url": ext_url("employer"), "valueReference": {"reference": "urn:uuid:nowhere"}}]))
    variant(lab, lambda b: b["entry"][3]["resource"].update(
        contained=[{"resourceType": "Specimen", "subject": {"reference": "urn:uuid:nowhere"}}]))
    variant(occ, lambda b: b["entry"][-1]["resource"]["extension"][-1]["valueReference"].update(
        reference=b["entry"][0]["fullUrl"]))
    variant(occ, lambda b: b["entry"][-1]["resource"]["extension"][-1]["valueReference"].update(
        reference="urn:uuid:employer-missing"))
    return out


def reports() -> list[dict]:
    base = [e["resource"] for e in example("Bundle-lab-report.json")["entry"]
            if e["resource"]["resourceType"] == "DiagnosticReport"][0]
    replaces = {"url": ext_url("replaces"), "valueIdentifier": {"value": "R1"}}
    out = []
    for status in ("final", "corrected", "amended", "preliminary", None):
        for extension in ([], [replaces], [{"url": ext_url("exam-type")}], [{"url": ext_url("exam-type")}, replaces],
                          None):
            r = copy.deepcopy(base)
            r.pop("extension", None)
            if status is None:
                r.pop("status", None)
            else:
                r["status"] = status
            if extension is not None:
                r["extension"] = extension
            out.append(r)
    return out


def patients() -> list[dict]:
    base = example("Patient-example.json")
    numbers = ["11010519491231002X", "510104198503071239", "500103199202290047", "1101051949123100", None]
    out = []
    for number in numbers:
        for birth in ("1949-12-31", "1985-03-07", "1949", "1949-12", None):
            for gender in ("male", "female", "other", "unknown", None):
                p = copy.deepcopy(base)
                for key in ("birthDate", "gender", "identifier"):
                    p.pop(key, None)
                if number is not None:
                    p["identifier"] = [{"system": "urn:oid:2.16.156.10011.1.13", "value": "MR1"},
                                       {"system": SYSTEM_ID_CARD, "value": number}]
                if birth is not None:
                    p["birthDate"] = birth
                if gender is not None:
                    p["gender"] = gender
                out.append(p)
    out.append({"resourceType": "Patient", "identifier": [{"system": SYSTEM_ID_CARD}]})
    return out


def names() -> list[dict]:
    return [{"text": "张三"}, {"family": "张"}, {"given": ["三"]}, {"text": "张三", "family": "张"}, {}, {"use": "official"}]


def hazard_factors() -> list[dict]:
    """Hazard-factor extensions: catalogue and sender-only factors, with and without a category, odd parts."""
    catalogue = {"system": "https://fhir.cyhr.org.cn/CodeSystem/hazard-factor", "code": "benzene"}
    sender = {"system": "https://fhir.cyhr.org.cn/sid/hazard-code/cdc-zyjk", "code": "0403"}
    category = {"url": "category", "valueCoding": {"system": "https://fhir.cyhr.org.cn/CodeSystem/exposure-category",
                                                   "code": "chemical"}}
    factors: list[object] = [catalogue, sender, {"code": "benzene"}, {"system": catalogue["system"]}, {}, "benzene",
                             None]
    out = []
    for factor in factors:
        for parts in ([], [category], [category, category], [{"url": "source", "valueCoding": sender}]):
            ext: dict = {"url": ext_url("hazard-factor"), "extension": list(parts)}
            if factor is not None:
                ext["extension"].insert(0, {"url": "factor", "valueCoding": factor})
            out.append(ext)
    out += [{"url": ext_url("hazard-factor")},
            {"url": ext_url("hazard-factor"), "extension": [{"url": "factor", "valueString": "苯"}]},
            {"url": ext_url("hazard-factor"), "extension": [{"url": "factor", "valueCoding": catalogue},
                                                            {"url": "category"}]}]
    return out


CORPUS = {
    "cyhr-dr-1": reports,
    "cyhr-dr-2": reports,
    "cyhr-bdl-2": bundles,
    "cyhr-bdl-3": bundles,
    "cyhr-pat-3": patients,
    "cyhr-pat-4": patients,
    "cyhr-pat-5": patients,
    "cyhr-pat-6": names,
    "cyhr-pat-1": lambda: identifiers(SYSTEM_ID_CARD, id_cards()),
    "cyhr-pat-2": lambda: identifiers(SYSTEM_ID_CARD, id_cards()),
    "cyhr-org-1": lambda: identifiers(SYSTEM_USCC, usccs()),
    "cyhr-obs-1": observations,
    "cyhr-obs-2": observations,
    "cyhr-mark-1": lambda: extensions(ext_url("recognition-mark"), "valueString",
                                      ["川渝HR", "HR", "四川HR", "川渝 HR", "川渝hr", "川渝HR ", "", "HRX", 5]),
    "cyhr-cat-1": lambda: extensions(ext_url("catalogue-item"), "valueCoding",
                                     [{"system": "s", "code": "c"}, {"code": "c"}, {"system": "s"}, {}, "c"]),
    "cyhr-bdl-1": bundles,
    "cyhr-bdl-4": bundles,
    "cyhr-bdl-5": bundles,
    "cyhr-bdl-6": bundles,
    "cyhr-org-2": lambda: identifiers("https://fhir.cyhr.org.cn/sid/miplrn", [
        "PDY10000251010211A1001", "A-1", "a-1", "AB 1", "AB\n", "AB\nCD", "\nAB", "", "-", "中文", "ABC1", 5, None,
        True, ["AB"], {"x": 1}, "A_B", "Ａ1"]),
    "cyhr-expo-1": lambda: extensions(ext_url("exposure-years"), "valueDecimal", [
        0, 1, Decimal("0.5"), Decimal("-0.5"), -1, Decimal("0.00"), Decimal("-0"), 2.5, -2.5, "3", "-3", True,
        False, None, [1], [1, -1], {"value": 1}]) + [
            {"url": ext_url("exposure-years"), "valueInteger": -3},
            {"url": ext_url("exposure-years"), "valueString": "-3"}],
    "cyhr-rpl-1": lambda: extensions(ext_url("replaces"), "valueIdentifier", [
        {"system": "s", "value": "v"}, {"system": "s"}, {"value": "v"}, {}, {"system": None, "value": "v"},
        {"system": "", "value": ""}, {"system": "s", "value": None}, "s|v", None, [], [{"system": "s", "value": "v"}],
        {"system": ["s"], "value": "v"}, {"system": [], "value": "v"}, 5]),
    "cyhr-haz-1": hazard_factors,
}


def test_every_twin_has_a_corpus_and_a_published_invariant(guide: Guide) -> None:
    assert set(NATIVE_CHECKS) == set(CORPUS)
    assert set(NATIVE_CHECKS) <= set(guide.invariant_keys())


def fhirpath_verdict(guide: Guide, key: str, case: object) -> bool:
    """fhirpathpy's answer; where it cannot evaluate (a number where a string belongs) the validator
    reports the invariant as failed, so that counts as False."""
    try:
        return guide.evaluate_invariant(key, case, native=False)
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("key", sorted(CORPUS))
def test_twin_agrees_with_fhirpath(guide: Guide, key: str) -> None:
    cases = CORPUS[key]()
    verdicts = set()
    for case in cases:
        by_fhirpath = fhirpath_verdict(guide, key, case)
        by_twin = guide.evaluate_invariant(key, case, native=True)
        assert by_twin == by_fhirpath, (key, case)
        verdicts.add(by_twin)
    assert verdicts == {True, False}, "the corpus exercises both outcomes"


def test_identity_card_invariants_equal_the_gateway_check(guide: Guide) -> None:
    for value in id_cards():
        if not (isinstance(value, str) and len(value) == 18 and value == value.upper()):
            continue  # check_id_card also widens 15-digit and upper-cases; the profile takes stored values
        ident = {"system": SYSTEM_ID_CARD, "value": value}
        both = guide.evaluate_invariant("cyhr-pat-1", ident, native=False) and \
            guide.evaluate_invariant("cyhr-pat-2", ident, native=False)
        try:
            check_id_card(value)
            accepted, why = True, ""
        except IdentifierError as exc:
            accepted, why = False, str(exc)
        # the profile checks the check digit and the birth date; the gateway also checks the address code
        # against GB/T 2260 (not expressible in the published FHIRPath): it refuses more, never less
        if both and not accepted:
            assert "address code" in why, (value, why)
        else:
            assert both == accepted, value


def test_uscc_invariant_equals_the_gateway_check(guide: Guide) -> None:
    for value in usccs():
        if not (isinstance(value, str) and len(value) == 18 and value == value.upper()):
            continue
        try:
            check_uscc(value)
            accepted = True
        except IdentifierError:
            accepted = False
        assert guide.evaluate_invariant("cyhr-org-1", {"system": SYSTEM_USCC, "value": value}, native=False) \
            == accepted, value


def test_an_invariant_without_twin_runs_through_fhirpath(guide: Guide) -> None:
    """Every invariant on the path of report Bundles has a twin; the referral Task's (a few a day, off the hot
    path) run in fhirpathpy, and so does one added to a profile without a twin."""
    off_the_hot_path = {"cyhr-task-1", "cyhr-task-2", "cyhr-task-3"}
    assert set(guide.invariant_keys()) == set(NATIVE_CHECKS) | off_the_hot_path
    constraint = guide._constraints["cyhr-expo-1"]
    twin, constraint.native = constraint.native, None
    try:
        ext = {"url": ext_url("exposure-years"), "valueDecimal": Decimal("-1")}
        with pytest.raises(KeyError):
            guide.evaluate_invariant("cyhr-expo-1", ext, native=True)
        issues = guide.validate({"resourceType": "Patient", "extension": [ext]})
        failed = [i for i in issues if i.extra["rule"] == "cyhr-expo-1"]
        assert [i.message for i in failed] == ["fails cyhr-expo-1: 接害工龄不为负 / Years of exposure are not negative"]
    finally:
        constraint.native = twin


def test_absent_gender_does_not_trip_the_id_card_gender_warning(guide: Guide) -> None:
    patient = example("Patient-example.json")
    patient.pop("gender", None)
    assert guide.evaluate_invariant("cyhr-pat-4", patient, native=False)


def test_every_twin_stands_for_the_shipped_expression_and_every_expression_parses(guide: Guide) -> None:
    """The shipped guide's twinned invariants are decided by their twins (their FHIRPath is not parsed when the
    guide loads: the twins above are held to it); every expression of the guide parses strictly all the same."""
    from gateway.fhir.profiles import NATIVE_EXPRESSIONS, _check_fhirpath_syntax

    assert set(NATIVE_EXPRESSIONS) == set(NATIVE_CHECKS)
    for key in NATIVE_CHECKS:
        assert guide._constraints[key].native is NATIVE_CHECKS[key], f"{key}: the guide's expression changed"
    for key in guide.invariant_keys():
        _check_fhirpath_syntax(guide._constraints[key].expression)


def _guide_with(tmp_path, expression: str) -> Guide:
    import shutil

    copy_dir = tmp_path / "profiles"
    shutil.copytree(ROOT / "profiles", copy_dir, ignore=shutil.ignore_patterns("examples"))
    path = copy_dir / "StructureDefinition-exposure-years.json"
    text = path.read_text(encoding="utf-8")
    assert text.count('"value.ofType(decimal).all($this >= 0)"') == 1
    path.write_text(text.replace('"value.ofType(decimal).all($this >= 0)"', json.dumps(expression)), encoding="utf-8")
    return load_guide(copy_dir)


def test_an_invariant_whose_words_changed_is_decided_by_them_not_by_the_twin_of_the_old_ones(tmp_path) -> None:
    """A guide (a deployment's own profiles/) saying something else under a twinned key: its FHIRPath decides."""
    from gateway.errors import ConfigError

    stricter = _guide_with(tmp_path / "a", "value.ofType(decimal).all($this >= 1)")
    assert stricter._constraints["cyhr-expo-1"].native is None
    half = {"resourceType": "Patient", "extension": [{"url": ext_url("exposure-years"),
                                                      "valueDecimal": Decimal("0.5")}]}
    failed = [i for i in stricter.validate(half) if i.extra.get("rule") == "cyhr-expo-1"]
    assert len(failed) == 1  # the twin (>= 0) would have passed it
    assert not [i for i in load_guide(ROOT / "profiles").validate(half) if i.extra.get("rule") == "cyhr-expo-1"]
    with pytest.raises(ConfigError, match="cyhr-expo-1 does not compile"):
        _guide_with(tmp_path / "b", "value.ofType(decimal).all($this >= ")
