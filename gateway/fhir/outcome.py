"""OperationOutcome: the one shape every error and report of issues takes.

Flask-free, so the pipeline, the CLI and the HTTP API build it the same way:
``issue[].severity``, ``code``, ``diagnostics`` (the readable line, prefixed
with the unit's label when the issue carries one) and ``expression`` (the
field, FHIRPath, XPath or parameter the issue is about).
"""
from __future__ import annotations

from typing import Any

from gateway.errors import Issue

__all__ = ["operation_outcome"]

_SEVERITIES = {"error", "warning", "information", "fatal"}


def operation_outcome(issues: list[Issue], *, empty_text: str = "all OK") -> dict[str, Any]:
    """An R4 OperationOutcome for ``issues`` (an information issue when there are none)."""
    if not issues:
        issues = [Issue("information", "informational", "", empty_text)]
    out = []
    for i in issues:
        entry: dict[str, Any] = {
            "severity": i.severity if i.severity in _SEVERITIES else "error",
            "code": i.code or "processing",
            "diagnostics": f"{i.extra['label']}: {i.line()}" if "label" in i.extra else i.line(),
        }
        if i.location:
            entry["expression"] = [i.location]
        out.append(entry)
    return {"resourceType": "OperationOutcome", "issue": out}
