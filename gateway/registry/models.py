"""Registry models: members, certificates, qualifications, EQA results and catalogues of one snapshot.

A :class:`Snapshot` is built from the normalised snapshot document (see
:mod:`gateway.registry.source` for how a source file becomes one and
:mod:`gateway.registry.snapshot` for signing and verifying it). It is
immutable, holds indexes for the policy queries, and implements the signing
module's ``TrustSource`` protocol: the member certificates it lists are the
only ones trusted, so removing a certificate or a member from the next
snapshot revokes it.

Dates in the registry are China Standard Time calendar dates, inclusive at
both ends; ``None`` as an end date means open-ended.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.errors import ConfigError
from gateway.naming import SYSTEM_LOINC, cs_url, local_item_system
from gateway.signing.canonical import canonicalize
from gateway.signing.keys import kid_of, uscc_of

__all__ = [
    "CN_TZ",
    "SNAPSHOT_FORMAT",
    "EXPOSURE_CATEGORIES",
    "DIAGNOSIS_CATEGORIES",
    "QUALIFICATION_TYPES",
    "DEFAULT_RESPONSIBLE",
    "TECHNICAL_SERVICE_TYPES",
    "SYSTEM_TECHNICAL_SERVICE_TYPE",
    "service_scope_words",
    "RETIRED_QUALIFICATION_TYPES",
    "qualification_type_code",
    "Coding",
    "Period",
    "MemberCertificate",
    "Member",
    "Qualification",
    "LevelFact",
    "PracticeRegistration",
    "Physician",
    "SupervisingAuthority",
    "EqaResult",
    "CatalogueItem",
    "Catalogue",
    "Snapshot",
    "catalogue_system",
    "level_rank",
    "china_date",
]

#: China Standard Time: registry dates are calendar dates in this zone.
CN_TZ = _dt.timezone(_dt.timedelta(hours=8))

#: Format marker of a snapshot document.
SNAPSHOT_FORMAT = "cyhr-registry-snapshot/1"

#: 《职业病危害因素分类目录》 classes, code -> Chinese name.
EXPOSURE_CATEGORIES: dict[str, str] = {
    "dust": "粉尘",
    "chemical": "化学因素",
    "physical": "物理因素",
    "biological": "生物因素",
    "radiation": "放射性因素",
    "other": "其他",
}

#: 《职业病分类和目录》 classes, code -> Chinese name.
DIAGNOSIS_CATEGORIES: dict[str, str] = {
    "pneumoconiosis-respiratory": "职业性尘肺病及其他呼吸系统疾病",
    "skin": "职业性皮肤病",
    "eye": "职业性眼病",
    "ent-oral": "职业性耳鼻喉口腔疾病",
    "chemical-poisoning": "职业性化学中毒",
    "physical": "物理因素所致职业病",
    "radiation": "职业性放射性疾病",
    "infectious": "职业性传染病",
    "cancer": "职业性肿瘤",
    "other": "其他职业病",
}

#: Qualification types (DOMAIN §3), code -> Chinese name: the codes and displays of CodeSystem
#: qualification-type (profiles/; tests/test_code_lists.py keeps them equal). ``eqa-pass`` is what an
#: EQA result verifies; the registry lists those under ``eqa``, not as qualifications.
QUALIFICATION_TYPES: dict[str, str] = {
    "iso15189": "ISO 15189 医学实验室认可",
    "eqa-pass": "室间质评合格",
    "cma": "检验检测机构资质认定",
    "hospital-grade": "医院等级",
    "practice-licence": "医疗机构执业许可证",
    "occupational-exam-filing": "职业健康检查机构备案",
    "occupational-health-service": "职业卫生技术服务机构资质",
    "radiation-health-service": "放射卫生技术服务机构资质",
    "occupational-diagnosis-filing": "职业病诊断机构备案",
    "occupational-diagnosis-physician": "职业病诊断医师资格",
}

#: Qualification type codes registry sources and snapshots used before they followed the CodeSystem, and
#: the code each means now. Still accepted on load (old signed snapshots stay readable) and in queries.
RETIRED_QUALIFICATION_TYPES: dict[str, str] = {
    "occupational-health-exam-filing": "occupational-exam-filing",
    "occupational-disease-diagnosis-institution": "occupational-diagnosis-filing",
    "occupational-disease-diagnosis-physician": "occupational-diagnosis-physician",
}


def qualification_type_code(code: str) -> str:
    """The CodeSystem code of a qualification type (a retired code is translated)."""
    return RETIRED_QUALIFICATION_TYPES.get(code, code)


#: 职业卫生 / 放射卫生 technical-service report types (CodeSystem technical-service-type): code -> (中文名称, the
#: qualification type its issuer needs). A ``technical-service`` catalogue item's code is one of these codes.
TECHNICAL_SERVICE_TYPES: dict[str, tuple[str, str]] = {
    "occupational-hazard-testing": ("职业病危害因素检测", "occupational-health-service"),
    "occupational-hazard-status-evaluation": ("职业病危害现状评价", "occupational-health-service"),
    "radiation-protection-testing": ("放射卫生防护检测", "radiation-health-service"),
    "radiation-project-evaluation": ("放射诊疗建设项目职业病危害放射防护评价", "radiation-health-service"),
    "personal-dose-monitoring": ("个人剂量监测", "radiation-health-service"),
}
#: The code system of technical-service report types.
SYSTEM_TECHNICAL_SERVICE_TYPE = cs_url("technical-service-type")
#: Short names certificates print under 业务范围 for each technical-service type, besides its code and 中文名称.
_SERVICE_SCOPE_SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "occupational-hazard-testing": ("检测",),
    "occupational-hazard-status-evaluation": ("现状评价",),
    "radiation-protection-testing": ("放射防护检测",),
    "radiation-project-evaluation": ("放射防护评价",),
    "personal-dose-monitoring": ("个人剂量检测",),
}


def service_scope_words(service: str) -> tuple[str, ...]:
    """What a technical-service qualification's scope may list for a service type: its code, its 中文名称 and the
    short name certificates print under 业务范围."""
    return (service, TECHNICAL_SERVICE_TYPES[service][0], *_SERVICE_SCOPE_SHORT_NAMES.get(service, ()))


#: Whose level, qualifications and signature the rules look at for an item class, unless the catalogue
#: says otherwise: ``performer`` (the institution that did the exam or test) or ``interpreter`` (the one
#: that read it and signed the report: 基层检查、上级诊断, 远程影像, 远程心电).
DEFAULT_RESPONSIBLE: dict[str, str] = {
    "lab": "performer",
    "imaging": "interpreter",
    "ecg": "interpreter",
    "occupational": "performer",
    "technical-service": "performer",
}

#: 未定级 (ungraded) is a recorded level, ranked below 一级 (the Chongqing IG's CNHospitalLevelCS lists it last, #14):
#: it fails a rule that needs level 一级 or above, it is not "no level on record".
_LEVEL_RANK = {"未定": 0, "一级": 1, "二级": 2, "三级": 3}
_DER = Encoding.DER


def catalogue_system(catalogue_id: str) -> str:
    """The code system of one catalogue's item codes."""
    return cs_url(f"catalogue-{catalogue_id}")


def level_rank(level: str | None) -> int | None:
    """1, 2 or 3 for a level such as ``三级甲等``; 0 for 未定级 (recorded, below 一级); None when unknown."""
    if not level:
        return None
    return _LEVEL_RANK.get(level[:2])


def china_date(moment: _dt.datetime) -> _dt.date:
    """The calendar date of an aware datetime in China Standard Time."""
    return moment.astimezone(CN_TZ).date()


def _date(value: Any) -> _dt.date | None:
    if value is None:
        return None
    return _dt.date.fromisoformat(str(value))


class Coding(NamedTuple):
    """A code as a result carries it: system, code and (optional) display."""

    system: str
    code: str
    display: str | None = None


@dataclass(frozen=True)
class Period:
    """Inclusive date range; ``None`` ends are open."""

    start: _dt.date | None = None
    end: _dt.date | None = None

    def covers(self, day: _dt.date) -> bool:
        """True when ``day`` lies within the period."""
        return (self.start is None or self.start <= day) and (self.end is None or day <= self.end)

    def as_dict(self) -> dict[str, str | None]:
        """``{"valid_from": ..., "valid_to": ...}`` for reasons and JSON."""
        return {
            "valid_from": self.start.isoformat() if self.start else None,
            "valid_to": self.end.isoformat() if self.end else None,
        }

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> "Period":
        """From a mapping with ``valid_from``/``valid_to``."""
        return cls(_date(data.get("valid_from")), _date(data.get("valid_to")))


def _status_allows(status: str, status_date: _dt.date | None, day: _dt.date) -> bool:
    # A suspension or revocation does not undo what was issued before it took effect.
    if status == "active":
        return True
    return status_date is not None and day < status_date


@dataclass(frozen=True)
class MemberCertificate:
    """A certificate the registry lists for a member."""

    pem: str
    listed: Period
    certificate: x509.Certificate = field(compare=False, repr=False)
    fingerprint: str = ""  # SHA-256 of the DER, hex

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> "MemberCertificate":
        """Parse one certificate entry of a snapshot document.

        :raises ValueError: the PEM is not a certificate.
        """
        pem = str(data["pem"])
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        der = cert.public_bytes(encoding=_DER)
        return cls(pem, Period.of(data), cert, hashlib.sha256(der).hexdigest())

    def valid_at(self, moment: _dt.datetime) -> bool:
        """Within the certificate's own validity and the listed period at ``moment``."""
        cert = self.certificate
        return cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc and self.listed.covers(
            china_date(moment)
        )


@dataclass(frozen=True)
class Member:
    """A member institution."""

    uscc: str
    name: str
    division: str
    kind: str
    period: Period
    status: str = "active"
    status_date: _dt.date | None = None
    level: str | None = None
    miplrn: str | None = None
    endpoint: str | None = None
    certificates: tuple[MemberCertificate, ...] = ()

    @property
    def province(self) -> str:
        """``"51"`` 四川 or ``"50"`` 重庆."""
        return self.division[:2]

    @property
    def level_rank(self) -> int | None:
        """1, 2 or 3 of the undated ``level`` of an older source; dated levels: :meth:`Snapshot.level_on`."""
        return level_rank(self.level)

    def active_on(self, day: _dt.date) -> bool:
        """A member on ``day``: within its period and not suspended or revoked by then."""
        return self.period.covers(day) and _status_allows(self.status, self.status_date, day)


@dataclass(frozen=True)
class SupervisingAuthority:
    """An authority that approves or files members (卫生健康委员会…), where violations are referred (移送)."""

    uscc: str
    name: str
    province: str | None = None
    endpoint: str | None = None
    certificates: tuple[MemberCertificate, ...] = ()

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> SupervisingAuthority:
        """From its snapshot entry."""
        return cls(uscc=data["uscc"], name=data["name"], province=data.get("province"),
                   endpoint=data.get("endpoint"),
                   certificates=tuple(MemberCertificate.of(c) for c in data.get("certificates", [])))


@dataclass(frozen=True)
class Qualification:
    """One qualification of a member (or of one of its physicians)."""

    id: str
    member: str
    type: str
    authority_name: str
    period: Period
    status: str = "active"
    status_date: _dt.date | None = None
    scope: tuple[str, ...] = ()
    grade: str | None = None
    physician_id: str | None = None
    physician_name: str | None = None
    authority_province: str | None = None
    number: str | None = None
    authority_uscc: str | None = None
    #: 职业健康检查 filing: the hazard factors it covers (codes of CodeSystem hazard-factor); empty = whole classes.
    factors: tuple[str, ...] = ()
    #: A physician's own qualification (多点执业): the ``physicians[].id`` it belongs to; ``member`` is then "".
    physician_ref: str | None = None
    #: ``national`` or ``provincial`` when the registry says so (``authority.level``).
    authority_level: str | None = None

    @property
    def nationally_approved(self) -> bool:
        """Approved by a national authority: marked so, or unmarked and naming no province."""
        if self.authority_level is not None:
            return self.authority_level == "national"
        return self.authority_province is None

    def valid_on(self, day: _dt.date) -> bool:
        """Within its period and not suspended or revoked by ``day``."""
        return self.period.covers(day) and _status_allows(self.status, self.status_date, day)

    def facts(self) -> dict[str, Any]:
        """What a decision reason quotes about this qualification."""
        out: dict[str, Any] = {"id": self.id, "type": self.type, "status": self.status, **self.period.as_dict()}
        if self.scope:
            out["scope"] = list(self.scope)
        if self.grade:
            out["grade"] = self.grade
        out["authority"] = self.authority_name
        return out


@dataclass(frozen=True)
class LevelFact:
    """A member's hospital level (and grade) over a period, and where the registry says so."""

    level: str
    period: Period
    source: str  # the hospital-grade qualification id, or "members[].level" (an undated level of an older source)

    @property
    def rank(self) -> int | None:
        """1, 2 or 3; 0 for 未定级 (a recorded level below 一级)."""
        return level_rank(self.level)

    def facts(self) -> dict[str, Any]:
        """What a decision reason quotes."""
        return {"level": self.level, "source": self.source, **self.period.as_dict()}


@dataclass(frozen=True)
class PracticeRegistration:
    """A physician registered to practise at a member (多点执业), with the staff id that member writes."""

    member: str
    staff_id: str
    period: Period


@dataclass(frozen=True)
class Physician:
    """A physician who holds qualifications of their own, identified by 身份证号 and 资格证书编号."""

    id: str
    name: str | None
    id_card: str
    certificate: str
    practice: tuple[PracticeRegistration, ...] = ()

    def registrations_at(self, member: str, staff_id: str | None = None) -> tuple[PracticeRegistration, ...]:
        """Registrations at ``member`` (with that staff id when given), any period."""
        return tuple(
            r for r in self.practice if r.member == member and (staff_id is None or r.staff_id == staff_id)
        )


@dataclass(frozen=True)
class EqaResult:
    """One 室间质评 result: member × item × year."""

    member: str
    year: int
    provider: str
    passed: bool
    period: Period
    catalogue: str | None = None
    code: str | None = None
    loinc: str | None = None
    provider_level: str | None = None

    def concerns(self, item: "CatalogueItem") -> bool:
        """True when this result is about ``item`` (same catalogue item, or a LOINC code it carries)."""
        if self.catalogue is not None:
            return self.catalogue == item.catalogue_id and self.code == item.code
        return self.loinc is not None and self.loinc in item.loinc

    def facts(self) -> dict[str, Any]:
        """What a decision reason quotes about this result."""
        return {
            "year": self.year,
            "provider": self.provider,
            "result": "pass" if self.passed else "fail",
            **self.period.as_dict(),
        }


@dataclass(frozen=True)
class CatalogueItem:
    """One item of a recognition catalogue."""

    catalogue_id: str
    code: str
    display: str
    item_class: str
    window_days: int
    time_anchor: str
    mark: str
    direction: str
    period: Period
    eqa_required: bool
    loinc: tuple[str, ...] = ()
    local_codes: frozenset[tuple[str, str]] = frozenset()
    min_issuer_level: int | None = None
    #: ``performer`` or ``interpreter``: whose level, qualifications and signature the rules look at.
    responsible: str = "performer"

    @property
    def system(self) -> str:
        """The catalogue's code system."""
        return catalogue_system(self.catalogue_id)

    def ref(self) -> dict[str, str]:
        """``{"catalogue", "code", "display"}`` for reasons and JSON."""
        return {"catalogue": self.catalogue_id, "code": self.code, "display": self.display}


@dataclass(frozen=True)
class Catalogue:
    """A recognition catalogue (互认项目目录) with its scope."""

    id: str
    name: str
    version: str
    scope_type: str
    mark: str
    period: Period
    items: tuple[CatalogueItem, ...]
    province: str | None = None
    alliance_name: str | None = None
    alliance_members: tuple[str, ...] = ()
    note: str | None = None

    @property
    def system(self) -> str:
        """The catalogue's code system."""
        return catalogue_system(self.id)

    def scope_label(self) -> str:
        """Readable scope: 川渝, 四川省, 重庆市 or the alliance name."""
        if self.scope_type == "chuanyu":
            return "川渝"
        if self.scope_type == "provincial":
            return {"51": "四川省", "50": "重庆市"}.get(self.province or "", str(self.province))
        return str(self.alliance_name)

    def includes(self, member: Member) -> bool:
        """True when ``member`` is inside this catalogue's scope."""
        if self.scope_type == "chuanyu":
            return member.province in ("50", "51")
        if self.scope_type == "provincial":
            return member.province == self.province
        return member.uscc in self.alliance_members


def _member_of(entry: Any) -> Any:
    return entry.member


def _physician_of(qualification: Qualification) -> Any:
    return qualification.physician_ref


def _id_card_of(physician: Physician) -> Any:
    return physician.id_card


def _fingerprints_of(member: Member) -> list[str]:
    return [mc.fingerprint for mc in member.certificates]


def _members_of(physician: Physician) -> list[Any]:
    return [r.member for r in physician.practice]


class Snapshot:
    """A parsed registry snapshot: the data every policy query and decision reads.

    Implements the ``TrustSource`` protocol of :mod:`gateway.signing.trust`:
    ``certificates_for_kid``, ``authorities`` and ``is_listed``.
    """

    def __init__(
        self,
        *,
        version: int,
        issued: _dt.datetime,
        valid_until: _dt.datetime,
        authority_uscc: str,
        authority_name: str,
        members: Iterable[Member],
        qualifications: Iterable[Qualification] = (),
        eqa: Iterable[EqaResult] = (),
        catalogues: Iterable[Catalogue] = (),
        diagnosis_by_exposure: Mapping[str, Iterable[str]] | None = None,
        diagnosis_by_factor: Mapping[str, Iterable[str]] | None = None,
        demo: bool = False,
        note: str | None = None,
        document: Mapping[str, Any] | None = None,
        authority_certificates: Iterable[x509.Certificate] = (),
        physicians: Iterable[Physician] = (),
    ) -> None:
        self.version = version
        self.issued = issued
        self.valid_until = valid_until
        self.authority_uscc = authority_uscc
        self.authority_name = authority_name
        self.members: dict[str, Member] = {m.uscc: m for m in members}
        self.qualifications: tuple[Qualification, ...] = tuple(qualifications)
        self.physicians: dict[str, Physician] = {p.id: p for p in physicians}
        self.eqa: tuple[EqaResult, ...] = tuple(eqa)
        self.catalogues: tuple[Catalogue, ...] = tuple(catalogues)
        self.diagnosis_by_exposure = {k: tuple(v) for k, v in (diagnosis_by_exposure or {}).items()}
        self.diagnosis_by_factor = {k: tuple(v) for k, v in (diagnosis_by_factor or {}).items()}
        self.demo = demo
        self.note = note
        #: The signed body (without ``signature``), as received or built.
        self.document: dict[str, Any] = dict(document or {})
        #: Registry authority certificates that verified this snapshot (set by ``verify_snapshot``).
        self.authority_certificates: tuple[x509.Certificate, ...] = tuple(authority_certificates)
        self._digest: str | None = None
        # lookups that decisions and signature checks make (by member, by kid, by coding...), built on first use
        # from the collection they index and built again should that collection be replaced (:meth:`_made`):
        # {name: (collection, index)}
        self._by: dict[str, tuple[Any, dict[Any, Any]]] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> "Snapshot":
        """Parse a snapshot document (signature, if any, is ignored here: see ``verify_snapshot``).

        :raises ConfigError: the document is not a snapshot or a field is malformed.
        """
        where = ""
        try:
            if doc.get("format") != SNAPSHOT_FORMAT:
                raise ConfigError(f"not a registry snapshot (format {doc.get('format')!r})", "format")
            members = []
            for i, m in enumerate(doc.get("members", [])):
                where = f"members[{i}]"
                members.append(
                    Member(
                        uscc=m["uscc"],
                        name=m["name"],
                        division=m["division"],
                        kind=m["kind"],
                        period=Period.of(m),
                        status=m.get("status", "active"),
                        status_date=_date(m.get("status_date")),
                        level=m.get("level"),
                        miplrn=m.get("miplrn"),
                        endpoint=m.get("endpoint"),
                        certificates=tuple(MemberCertificate.of(c) for c in m.get("certificates", [])),
                    )
                )
            quals = []
            for i, q in enumerate(doc.get("qualifications", [])):
                where = f"qualifications[{i}]"
                physician = q.get("physician") or {}
                authority = q["authority"]
                quals.append(
                    Qualification(
                        id=q["id"],
                        member=q.get("member", ""),
                        type=qualification_type_code(q["type"]),
                        authority_name=authority["name"],
                        authority_province=authority.get("province"),
                        authority_level=authority.get("level"),
                        authority_uscc=authority.get("uscc"),
                        period=Period.of(q),
                        status=q.get("status", "active"),
                        status_date=_date(q.get("status_date")),
                        scope=tuple(q.get("scope", [])),
                        grade=q.get("grade"),
                        physician_id=physician.get("id"),
                        physician_name=physician.get("name"),
                        number=q.get("number"),
                        factors=tuple(q.get("factors", [])),
                        physician_ref=physician.get("ref"),
                    )
                )
            physicians = []
            for i, p in enumerate(doc.get("physicians", [])):
                where = f"physicians[{i}]"
                physicians.append(
                    Physician(
                        id=p["id"],
                        name=p.get("name"),
                        id_card=p["id_card"],
                        certificate=p["certificate"],
                        practice=tuple(
                            PracticeRegistration(r["member"], r["staff_id"], Period.of(r))
                            for r in p.get("practice", [])
                        ),
                    )
                )
            eqa = []
            for i, e in enumerate(doc.get("eqa", [])):
                where = f"eqa[{i}]"
                item = e["item"]
                eqa.append(
                    EqaResult(
                        member=e["member"],
                        year=int(e["year"]),
                        provider=e["provider"],
                        provider_level=e.get("provider_level"),
                        passed=e["result"] == "pass",
                        period=Period.of(e),
                        catalogue=item.get("catalogue"),
                        code=item.get("code"),
                        loinc=item.get("loinc"),
                    )
                )
            catalogues = []
            for i, c in enumerate(doc.get("catalogues", [])):
                where = f"catalogues[{i}]"
                items = []
                for j, it in enumerate(c["items"]):
                    where = f"catalogues[{i}].items[{j}]"
                    items.append(
                        CatalogueItem(
                            catalogue_id=c["id"],
                            code=it["code"],
                            display=it["display"],
                            item_class=it["class"],
                            window_days=int(it["window_days"]),
                            time_anchor=it["time_anchor"],
                            mark=it["mark"],
                            direction=it["direction"],
                            min_issuer_level=it.get("min_issuer_level"),
                            responsible=it.get("responsible", DEFAULT_RESPONSIBLE.get(it["class"], "performer")),
                            eqa_required=bool(it["eqa_required"]),
                            period=Period.of(it),
                            loinc=tuple(it.get("loinc", [])),
                            local_codes=frozenset((lc["issuer"], lc["code"]) for lc in it.get("local_codes", [])),
                        )
                    )
                scope = c["scope"]
                where = f"catalogues[{i}]"
                catalogues.append(
                    Catalogue(
                        id=c["id"],
                        name=c["name"],
                        version=c["version"],
                        scope_type=scope["type"],
                        province=scope.get("province"),
                        alliance_name=scope.get("name"),
                        alliance_members=tuple(scope.get("members", [])),
                        mark=c["mark"],
                        period=Period.of(c),
                        items=tuple(items),
                        note=c.get("note"),
                    )
                )
            where = "diagnosis_categories"
            diag = doc.get("diagnosis_categories") or {}
            where = "issued"
            issued = _aware(doc["issued"])
            where = "valid_until"
            valid_until = _aware(doc["valid_until"])
            where = "version"
            version = int(doc["version"])
            where = "authority"
            authority = doc["authority"]
            body = {k: v for k, v in doc.items() if k != "signature"}
            return cls(
                version=version,
                issued=issued,
                valid_until=valid_until,
                authority_uscc=authority["uscc"],
                authority_name=authority["name"],
                members=members,
                qualifications=quals,
                eqa=eqa,
                catalogues=catalogues,
                diagnosis_by_exposure=diag.get("by_exposure"),
                diagnosis_by_factor=diag.get("by_factor"),
                demo=bool(doc.get("demo", False)),
                note=doc.get("note"),
                document=body,
                physicians=physicians,
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(f"registry snapshot is malformed: {detail}", where) from None

    # -- lookups ------------------------------------------------------------------------------

    def member(self, uscc: str | None) -> Member | None:
        """The member with this USCC, or None."""
        return self.members.get(uscc or "")

    def _made(self, name: str, source: Any, build: Callable[[], dict[Any, Any]]) -> dict[Any, Any]:
        """The index ``build`` makes from ``source``, kept under ``name`` for as long as ``source`` is the collection
        the snapshot holds (made again if it is replaced)."""
        found = self._by.get(name)
        if found is not None and found[0] is source:
            return found[1]
        index = build()
        self._by[name] = (source, index)  # published whole: a thread meeting the snapshot meanwhile builds its own
        return index

    def _index(self, name: str, source: Any, key: Callable[[Any], Any], *, several: bool = False
               ) -> dict[Any, tuple[Any, ...]]:
        """The values of ``source`` (a collection, or a dict's values) grouped by ``key``, each group in
        ``source``'s order (:meth:`_made` under ``name``). ``several``: ``key`` gives each value's keys, and a
        value is in each of their groups once.

        :raises TypeError: a key that cannot be looked up (not hashable).
        """
        def build() -> dict[Any, Any]:
            groups: dict[Any, list[Any]] = {}
            for value in (source.values() if isinstance(source, dict) else source):
                if not several:
                    groups.setdefault(key(value), []).append(value)
                    continue
                for k in dict.fromkeys(key(value)):
                    groups.setdefault(k, []).append(value)
            return {k: tuple(v) for k, v in groups.items()}

        return self._made(name, source, build)

    def _where(self, name: str, source: Any, key: Callable[[Any], Any], wanted: Any, *,
               several: bool = False) -> tuple[Any, ...]:
        """The values of ``source`` whose ``key`` equals ``wanted`` (with ``several``: is among its keys), in
        order: looked up, or searched for when a key is not hashable (the registry's own entries never are)."""
        try:
            return self._index(name, source, key, several=several).get(wanted, ())
        except TypeError:
            values = source.values() if isinstance(source, dict) else source
            return tuple(v for v in values if (wanted in key(v) if several else key(v) == wanted))

    def qualifications_held(self, uscc: str) -> tuple[Qualification, ...]:
        """The qualifications listed for member ``uscc``, in snapshot order (looked up, not searched for)."""
        return self._where("member", self.qualifications, _member_of, uscc)

    def physician_qualifications(self, physician_id: str) -> tuple[Qualification, ...]:
        """The qualifications listed for the physician ``physicians[].id``, in snapshot order."""
        return self._where("physician", self.qualifications, _physician_of, physician_id)

    def eqa_of(self, uscc: str) -> tuple[EqaResult, ...]:
        """The EQA results of member ``uscc``, in snapshot order."""
        return self._where("eqa", self.eqa, _member_of, uscc)

    def catalogue_position(self, item: CatalogueItem) -> tuple[int, int]:
        """(the catalogue's position in the snapshot, the item's position in its catalogue)."""
        catalogues = self.catalogues

        def build() -> dict[Any, Any]:
            order = {c.id: i for i, c in enumerate(catalogues)}
            within = {(c.id, it.code): j for c in catalogues for j, it in enumerate(c.items)}
            return {key: (order[key[0]], j) for key, j in within.items()}

        position: tuple[int, int] = self._made("position", catalogues, build)[(item.catalogue_id, item.code)]
        return position

    def levels_of(self, uscc: str) -> tuple[LevelFact, ...]:
        """A member's dated hospital levels: its hospital-grade qualifications (the one source when it has
        any; a suspended or revoked grade ends on its status date, and one without a date was never held), else the
        undated ``level`` of an older
        source, taken as held over the member's whole listing."""
        grades = [q for q in self.qualifications_held(uscc) if q.type == "hospital-grade" and q.grade]
        if grades:
            out = []
            for q in sorted(grades, key=lambda g: (g.period.start or _dt.date.min, g.id)):
                end = q.period.end
                if q.status != "active" and q.status_date is None:
                    continue  # suspended or revoked with no date: from the start, as every other check takes it
                if q.status != "active" and q.status_date is not None:
                    last = q.status_date - _dt.timedelta(days=1)
                    end = last if end is None or last < end else end
                out.append(LevelFact(str(q.grade), Period(q.period.start, end), q.id))
            return tuple(out)
        member = self.members.get(uscc)
        if member is not None and member.level:
            return (LevelFact(member.level, member.period, "members[].level"),)
        return ()

    def level_on(self, uscc: str | None, day: _dt.date) -> LevelFact | None:
        """The hospital level a member held on ``day`` (the latest-starting one when periods overlap), or None
        when the registry does not say."""
        held = [f for f in self.levels_of(uscc or "") if f.period.covers(day)]
        return held[-1] if held else None

    def physician_by_id_card(
        self, member: str, id_card: str, day: _dt.date
    ) -> tuple[Physician | None, PracticeRegistration | None]:
        """The physician with this 身份证号, and their registration at ``member`` covering ``day``."""
        listed = self._where("id_card", self.physicians, _id_card_of, id_card)
        physician = listed[0] if listed else None
        if physician is None:
            return None, None
        return physician, next((r for r in physician.registrations_at(member) if r.period.covers(day)), None)

    def registered_physician(
        self, member: str, staff_id: str, day: _dt.date
    ) -> tuple[Physician | None, PracticeRegistration | None]:
        """The physician a member's staff id names (any period), and their registration there covering ``day``."""
        for physician in self._where("practice", self.physicians, _members_of, member, several=True):
            registrations = physician.registrations_at(member, staff_id)
            if registrations:
                return physician, next((r for r in registrations if r.period.covers(day)), None)
        return None, None

    def items_for_coding(self, coding: Coding) -> tuple[CatalogueItem, ...]:
        """Catalogue items (any catalogue, any date) that a coding names: by catalogue code, LOINC,
        or an issuer's local code (the local code system names its issuer)."""
        catalogues = self.catalogues

        def build() -> dict[Any, Any]:
            index: dict[tuple[str, str], list[CatalogueItem]] = {}
            for catalogue in catalogues:
                for item in catalogue.items:
                    index.setdefault((item.system, item.code), []).append(item)
                    if item.item_class == "technical-service":  # the item's code is the report's service type
                        index.setdefault((SYSTEM_TECHNICAL_SERVICE_TYPE, item.code), []).append(item)
                    for loinc in item.loinc:
                        index.setdefault((SYSTEM_LOINC, loinc), []).append(item)
                    for issuer, code in sorted(item.local_codes):
                        index.setdefault((local_item_system(issuer), code), []).append(item)
            return {k: tuple(v) for k, v in index.items()}

        items: tuple[CatalogueItem, ...] = self._made("coding", catalogues, build).get((coding.system, coding.code), ())
        return items

    def supervising_authorities(self) -> dict[str, SupervisingAuthority]:
        """The authorities that approve or file members, by USCC (``authorities`` of the snapshot)."""
        found = getattr(self, "_supervisors", None)
        if found is None:
            found = {a["uscc"]: SupervisingAuthority.of(a) for a in self.document.get("authorities", [])}
            self._supervisors: dict[str, SupervisingAuthority] = found
        return found

    def catalogue(self, catalogue_id: str) -> Catalogue | None:
        """The catalogue with this id, or None."""
        return next((c for c in self.catalogues if c.id == catalogue_id), None)

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical signed body: names exactly this snapshot."""
        if self._digest is None:
            self._digest = hashlib.sha256(canonicalize(self.document)).hexdigest()
        return self._digest

    # -- TrustSource ----------------------------------------------------------------------------

    def _kids(self) -> dict[str, list[tuple[Member, MemberCertificate]]]:
        members = self.members

        def build() -> dict[Any, Any]:
            index: dict[str, list[tuple[Member, MemberCertificate]]] = {}
            for member in members.values():
                for mc in member.certificates:
                    index.setdefault(kid_of(mc.certificate), []).append((member, mc))
            return index

        return self._made("kid", members, build)

    def certificates_for_kid(self, kid: str) -> list[x509.Certificate]:
        """Every listed member certificate whose kid is ``kid`` (kids are short: several may match)."""
        return [mc.certificate for _, mc in self._kids().get(kid, [])]

    def authorities(self) -> list[x509.Certificate]:
        """The registry authority certificates that verified this snapshot (member certificates chain to them)."""
        return list(self.authority_certificates)

    def is_listed(self, cert: x509.Certificate, at: _dt.datetime) -> bool:
        """True when ``cert`` is listed for the member it names, that member is active at ``at`` and
        both the listing and the certificate are valid then.

        Anything the snapshot no longer lists is revoked: removal is revocation.
        """
        fingerprint = hashlib.sha256(cert.public_bytes(_DER)).hexdigest()
        day = china_date(at)
        named = uscc_of(cert)
        for member in self._listing(fingerprint):
            for mc in member.certificates:
                if mc.fingerprint == fingerprint and member.uscc == named:
                    return member.active_on(day) and mc.valid_at(at)
        return False

    def member_of_certificate(self, cert: x509.Certificate) -> Member | None:
        """The member a listed certificate belongs to, or None."""
        fingerprint = hashlib.sha256(cert.public_bytes(_DER)).hexdigest()
        for member in self._listing(fingerprint):
            if any(mc.fingerprint == fingerprint for mc in member.certificates):
                return member
        return None

    def _listing(self, fingerprint: str) -> tuple[Member, ...]:
        """The members that list a certificate with this SHA-256 fingerprint, in snapshot order (looked up: every
        signature verified and every peer's TLS certificate asks)."""
        return self._where("fingerprint", self.members, _fingerprints_of, fingerprint, several=True)


def _aware(value: Any) -> _dt.datetime:
    moment = _dt.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return moment
