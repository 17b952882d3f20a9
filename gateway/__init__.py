"""川渝 result-recognition gateway.

Turns what hospital and CDC systems emit (HL7 v2 ORU^R01, WS/T 500.7 CDA, CDC
occupational-health exports) into FHIR R4 report Bundles, signs and exchanges
them between member gateways, decides recognition (互认) against a signed
registry, and records everything in a tamper-evident audit log.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
