"""Reference tables the registry checks against: the hazard-factor catalogue.

A 职业健康检查 filing may list the factors it covers (``qualifications[].factors``).
They are codes of CodeSystem hazard-factor, i.e. the ``code`` column of
``mappings/concepts/hazard-catalogue.csv``; ``<class>-<seq>`` with the 目录's
number (``chemical-028``) is accepted too and means the same factor (苯 is
``benzene``). Both the registry source and the recognition rule use
:func:`factor_code` so that either spelling matches.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from gateway.errors import ConfigError
from gateway.mapping.tables import _load_catalogue, _read_table

__all__ = ["HAZARD_CATALOGUE_PATH", "HazardCode", "hazard_index", "factor_code"]

HAZARD_CATALOGUE_PATH = Path(__file__).resolve().parents[2] / "mappings" / "concepts" / "hazard-catalogue.csv"


class HazardCode(NamedTuple):
    """A factor of the catalogue: its code and exposure class."""

    code: str
    category: str
    name: str


@lru_cache(maxsize=1)
def hazard_index() -> dict[str, HazardCode]:
    """Every code and ``<class>-<seq>`` spelling of the catalogue, to its factor.

    :raises ConfigError: the catalogue cannot be read.
    """
    try:
        meta, body = _read_table(HAZARD_CATALOGUE_PATH)
    except OSError as exc:
        raise ConfigError(f"cannot read the hazard catalogue {HAZARD_CATALOGUE_PATH}: {exc}",
                          str(HAZARD_CATALOGUE_PATH)) from None
    problems: list[str] = []
    catalogue = _load_catalogue(HAZARD_CATALOGUE_PATH, problems, meta, body)
    if catalogue is None or problems:
        raise ConfigError("the hazard catalogue has problems: " + "; ".join(problems[:3]), str(HAZARD_CATALOGUE_PATH))
    index: dict[str, HazardCode] = {}
    for e in catalogue.entries:
        hit = HazardCode(e.code, e.category, e.name)
        index[e.code] = hit
        index.setdefault(f"{e.category}-{e.seq:03d}", hit)
    return index


def factor_code(code: str | None) -> HazardCode | None:
    """The catalogue factor a code names (its own code or ``<class>-<seq>``), or None."""
    if not code:
        return None
    return hazard_index().get(code.strip())
