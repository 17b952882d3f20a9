"""Audit verification: walk the hash chain and the checkpoints, name the first bad entry.

What is checked, in one pass over the log (``gateway audit verify``):

1. **Chain.** Entries are numbered 1..N without gaps; each entry's
   ``prev_hash`` is the hash of the entry before it; each entry's hash is
   SHA-256 of (prev_hash, seq, content). This catches an entry that was changed
   (its hash no longer fits), removed (a gap, or the next entry follows a hash
   no entry has), inserted or reordered (an entry follows one other than its
   predecessor).
2. **Checkpoints.** Every signed checkpoint (this gateway's own, and any held
   by peers that are given) must verify, must not count more entries than the
   log has (a truncated tail), and its head hash must be the hash of entry
   ``count`` (otherwise the log up to it was rewritten, hashes and all). A
   checkpoint whose signature could not be checked (no trusted certificates, or
   none that knows its signer: a trust anchor that does not match is no proof of
   forgery) is not vouched for: the report says so and is not OK.
3. **Index.** The search index (``audit_key``) holds exactly the keys each
   entry's content lists, so no entry can be hidden from searches.
4. **Guards.** The triggers that make the log append-only are in place (and,
   on PostgreSQL, enabled).

The same on SQLite and PostgreSQL: the stored UTF-8 bytes of each entry are
hashed, so a log gives the same hashes and the same report on either engine
(the statements are in :mod:`gateway.store.audit`).

Only a person with a copy of the database can alter it; the chain and the
signed checkpoints (kept by peers as well) make every alteration visible here.
Reading is streamed: a million entries are hashed in seconds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.log import GENESIS
from gateway.errors import BadSignature, GatewayError, UnknownIssuer
from gateway.store.audit import SQLITE_GUARDS, AuditPort, audit_store
from gateway.store.db import Database

__all__ = ["Finding", "Report", "CheckpointClaim", "SignerNotTrusted", "verify", "GUARD_TRIGGERS"]

log = logging.getLogger(__name__)

_END = 2**62  # past any entry number

#: The triggers that make the log append-only (SQLite; PostgreSQL has these and one per table refusing TRUNCATE).
GUARD_TRIGGERS = SQLITE_GUARDS


class SignerNotTrusted(UnknownIssuer):
    """A checkpoint signed by someone the trust given does not know (a certificate from an authority it does not
    hold): not proof of forgery, the checkpoint cannot be vouched for. It is a forgery when other checkpoints of the
    same log do verify with that trust (the trust does know this log's signer)."""


@dataclass(frozen=True)
class CheckpointClaim:
    """A signed statement "the log had ``count`` entries, the last with hash ``head``, at ``time``"."""

    count: int
    head: bytes
    time: str
    label: str  # how to name it in a report, e.g. "checkpoint 3" or a file name
    check_signature: Callable[[], object] | None = None  # raises when the signature does not verify


@dataclass(frozen=True)
class Finding:
    """One problem: the first entry concerned (None for problems outside entries) and what is wrong."""

    seq: int | None
    problem: str  # changed, removed, reordered, rewritten, truncated, index, checkpoint, guard
    message: str


@dataclass
class Report:
    """The outcome of a verification."""

    entries: int = 0  # the number of the last entry
    present: int | None = None  # entries the log holds (None: not counted)
    head: bytes = GENESIS
    checkpoints: int = 0  # checkpoints whose head the log still has (and whose signature verified, when checked)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unvouched: list[str] = field(default_factory=list)  # checkpoints whose signature could not be checked
    unvouched_why: dict[str, str] = field(default_factory=dict)  # why, when it was not for want of any trust

    @property
    def ok(self) -> bool:
        """True when nothing is wrong and every checkpoint's signature was checked."""
        return not self.findings and not self.unvouched

    @property
    def verdict(self) -> str:
        """``ok``; ``failed`` (something is wrong); ``unverified`` (nothing found wrong, but checkpoints
        could not be vouched for: no trusted certificates)."""
        if self.findings:
            return "failed"
        return "unverified" if self.unvouched else "ok"

    @property
    def first_bad(self) -> int | None:
        """The first entry that was changed, removed or reordered (or the first missing one), if any."""
        seqs = [f.seq for f in self.findings if f.seq is not None]
        return min(seqs) if seqs else None

    def as_json(self) -> dict[str, Any]:
        """The report as JSON."""
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "entries": self.entries,
            "present": self.entries if self.present is None else self.present,
            "head": self.head.hex(),
            "checkpoints": self.checkpoints,
            "first_bad": self.first_bad,
            "findings": [{"seq": f.seq, "problem": f.problem, "message": f.message} for f in self.findings],
            "unverified_checkpoints": list(self.unvouched),
            "unverified_why": dict(self.unvouched_why),
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """The report as lines for a terminal: the verdict first."""
        if self.ok:
            out = [f"OK: {self.entries} entries, head {self.head.hex()}, {_count(self.checkpoints, 'checkpoint')} "
                   f"match{'es' if self.checkpoints == 1 else ''}"]
        elif not self.findings:
            why = ("the trusted certificates given do not include their signer's" if self.unvouched_why
                   else "no trusted certificates to check their signatures with")
            out = [
                f"NOT VERIFIED: the chain of {self.entries} entries is intact (head {self.head.hex()}), but "
                f"{len(self.unvouched)} signed checkpoints cannot be vouched for: {why}"
            ]
            out += [f"  - {label}: {self.unvouched_why.get(label, 'signature not checked')}"
                    for label in self.unvouched]
        else:
            first = self.first_bad
            where = f"first bad entry: {first}" if first is not None else "the log's protection is damaged"
            present = self.entries if self.present is None else self.present
            last = "" if present == self.entries else f", the last numbered {self.entries}"
            out = [f"FAILED: {where} ({_count(present, 'entry', 'entries')} present{last})"]
            out += [f"  - {f.message}" for f in self.findings]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _count(n: int, one: str, many: str | None = None) -> str:
    """``1 checkpoint``, ``2 checkpoints``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


class _Walk:
    """State of the chain walk; collects findings up to a limit."""

    def __init__(self, limit: int) -> None:
        self.findings: list[Finding] = []
        self.limit = limit
        self.truncated = False
        self.rows = 0  # entries the log holds (fewer than the last one's number when some were removed)

    def add(self, finding: Finding) -> None:
        if len(self.findings) < self.limit:
            self.findings.append(finding)
        else:
            self.truncated = True


def _key_groups(store: AuditPort) -> Iterator[tuple[int, bytes]]:
    """Per entry, in order, its index rows as the JSON text the entry's content lists them in."""
    yield from store.key_groups()
    yield (_END, b"")


def _listed_keys(content: bytes) -> bytes:
    """The ``k`` array of an entry's JCS content, cut out as text (cheaper than parsing ~1 KB of JSON).

    JCS orders members ``facts, k, kind, ...``; quotes inside strings are escaped,
    so the last ``,"kind":`` is the top-level one and the ``,"k":`` before it too.
    """
    end = content.rindex(b',"kind":')
    return content[content.rindex(b',"k":', 0, end) + 5:end]


def _walk_chain(
    store: AuditPort, wanted: set[int], walk: _Walk, check_index: bool
) -> tuple[int, bytes, dict[int, bytes]]:
    """Hash every entry in order (and compare its index rows); return (last seq, its hash, hashes of ``wanted``)."""
    rows = store.chain()
    groups = _key_groups(store) if check_index else None
    try:
        return _walk_rows(store, rows, wanted, walk, groups)
    finally:
        # closed here, while the connection is open: a walk stopped by an error (a damaged page) would otherwise
        # leave its generators to the garbage collector, which closes them once the connection is gone ("Exception
        # ignored in: <generator object _key_groups>" and a traceback after the one-line error)
        for stream in (groups, rows):
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def _walk_rows(
    store: AuditPort,
    rows: Iterator[tuple[int, bytes, bytes, bytes]],
    wanted: set[int],
    walk: _Walk,
    groups: Iterator[tuple[int, bytes]] | None,
) -> tuple[int, bytes, dict[int, bytes]]:
    """:func:`_walk_chain` over the log's ``rows`` and its index rows ``groups`` (None: the index is not compared)."""
    expected, prev, last = 1, GENESIS, 0
    seen: dict[int, bytes] = {}
    sha256 = hashlib.sha256
    kseq, ktext = next(groups) if groups else (_END, b"")
    for seq, content, prev_hash, digest in rows:
        walk.rows += 1
        follows = prev_hash == prev
        intact = sha256(prev_hash + b"%d\n" % seq + content).digest() == digest
        if seq != expected:
            span = f"entry {expected}" if seq == expected + 1 else f"entries {expected} to {seq - 1}"
            walk.add(Finding(expected, "removed", f"{span} {'is' if seq == expected + 1 else 'are'} missing (removed)"))
        elif not follows:
            owner = store.seq_of_hash(prev_hash)
            if owner is not None:
                walk.add(Finding(seq, "reordered", f"entry {seq} is out of order: it was written after entry {owner}"))
            elif intact and seq > 1:
                walk.add(
                    Finding(
                        seq - 1,
                        "changed",
                        f"entry {seq - 1} was changed and re-hashed: "
                        f"entry {seq} follows a hash entry {seq - 1} no longer has",
                    )
                )
            else:
                walk.add(
                    Finding(
                        seq,
                        "removed",
                        f"entry {seq} follows an entry that no longer exists (removed, and later entries renumbered)",
                    )
                )
        elif not intact:
            walk.add(Finding(seq, "changed", f"entry {seq} was changed: its content no longer matches its hash"))
        if groups is not None:
            while kseq < seq:
                walk.add(
                    Finding(kseq, "index", f"the search index holds keys for entry {kseq}, which is not in the log")
                )
                kseq, ktext = next(groups)
            held = b"[]"
            if kseq == seq:
                held = ktext
                kseq, ktext = next(groups)
            if held != _listed_keys(content):
                walk.add(
                    Finding(seq, "index", f"the search index of entry {seq} does not hold the keys the entry lists")
                )
        if seq in wanted:
            seen[seq] = bytes(digest)
        prev, expected, last = bytes(digest), seq + 1, seq
    if kseq < _END:
        walk.add(Finding(kseq, "index", f"the search index holds keys for entry {kseq}, which is not in the log"))
    return last, prev, seen


def _check_guards(store: AuditPort, walk: _Walk) -> None:
    present = store.triggers()
    missing = [t for t in store.guards if t not in present]
    if missing:
        walk.add(Finding(None, "guard",
                         f"the append-only guards were removed, disabled or changed: {', '.join(missing)}"))


def _signatures(claims: Sequence[CheckpointClaim]) -> list[tuple[CheckpointClaim, str | None, str | None]]:
    """Each claim with why it is forged and why it cannot be vouched for (each None when not so). A signer the trust
    does not know cannot be vouched for, unless another checkpoint of the log verifies with that trust: the trust
    knows this log's signer, and one it does not know signed in its place."""
    checked: list[tuple[CheckpointClaim, str | None, str | None]] = []
    for claim in claims:
        if claim.check_signature is None:
            checked.append((claim, None, "signature not checked"))
            continue
        try:
            claim.check_signature()
        except SignerNotTrusted as exc:
            checked.append((claim, None, exc.message))
        except GatewayError as exc:
            checked.append((claim, exc.message, None))
        else:
            checked.append((claim, None, None))
    if not any(c.check_signature is not None and forged is None and unknown is None for c, forged, unknown in checked):
        return checked
    out: list[tuple[CheckpointClaim, str | None, str | None]] = []
    for c, forged, unknown in checked:
        if c.check_signature is not None and unknown is not None:
            forged, unknown = BadSignature().message, None  # (as any forgery: it says nothing of why)
        out.append((c, forged, unknown))
    return out


def _check_claims(
    claims: Sequence[CheckpointClaim], last: int, hashes: dict[int, bytes], walk: _Walk, unvouched: list[str],
    unvouched_why: dict[str, str] | None = None,
) -> int:
    """Check each checkpoint against the walked chain; return how many verified."""
    good = 0
    confirmed = 0  # the largest count a verified checkpoint confirmed so far
    for claim, forged, unknown in _signatures(sorted(claims, key=lambda c: c.count)):
        if forged is not None:
            walk.add(Finding(None, "checkpoint", f"{claim.label} (count {claim.count}, made {claim.time}) is forged: "
                                                 f"{forged}"))
            continue
        if unknown is not None:
            unvouched.append(claim.label)
            if claim.check_signature is not None and unvouched_why is not None:
                unvouched_why[claim.label] = unknown
        if claim.count > last:
            walk.add(
                Finding(
                    last + 1,
                    "truncated",
                    f"the log ends at entry {last} but {claim.label} (made {claim.time}) covers {claim.count}: "
                    f"entries {last + 1} to {claim.count} were removed",
                )
            )
            continue
        actual = GENESIS if claim.count == 0 else hashes.get(claim.count)
        if actual != claim.head:
            # The first entry that can have changed: the first the chain walk found bad in the range
            # the checkpoint covers beyond the last confirmed one, else the start of that range.
            inside = [f.seq for f in walk.findings if f.seq is not None and confirmed < f.seq <= claim.count]
            walk.add(
                Finding(
                    min(inside, default=confirmed + 1),
                    "rewritten",
                    f"entries {confirmed + 1} to {claim.count} were rewritten since {claim.label} (made {claim.time}): "
                    f"entry {claim.count} no longer has the signed head hash",
                )
            )
            continue
        confirmed = max(confirmed, claim.count)
        good += 1
    return good


def verify(
    db: Database,
    claims: Iterable[CheckpointClaim] = (),
    *,
    check_index: bool = True,
    max_findings: int = 20,
) -> Report:
    """Verify the log in ``db`` against itself and the given checkpoint claims.

    ``claims`` are this gateway's checkpoints and any a peer holds for it
    (see :func:`gateway.audit.checkpoint.claims`). The report lists what is
    wrong, the first bad entry first in importance; nothing is changed.
    """
    claims = list(claims)
    store = audit_store(db)
    if not store.has_log():
        return Report(findings=[Finding(None, "missing", "this database holds no audit log")])
    walk = _Walk(max_findings)
    with store.snapshot():  # one state of the log, its text as the stored bytes
        last, head, hashes = _walk_chain(store, {c.count for c in claims}, walk, check_index)
    report = Report(entries=last, present=walk.rows, head=head)
    report.checkpoints = _check_claims(claims, last, hashes, walk, report.unvouched, report.unvouched_why)
    _check_guards(store, walk)
    report.findings = sorted(walk.findings, key=lambda f: (f.seq is None, f.seq or 0))
    if walk.truncated:
        report.notes.append(f"only the first {max_findings} problems are listed")
    if not claims:
        report.notes.append("no checkpoint to verify against: a rewrite of the whole log would go unnoticed")
    log.info("audit verify: %d entries, %d findings", last, len(report.findings))
    return report
