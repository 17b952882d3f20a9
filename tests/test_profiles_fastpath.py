"""Profile validation's check-only pass gives the same answer as the full, reporting validation.

:meth:`Guide.validate` first asks :mod:`gateway.fhir.profilecheck` whether a resource
has nothing at all to report, and only runs the full walk
(:meth:`Guide.validate_reference`) otherwise. Here both run on a corpus: the guide's
examples and every golden file, Bundles the pipeline builds from the sample inputs
(HL7 v2, CDA, CDC CSV, generated ORU messages) and the FHIR submissions, then a few
thousand seeded mutations of them (deleted, duplicated and retyped elements, bad
codes and dates, broken references, unknown elements, extensions out of place, ...).
For each: ``validate`` returns exactly the reference's issues (severity, code,
location, message, HL7 error code, rule and profile, in order), and whenever the
check-only pass says "clean" the reference has nothing at all to say.

``GATEWAY_FUZZ_LONG=1`` runs many more mutations.
"""
from __future__ import annotations

import copy
import json
import os
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, ROOT, issuer_for
from gateway import jsonutil
from gateway.config import load_settings
from gateway.errors import Issue
from gateway.fhir.profiles import Guide, load_guide
from gateway.pipeline import Pipeline

LONG = os.environ.get("GATEWAY_FUZZ_LONG") == "1"
MUTATIONS = 40_000 if LONG else 1_800
SD = "https://fhir.cyhr.org.cn/StructureDefinition/"


@pytest.fixture(scope="module")
def guide() -> Guide:
    return load_guide(ROOT / "profiles")


def _full(issues: list[Issue]) -> list[tuple[Any, ...]]:
    """Every field of every issue, ``extra`` (rule, profile) included, in order."""
    return [(i.severity, i.code, i.location, i.message, i.hl7_error, sorted(i.extra.items())) for i in issues]


# ------------------------------------------------------------------ the corpus


def _files() -> list[dict[str, Any]]:
    """Every resource of the guide's examples and of tests/data (golden Bundles, submissions, signed Bundles)."""
    out: list[dict[str, Any]] = []
    paths = sorted((ROOT / "profiles" / "examples").rglob("*.json")) + sorted(DATA.rglob("*.json"))
    for path in paths:
        if path.name.endswith(".expected.json"):
            continue
        try:
            doc = jsonutil.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - deliberately broken files (truncated, wrong encoding)
            continue
        if isinstance(doc, dict) and "resourceType" in doc:
            out.append(doc)
    return out


def _pipeline_bundles(tmp: Path) -> list[dict[str, Any]]:
    """Bundles the pipeline builds from the sample inputs and from generated ORU messages."""
    from gateway.bench.inputs import oru_batch

    csv_members = {"cdc": "12510000MB00030095", "hospital": "12500102MB0002006J"}
    jobs: list[tuple[str, bytes, str]] = []
    for path in sorted((DATA / "hl7v2").glob("*.hl7")):
        jobs.append((issuer_for(path.stem), path.read_bytes(), "hl7v2"))
    for path in sorted((DATA / "cda").glob("*.xml")):
        jobs.append(("12511921MB0001003C", path.read_bytes(), "cda"))
    for path in sorted((DATA / "csv").glob("*.csv")):
        jobs.append((csv_members[path.stem.split("-")[0]], path.read_bytes(), "cdc-csv"))
    for message in oru_batch(6, seed=8):
        jobs.append(("12511921MB0001003C", message, "hl7v2"))
    pipelines: dict[str, Pipeline] = {}
    out: list[dict[str, Any]] = []
    for uscc, data, fmt in jobs:
        if uscc not in pipelines:
            settings = load_settings(environ={}, overrides={"data_dir": str(tmp / uscc), "issuer_uscc": uscc,
                                                            "issuer_name": "demo issuer"})
            pipelines[uscc] = Pipeline(settings)
        for outcome in pipelines[uscc].convert(data, fmt, "sample"):
            if outcome.bundle is not None:
                out.append(outcome.bundle)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    docs = _files() + _pipeline_bundles(tmp_path_factory.mktemp("fastpath"))
    assert sum(1 for d in docs if d.get("resourceType") == "Bundle") >= 60
    return docs


# ------------------------------------------------------------------ mutations


def _pick(rng: random.Random, doc: Any, want: type | None = None) -> tuple[Any, Any] | None:
    """(container, key or index) of a member or item met going down ``doc`` at random (of type ``want``)."""
    for _ in range(12):
        container, key = None, None
        value = doc
        while isinstance(value, (dict, list)) and value:
            container = value
            key = rng.choice(list(value)) if isinstance(value, dict) else rng.randrange(len(value))
            value = container[key]
            if want is None and rng.random() < 0.25:
                break
        if container is not None and (want is None or isinstance(value, want)):
            return container, key
    return None


_ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2**31, 1.5, Decimal("2.50"), Decimal("3"), Decimal("-1"), "", "  ", "x", "a b",
    "final", [], {}, [None], ["x"], [{}], {"x": 1}, {"extension": []}, "\u0001", "\ud800", "x" * 300,
]
_DATES = ["2026-13-01", "2026-05-20T08:10", "2026-05-20T08:10:00", "2026-05-20T08:10:00+08:00", "2026-05-20",
          "2026", "20260520", "1971-02-11", "1971-02-12", "2026-02-30", "2026-05-20T25:00:00Z", "T08:00:00"]
_CODES = ["final", "corrected", "amended", "cancelled", "entered-in-error", "preliminary", "male", "female",
          "unknown", "laboratory", "LAB", "USCC", "NNCHN", "MR", "official", "collection", "document", "x y", "X",
          "bogus", "<", "usual", "phone", "searchset", "GET"]
_URLS = ["https://fhir.cyhr.org.cn/StructureDefinition/recognition-mark",
         "https://fhir.cyhr.org.cn/StructureDefinition/replaces",
         "https://fhir.cyhr.org.cn/StructureDefinition/exam-type",
         "https://fhir.cyhr.org.cn/StructureDefinition/nope", "http://example.org/ext", ""]
_PROFILES = [SD + "cyhr-lab-observation", SD + "cyhr-patient", SD + "cyhr-lab-report", SD + "cyhr-report-bundle",
             SD + "cyhr-organization", SD + "cyhr-lab-observation|0.0.1", SD + "replaces", SD + "unknown",
             "http://hl7.org/fhir/StructureDefinition/Observation"]


def _mutate(rng: random.Random, doc: dict[str, Any], pool: list[dict[str, Any]]) -> None:
    """One change to ``doc``, in place: the kinds of mistake members' systems make, and a few hostile ones."""
    picked = _pick(rng, doc)
    if picked is None:
        return
    container, key = picked
    value = container[key]
    string = _pick(rng, doc, str)
    kind = rng.randrange(17)
    if kind == 0:  # delete a member or item
        del container[key]
    elif kind == 1:  # duplicate an item, or wrap a value in an array
        if isinstance(container, list):
            container.insert(key, _copy(value))
        else:
            container[key] = [value, _copy(value)] if rng.random() < 0.5 else [value]
    elif kind == 2:  # unwrap an array
        if isinstance(value, list) and value:
            container[key] = value[0]
    elif kind == 3:  # a value of the wrong type
        container[key] = _copy(rng.choice(_ODD_VALUES))
    elif kind == 4:  # another code
        if string is not None:
            string[0][string[1]] = rng.choice(_CODES)
    elif kind == 5:  # a broken or redirected reference
        refs = [(c, k) for c, k in (_pick(rng, doc, str) for _ in range(40)) if k in ("reference", "fullUrl")]
        if refs:
            c, k = refs[0]
            other_c, other_k = rng.choice(refs)
            c[k] = rng.choice(["urn:uuid:00000000-0000-0000-0000-000000000000", "Patient/1", "urn:uuid:x",
                               c[k] + "0", other_c[other_k]])
            if k == "reference" and rng.random() < 0.5:  # a reference with more to it, before or after it
                members = list(c.items())
                c.clear()
                c["display"] = f"display {rng.randrange(50)}"
                c.update(members)
    elif kind == 6:  # an unknown element, or a primitive's extension (which may hold a reference)
        target = container if isinstance(container, dict) else doc
        name = rng.choice(["unknown", "_status", "_value", "resourceType", "fhir_comments", "_"])
        target[name] = rng.choice([
            "x", {"extension": [{"url": "http://example.org/e", "valueReference": {"reference": "urn:uuid:x"}}]},
            [None], {}])
    elif kind == 7:  # an empty or blank string
        if string is not None:
            string[0][string[1]] = rng.choice(["", " ", "\t", "x\u0000"])
    elif kind == 8:  # dates and times
        dated = [p for p in (_pick(rng, doc, str) for _ in range(8)) if p and p[0][p[1]][:2] in ("19", "20")]
        target_string = dated[0] if dated else string
        if target_string is not None:
            target_string[0][target_string[1]] = rng.choice(_DATES)
    elif kind == 9:  # meta.profile
        target = rng.choice([r for r in _resources(doc)] or [doc])
        choice = rng.random()
        if choice < 0.3:
            target.pop("meta", None)
        elif choice < 0.5:
            target["meta"] = {"profile": rng.choice(_PROFILES)}
        else:
            target["meta"] = {"profile": rng.sample(_PROFILES, rng.randint(1, 2))}
    elif kind == 10:  # an extension, ours or not, here or out of place
        target = container if isinstance(container, dict) else doc
        ext: dict[str, Any] = {"url": rng.choice(_URLS)}
        ext.update(rng.choice([{"valueString": "互认HR"}, {"valueString": "x"}, {"valueCoding": {"code": "x"}},
                               {"valueIdentifier": {"system": "urn:x", "value": "1"}}, {},
                               {"extension": [{"url": "factor", "valueString": "x"}]}, {"valueBoolean": True}]))
        if isinstance(target.get("extension"), list):
            target["extension"].append(ext)
        else:
            target["extension"] = [ext]
    elif kind == 11:  # booleans and numbers swapped
        if isinstance(value, bool):
            container[key] = int(value)
        elif isinstance(value, (int, Decimal)):
            container[key] = rng.choice([True, str(value), float(value), Decimal(value) + 1, -value])
        else:
            container[key] = rng.choice([True, 1, Decimal("1.0")])
    elif kind == 12:  # an entry of another Bundle, or the same entry twice
        entries = doc.get("entry")
        if isinstance(entries, list) and entries:
            other = rng.choice(pool)
            source = other.get("entry") if isinstance(other.get("entry"), list) and other["entry"] else entries
            entries.insert(rng.randrange(len(entries) + 1), _copy(rng.choice(source)))
    elif kind == 13:  # Chinese identity numbers, genders and birth dates that disagree (warnings)
        for res in _resources(doc):
            if res.get("resourceType") == "Patient":
                res[rng.choice(["gender", "birthDate"])] = rng.choice(["male", "female", "1971-02-12", "2000-01-01"])
    elif kind == 14:  # a resource of another type, or a resourceType that is not one
        target = rng.choice(_resources(doc) or [doc])
        target["resourceType"] = rng.choice(["Observation", "Patient", "Bundle", "Basic", "X", ""])
    elif kind == 15:  # a choice element of another type, or two of them
        for res in _resources(doc):
            if res.get("resourceType") == "Observation":
                res[rng.choice(["valueString", "valueBoolean", "effectivePeriod", "valueCodeableConcept"])] = \
                    rng.choice(["x", True, {"start": "2026-05-20"}, {"text": "x"}])
                break
    else:  # a copy of another member somewhere else
        source = _pick(rng, doc)
        if source is not None:
            container[key] = _copy(source[0][source[1]])


def _copy(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists and immutable values), quicker than copy.deepcopy."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


def _resources(doc: dict[str, Any]) -> list[dict[str, Any]]:
    entries = doc.get("entry")
    inner = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)] \
        if isinstance(entries, list) else []
    return [doc, *inner]


def _agree(guide: Guide, doc: Any, tally: Counter[str], label: str) -> None:
    reference = guide.validate_reference(doc)
    clean = guide.is_clean(doc)
    got = guide.validate(doc)
    assert _full(got) == _full(reference), f"{label}: validate differs from the reference"
    if clean:
        assert reference == [], f"{label}: the check-only pass called it clean; the reference reports " \
                                f"{reference[0].line()}"
        tally["clean"] += 1
    else:
        tally["issues" if reference else "clean, not vouched for"] += 1


# ------------------------------------------------------------------ the tests


def test_the_corpus_as_it_is(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    tally: Counter[str] = Counter()
    for n, doc in enumerate(corpus):
        _agree(guide, doc, tally, f"corpus[{n}]")
    # the pipeline's own Bundles and the guide's good examples go by the check-only pass
    assert tally["clean"] >= 60, tally
    assert tally["issues"] >= 15, tally
    print(f"\ncorpus: {len(corpus)} resources: {dict(tally)}")


def test_mutated_bundles(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    rng = random.Random(19)
    pool = [d for d in corpus if d.get("resourceType") == "Bundle"]
    tally: Counter[str] = Counter()
    for n in range(MUTATIONS):
        doc = _copy(rng.choice(pool))
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            _mutate(rng, doc, pool)
        _agree(guide, doc, tally, f"mutation {n}")
    # both ways are exercised: mutations that break nothing (and are vouched for), and ones that do
    assert tally["clean"] >= MUTATIONS // 20, tally
    assert tally["issues"] >= MUTATIONS // 2, tally
    print(f"\n{MUTATIONS} mutations: {dict(tally)}")


def test_mutated_resources(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    """Single resources (not Bundles), with profiles asked for besides the ones they name."""
    rng = random.Random(8)
    pool = [r for d in corpus for r in _resources(d)[1:]] + [d for d in corpus if d.get("resourceType") != "Bundle"]
    tally: Counter[str] = Counter()
    for n in range(MUTATIONS // 3):
        doc = _copy(rng.choice(pool))
        for _ in range(rng.choice((0, 1, 1, 2))):
            _mutate(rng, doc, pool)
        extra = tuple(rng.sample(_PROFILES, rng.choice((0, 0, 1))))
        reference = guide.validate_reference(doc, extra)
        assert _full(guide.validate(doc, extra)) == _full(reference), f"resource {n} ({extra})"
        if guide.is_clean(doc, extra):
            assert reference == [], f"resource {n}: called clean; the reference reports {reference[0].line()}"
            tally["clean"] += 1
        else:
            tally["issues" if reference else "clean, not vouched for"] += 1
    assert tally["clean"] >= MUTATIONS // 50 and tally["issues"] >= MUTATIONS // 20, tally


def test_not_json_objects_and_odd_python_values(guide: Guide) -> None:
    """What no JSON parser makes (subclasses, integral Decimals) goes to the reference, never around it."""

    class Text(str):
        pass

    class Mapping(dict):  # type: ignore[type-arg]
        pass

    example = jsonutil.loads((ROOT / "profiles" / "examples" / "Observation-glucose.json").read_bytes())
    odd: list[Any] = [None, [], "x", 3, {}, {"resourceType": "X"}, Mapping(example)]
    for variant in ({"status": Text("final")}, {"id": Text("x")}, {"code": Mapping(example["code"])},
                    {"valueInteger": Decimal("3")}):
        doc = _copy(example)
        doc.pop("valueQuantity", None)
        doc.update(variant)
        odd.append(doc)
    for n, doc in enumerate(odd):
        assert not guide.is_clean(doc), n
        assert _full(guide.validate(doc)) == _full(guide.validate_reference(doc)), n


def test_references_in_a_primitives_extension_count(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    """cyhr-bdl-6 looks everywhere in the entries, also where the base walk does not go (``_status``)."""
    bundle = next(_copy(d) for d in corpus if d.get("resourceType") == "Bundle" and guide.is_clean(d)
                  and any(m.get("profile") == [SD + "cyhr-report-bundle"] for m in [d.get("meta", {})]))
    obs = next(r for r in _resources(bundle) if r.get("resourceType") == "Observation")
    obs["_status"] = {"extension": [{"url": "http://example.org/e", "valueReference": {"reference": "urn:uuid:x"}}]}
    reference = guide.validate_reference(bundle)
    assert [i.extra["rule"] for i in reference] == ["cyhr-bdl-6"]
    assert not guide.is_clean(bundle)
    assert _full(guide.validate(bundle)) == _full(reference)


def test_a_dangling_reference_met_before_still_counts(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    """cyhr-bdl-6 sees a reference whose text the walk already knows to be well formed, however it is met."""
    good = next(d for d in corpus if d.get("resourceType") == "Bundle" and guide.is_clean(d)
                and d.get("meta", {}).get("profile") == [SD + "cyhr-report-bundle"])
    dangling = "urn:uuid:00000000-0000-0000-0000-00000000dead"
    for n, extra in enumerate(({}, {"display": "a name"}, {"type": "Patient"}, {"display": None})):
        for m in range(2):  # the second time round, the reference is a string met before
            bundle = _copy(good)
            obs = next(r for r in _resources(bundle) if r.get("resourceType") == "Observation")
            if extra.get("display", "") is None:
                extra = {"display": f"a name not met before {n}.{m}"}
            obs["subject"] = {**extra, "reference": dangling}
            if m:
                obs["subject"] = {"reference": dangling, **extra}
            reference = guide.validate_reference(bundle)
            assert [i.extra["rule"] for i in reference] == ["cyhr-bdl-6"], extra
            assert not guide.is_clean(bundle), extra
            assert _full(guide.validate(bundle)) == _full(reference)


def test_the_corpus_round_trips_through_json(guide: Guide, corpus: list[dict[str, Any]]) -> None:
    """Parsed as a member's system would send it: floats and ints, not Decimals."""
    for doc in corpus[:80]:
        plain = json.loads(json.dumps(doc, default=float, ensure_ascii=False))
        assert _full(guide.validate(plain)) == _full(guide.validate_reference(plain))


@pytest.mark.parametrize("change", [
    lambda exts: exts.reverse(),  # another order
    lambda exts: exts.append(copy.deepcopy(exts[0])),  # a slice twice
    lambda exts: exts.append({"url": "https://fhir.cyhr.org.cn/StructureDefinition/no-such", "valueString": "x"}),
    lambda exts: exts.append({"url": "http://example.org/other", "valueString": "x"}),  # another guide's
    lambda exts: exts[0].update(url=["a", "b"]),  # a url that is not a string (unhashable)
    lambda exts: exts[0].update(url=7),
    lambda exts: exts[0].pop("url"),
    lambda exts: exts.append("text"),  # an item that is not an object
    lambda exts: exts.append(None),
    lambda exts: exts.clear(),
    lambda exts: exts[0].update(url=exts[0]["url"].upper()),
    lambda exts: exts[0].update(url=exts[0]["url"] + "|1.0"),
])
def test_extensions_found_by_their_url_agree_with_the_reference(
        guide: Guide, corpus: list[dict[str, Any]], change: Any) -> None:
    """The check-only pass finds an extension's slice by its url in one lookup; the reference tries each slice's
    test in turn: every way an extension list can go wrong gets the same verdict from both."""
    tally: Counter[str] = Counter()
    reports = [r for d in corpus if d.get("resourceType") == "Bundle" for r in _resources(d)
               if r.get("resourceType") in ("DiagnosticReport", "Patient", "Observation")
               and isinstance(r.get("extension"), list) and len(r["extension"]) > 1]
    assert len(reports) >= 5
    for n, resource in enumerate(reports):
        changed = _copy(resource)
        change(changed["extension"])
        _agree(guide, changed, tally, f"{resource['resourceType']} {n}")
    assert sum(tally.values()) == len(reports)
