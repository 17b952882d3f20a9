"""The registry snapshot's lookups by member, physician and catalogue position against the searches they replace.

Every recognition decision asks the snapshot for a member's qualifications, hospital levels and EQA results, a
physician's qualifications and registrations, and the catalogue order of the items a result names. These used to
be searches through the whole snapshot (a regional registry of 500 members, 2,500 qualifications and 30,000 EQA
results made deciding one received Bundle of 20 results 11 ms instead of 2); they are now lookups in indexes
built on first use. The searches are kept here as the reference, and each lookup is held equal to them on the
DEMO registry grown with generated members, including duplicates and members the registry does not list, and
after the snapshot's collections are replaced (as a test or a tool may do).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
from pathlib import Path

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.recognition.engine import decide_all
from gateway.recognition.facts import facts_from_bundle
from gateway.registry.models import Coding, Snapshot, qualification_type_code
from gateway.registry.policy import catalogue_items_for, eqa_results, physician_qualified, qualifications_of
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import load_source

CST = dt.timezone(dt.timedelta(hours=8))
DATA = Path(__file__).parent / "data"
RECEIVERS = ("12500102MB0002006J", "12511921MB0001003C", "12510000MB00030095")  # 涪陵, 通江, 四川省CDC (DEMO)
BASE = unsigned_snapshot(load_source(DEMO_SOURCE), dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))


# ---------------------------------------------------------------- the searches the lookups replace (reference)

def _qualifications_reference(snap: Snapshot, uscc: str, qtype: str, on: dt.date, physician: str | None) -> list:
    return [q for q in snap.qualifications
            if q.member == uscc and q.type == qualification_type_code(qtype)
            and (physician is None or q.physician_id == physician) and q.valid_on(on)]


def _eqa_reference(snap: Snapshot, uscc: str, item, on: dt.date) -> list:  # type: ignore[no-untyped-def]
    return [e for e in snap.eqa if e.member == uscc and e.concerns(item) and e.period.covers(on)]


def _items_reference(snap: Snapshot, codings: list[Coding], on: dt.date | None = None) -> list:
    found: dict = {}
    for coding in codings:
        for item in snap.items_for_coding(coding):
            if on is None or item.period.covers(on):
                found.setdefault((item.catalogue_id, item.code), item)
    order = {c.id: i for i, c in enumerate(snap.catalogues)}
    positions = {(c.id, it.code): j for c in snap.catalogues for j, it in enumerate(c.items)}
    return sorted(found.values(), key=lambda it: (order[it.catalogue_id], positions[(it.catalogue_id, it.code)]))


def _levels_reference(snap: Snapshot, uscc: str) -> list:
    return [q for q in snap.qualifications if q.member == uscc and q.type == "hospital-grade" and q.grade]


def _by_id_card_reference(snap: Snapshot, id_card: str):  # type: ignore[no-untyped-def]
    return next((p for p in snap.physicians.values() if p.id_card == id_card), None)


def _registered_reference(snap: Snapshot, member: str, staff_id: str):  # type: ignore[no-untyped-def]
    for physician in snap.physicians.values():
        if physician.registrations_at(member, staff_id):
            return physician
    return None


# ---------------------------------------------------------------- a grown registry

def _grown(seed: int, members: int) -> Snapshot:
    """The DEMO snapshot with ``members`` more members, each given copies of listed qualifications, EQA results and
    physician registrations, shuffled into the lists (a member's entries are not next to each other)."""
    rng = random.Random(seed)
    listed = list(BASE.members.values())
    quals, eqa, physicians = list(BASE.qualifications), list(BASE.eqa), list(BASE.physicians.values())
    new_members = []
    for n in range(members):
        uscc = f"9{seed:03d}{n:014d}"
        new_members.append(dataclasses.replace(rng.choice(listed), uscc=uscc, certificates=()))
        quals += [dataclasses.replace(q, member=uscc, id=f"{q.id}-{seed}-{n}")
                  for q in rng.sample(BASE.qualifications, min(4, len(BASE.qualifications)))]
        eqa += [dataclasses.replace(e, member=uscc, passed=rng.random() < 0.8)
                for e in rng.sample(BASE.eqa, min(6, len(BASE.eqa)))]
    for n, p in enumerate(list(physicians)):
        # a second physician registered under the same member and staff id, and one sharing the 身份证号
        physicians.append(dataclasses.replace(p, id=f"{p.id}-again-{n}"))
    rng.shuffle(quals)
    rng.shuffle(eqa)
    quals.insert(1, quals[0])  # the same listing twice, next to itself, and once more further on
    quals.append(quals[0])
    eqa.insert(1, eqa[0])
    return Snapshot(version=BASE.version, issued=BASE.issued, valid_until=BASE.valid_until,
                    authority_uscc=BASE.authority_uscc, authority_name=BASE.authority_name,
                    members=listed + new_members, qualifications=quals, eqa=eqa, catalogues=BASE.catalogues,
                    diagnosis_by_exposure=BASE.diagnosis_by_exposure, diagnosis_by_factor=BASE.diagnosis_by_factor,
                    document=BASE.document, physicians=physicians)


_DAYS = [dt.date(2022, 12, 31), dt.date(2024, 6, 30), dt.date(2025, 1, 1), dt.date(2026, 11, 20), dt.date(2031, 1, 1)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lookups_equal_the_searches_they_replace(seed: int) -> None:
    snap = _grown(seed, 40)
    rng = random.Random(seed)
    asked = list(snap.members) + ["12330000470051726F", ""]  # and members the registry does not list
    types = sorted({q.type for q in snap.qualifications}) + ["no-such-type"]
    items = [it for c in snap.catalogues for it in c.items]
    assert items and types and snap.eqa and snap.physicians
    compared = 0
    for uscc in asked:
        assert list(snap.qualifications_held(uscc)) == [q for q in snap.qualifications if q.member == uscc]
        assert list(snap.eqa_of(uscc)) == [e for e in snap.eqa if e.member == uscc]
        assert [q for q in snap.qualifications_held(uscc) if q.type == "hospital-grade" and q.grade] \
            == _levels_reference(snap, uscc)
        for day in _DAYS:
            for qtype in types:
                physician = rng.choice([None, None, "no-one"] + [q.physician_id for q in snap.qualifications
                                                                 if q.physician_id][:3])
                assert qualifications_of(snap, uscc, qtype, day, physician=physician) \
                    == _qualifications_reference(snap, uscc, qtype, day, physician)
                compared += 1
            for item in rng.sample(items, 5):
                assert eqa_results(snap, uscc, item, day) == _eqa_reference(snap, uscc, item, day)
    for p in snap.physicians.values():
        assert list(snap.physician_qualifications(p.id)) == [
            q for q in snap.qualifications if q.physician_ref == p.id]
        assert snap.physician_by_id_card("any", p.id_card, dt.date(2026, 11, 20))[0] \
            is _by_id_card_reference(snap, p.id_card)
        for r in p.practice:
            found, registration = snap.registered_physician(r.member, r.staff_id, dt.date(2026, 11, 20))
            assert found is _registered_reference(snap, r.member, r.staff_id) is not None
            assert registration is next((x for x in found.registrations_at(r.member, r.staff_id)
                                         if x.period.covers(dt.date(2026, 11, 20))), None)
            for qtype in types[:3]:
                assert physician_qualified(snap, r.member, r.staff_id, qtype, None, dt.date(2026, 11, 20)).physician \
                    is found
    assert snap.registered_physician(next(iter(snap.members)), "no-such-staff-id", dt.date(2026, 11, 20)) \
        == (None, None)
    assert snap.physician_by_id_card("any", "110101199003070000", dt.date(2026, 11, 20)) == (None, None)
    codings = [Coding(it.system, it.code) for it in items]
    codings += [Coding("http://loinc.org", lo) for it in items for lo in it.loinc]
    for _ in range(200):
        picked = rng.sample(codings, rng.randint(1, 6))
        day = rng.choice([None, *_DAYS])
        assert catalogue_items_for(snap, picked, day) == _items_reference(snap, picked, day)
    assert compared > 1000


def test_a_replaced_collection_is_indexed_anew() -> None:
    snap = _grown(7, 5)
    uscc = next(iter(snap.members))
    before = snap.qualifications_held(uscc)
    assert before  # the index is built, once: a second lookup uses the same one
    built = snap._by["member"]
    assert snap.qualifications_held(uscc) == before and snap._by["member"] is built
    snap.qualifications = tuple(q for q in snap.qualifications if q.member != uscc)
    assert snap.qualifications_held(uscc) == ()
    snap.eqa = ()
    assert snap.eqa_of(uscc) == ()
    snap.catalogues = tuple(reversed(snap.catalogues))
    items = [it for c in snap.catalogues for it in c.items]
    codings = [Coding(it.system, it.code) for it in items]
    assert catalogue_items_for(snap, codings) == _items_reference(snap, codings, None)


@pytest.mark.parametrize("name", ["bundle-lab-tongjiang.json", "bundle-lab-imaging-fuling.json",
                                  "bundle-occupational-cdc.json"])
def test_decisions_on_a_grown_registry_equal_those_on_the_searches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole decisions (every rule, reason and fact) are the same when each lookup is the old search."""
    snap = _grown(11, 30)
    facts = facts_from_bundle(json.loads((DATA / "registry" / name).read_text(encoding="utf-8")))
    assert facts
    at = dt.datetime(2026, 11, 20, 10, 0, tzinfo=CST)
    fast = {receiver: [d.to_dict() for d in decide_all(facts, snap, receiver, at)] for receiver in RECEIVERS}
    monkeypatch.setattr(Snapshot, "qualifications_held",
                        lambda self, uscc: tuple(q for q in self.qualifications if q.member == uscc))
    monkeypatch.setattr(Snapshot, "physician_qualifications",
                        lambda self, pid: tuple(q for q in self.qualifications if q.physician_ref == pid))
    monkeypatch.setattr(Snapshot, "eqa_of", lambda self, uscc: tuple(e for e in self.eqa if e.member == uscc))
    monkeypatch.setattr(Snapshot, "physician_by_id_card", lambda self, member, id_card, day: (
        (p := _by_id_card_reference(self, id_card)),
        None if p is None else next((r for r in p.registrations_at(member) if r.period.covers(day)), None)))
    monkeypatch.setattr("gateway.registry.policy.catalogue_items_for", _items_reference)
    monkeypatch.setattr("gateway.recognition.engine.catalogue_items_for", _items_reference)
    slow = {receiver: [d.to_dict() for d in decide_all(facts, snap, receiver, at)] for receiver in RECEIVERS}
    assert fast == slow
    outcomes = {d["outcome"] for ds in fast.values() for d in ds}
    assert "recognized" in outcomes or name.startswith("bundle-occupational")


def test_odd_keys_are_found_as_the_searches_found_them() -> None:
    """None where a member, physician or 身份证号 belongs, an unhashable value, and a search by any staff id: what the
    old searches returned (the registry's sources never hold these; a snapshot built by hand may)."""
    snap = _grown(5, 3)
    q0, e0, p0 = snap.qualifications[0], snap.eqa[0], next(iter(snap.physicians.values()))
    snap.qualifications = snap.qualifications + (dataclasses.replace(q0, member=None, physician_ref=None),
                                                 dataclasses.replace(q0, member=["a", "list"]))
    snap.eqa = snap.eqa + (dataclasses.replace(e0, member=None),)
    for wanted in [None, ["a", "list"], "", next(iter(snap.members))]:
        assert list(snap.qualifications_held(wanted)) == [q for q in snap.qualifications if q.member == wanted]
        assert list(snap.eqa_of(wanted)) == [e for e in snap.eqa if e.member == wanted]
        assert list(snap.physician_qualifications(wanted)) == [
            q for q in snap.qualifications if q.physician_ref == wanted]
    nobody = dataclasses.replace(p0, id="no-card", id_card=None)
    snap.physicians = {**snap.physicians, nobody.id: nobody}
    assert snap.physician_by_id_card("any", None, dt.date(2026, 11, 20))[0] is nobody
    for r in p0.practice:  # any staff id at that member: the first physician registered there
        found, _ = snap.registered_physician(r.member, None, dt.date(2026, 11, 20))  # type: ignore[arg-type]
        assert found is next(p for p in snap.physicians.values() if p.registrations_at(r.member))
    assert p0.practice, "the DEMO registry lists a physician with registrations"
