"""The facts a decision is made on, with the signer taken from a verified signature only.

Rules such as ``reading-signature`` (基层检查、上级诊断: the reading institution must have signed) depend on who
signed a Bundle. ``Bundle.signature.who`` alone is a claim anyone can write; on the exchange the signature is
verified on receipt, and a Bundle given to ``gateway recognize`` or ``$recognize`` is held to the same: a
signature present must verify against the registry snapshot's certificates (and name its signer), else the Bundle
is refused; an unsigned Bundle is decided as unsigned.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any

from gateway.errors import InputError, ParseError, TrustError
from gateway.recognition.facts import ResultFacts, facts_from_bundle
from gateway.signing.jws import verify_bundle
from gateway.signing.trust import TrustSource

__all__ = ["facts_to_decide"]


def facts_to_decide(text: bytes, document: Any, trust: TrustSource, at: _dt.datetime) -> list[ResultFacts]:
    """The result facts of ``document`` (the parsed ``text``), each with the verified signer or none.

    :raises InputError: the Bundle carries a signature that does not verify against ``trust`` (located at
        ``Bundle.signature``), or facts cannot be read from it.
    """
    facts = facts_from_bundle(document)
    signer = None
    if isinstance(document, dict) and document.get("signature") is not None:
        try:
            signer = verify_bundle(text, trust, at=at).signer_uscc
        except ParseError:
            raise
        except TrustError as exc:
            raise InputError(f"the Bundle's signature does not verify, so it is not decided: {exc}",
                             "Bundle.signature") from None
        claimed = {f.signer_uscc for f in facts if f.signer_uscc}
        if claimed and claimed != {signer}:
            raise InputError(f"Bundle.signature.who names {', '.join(sorted(claimed))} but the signature is "
                             f"{signer}'s, so it is not decided", "Bundle.signature.who")
    return [dataclasses.replace(f, signer_uscc=signer) for f in facts]
