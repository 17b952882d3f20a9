"""Console: the web pages auditors (医务科, 质控科, inspectors) and hospital IT open at ``/console/``.

Server-rendered (a Flask blueprint and Jinja2 templates in this package), with
every asset shipped here: no CDN, no script needed to read a page. People log
in with a user name and password (``gateway.auth``); ``auditor`` reads,
``admin`` also acts (retries, replays, raw bytes). Every figure shown carries
its value in ``data-figure``/``data-value`` attributes and links to the records
behind it; recognition figures come from :func:`gateway.audit.stats.compute`,
the function ``gateway audit stats`` prints, so both always agree.
"""
from __future__ import annotations

from gateway.console.views import bp

__all__ = ["bp"]
