"""Reference tables the registry checks against: the hazard-factor catalogue.

A 职业健康检查 filing may list the factors it covers (``qualifications[].factors``).
They are codes of CodeSystem hazard-factor, i.e. the ``code`` column of
``mappings/concepts/hazard-catalogue.csv``; ``<class>-<seq>`` with the 目录's
number (``chemical-028``) is accepted too and means the same factor (苯 is
``benzene``). Both the registry source and the recognition rule use
:func:`factor_code` so that either spelling matches.

A factor written by a name the catalogue lists (its name or an alias: ``铅`` for
``lead``) is found by :func:`factor_named` and :func:`resolve_factor`: a filing
may list factors that way, and a Bundle from another system may code a factor
only by such a name. A name two entries share is not resolved (it is ambiguous).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from gateway.errors import ConfigError
from gateway.mapping.tables import _load_catalogue, _read_table, factor_key, short_names

__all__ = ["HAZARD_CATALOGUE_PATH", "HazardCode", "hazard_index", "hazard_names", "factor_code", "factor_named",
           "resolve_factor"]

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
    return _indexes()[0]


@lru_cache(maxsize=1)
def hazard_names() -> dict[str, HazardCode]:
    """Every name and alias of the catalogue (as :func:`~gateway.mapping.tables.factor_key` writes it), to its
    factor: a name two entries share goes to the one listing it among its aliases, and a name without its trailing
    bracketed remarks (``铅及其化合物``) counts where it names one entry only.

    :raises ConfigError: the catalogue cannot be read.
    """
    return _indexes()[1]


@lru_cache(maxsize=1)
def _indexes() -> tuple[dict[str, HazardCode], dict[str, HazardCode]]:
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
    claims: dict[str, dict[str, tuple[HazardCode, bool]]] = {}
    shorts: dict[str, dict[str, HazardCode]] = {}
    for e in catalogue.entries:
        hit = HazardCode(e.code, e.category, e.name)
        index[e.code] = hit
        index.setdefault(f"{e.category}-{e.seq:03d}", hit)
        for name in (e.name, *e.aliases):
            key = factor_key(name)
            as_alias = name in e.aliases or claims.get(key, {}).get(e.code, (hit, False))[1]
            claims.setdefault(key, {})[e.code] = (hit, as_alias)
            for short in short_names(name):
                shorts.setdefault(short, {})[e.code] = hit
    names: dict[str, HazardCode] = {}
    for key, claimants in claims.items():
        chosen = [h for h, as_alias in claimants.values() if as_alias] if len(claimants) > 1 else \
            [h for h, _ in claimants.values()]
        if len(chosen) == 1:
            names[key] = chosen[0]
    for short, hits in shorts.items():
        if short not in claims and len(hits) == 1:
            names[short] = next(iter(hits.values()))
    return index, names


def factor_code(code: str | None) -> HazardCode | None:
    """The catalogue factor a code names (its own code or ``<class>-<seq>``), or None."""
    if not code:
        return None
    return hazard_index().get(code.strip())


def factor_named(name: str | None) -> HazardCode | None:
    """The catalogue factor a name or alias names (``铅`` is ``lead``), or None (unknown or shared by several)."""
    if not name or not name.strip():
        return None
    return hazard_names().get(factor_key(name.strip()))


def resolve_factor(code: str | None, name: str | None = None) -> tuple[HazardCode | None, str | None]:
    """The catalogue factor a factor means, and how it was found: ``code`` (a code or ``<class>-<seq>``),
    ``code-alias`` (the code is a name or alias of the catalogue), ``name-alias`` (no code, and the display name is
    a name or alias of the catalogue); (None, None) when none finds one factor. A code that is neither is not
    second-guessed from its display name."""
    if code and code.strip():
        hit = factor_code(code)
        if hit is not None:
            return hit, "code"
        hit = factor_named(code)
        return (hit, "code-alias") if hit is not None else (None, None)
    hit = factor_named(name)
    return (hit, "name-alias") if hit is not None else (None, None)
