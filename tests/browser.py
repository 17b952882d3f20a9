"""Helpers of the browser tests: Debian's Chromium driven by Playwright for Python, and real `gateway serve`s.

Playwright's own browser download is not reachable from the machines this project is built on, so the tests
launch the ``chromium`` package of the operating system (``.ci/run`` installs it, with a CJK font so Chinese
shows in screenshots). Without Chromium or Playwright the browser tests are skipped on a developer's machine,
with the reason, and fail in CI (``CI=true``), where they must run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

#: Debian's Chromium (``apt-get install chromium``); GATEWAY_CHROMIUM names another build.
CHROMIUM = os.environ.get("GATEWAY_CHROMIUM", "/usr/bin/chromium")
#: Chromium stays offline and quiet: no QUIC, no update or sync traffic, no first-run page.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: The size of the screen of the hospital PCs the console is made for.
VIEWPORT = {"width": 1366, "height": 768}
#: Every figure on a console page, with its selection, as the page's own data-* attributes.
FIGURES_JS = """els => els.map(e => Object.assign({}, e.dataset, {
    text: e.textContent.trim(), href: e.closest('a') ? e.closest('a').getAttribute('href') : ''}))"""


def in_ci() -> bool:
    """Whether this is a CI run, where the browser tests must not be skipped."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_browser() -> Any:
    """Playwright's ``sync_playwright``, once Chromium and Playwright are both there.

    Skips the test (with the reason and the fix) when one is missing, or fails it in CI.
    """
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[test]')")
        sync_playwright = None
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium fonts-noto-cjk, or set GATEWAY_CHROMIUM)")
    if missing:
        reason = "browser tests need " + " and ".join(missing)
        if in_ci():
            pytest.fail(reason + "; CI=true, so they may not be skipped", pytrace=False)
        pytest.skip(reason)
    return sync_playwright


def launch(playwright: Any) -> Any:
    """Debian's Chromium, headless and offline; each launch has a fresh, temporary user-data directory."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def gateway_cli() -> list[str]:
    """The ``gateway`` command of this checkout (the one installed editable)."""
    return [sys.executable, "-m", "gateway"]


class Served:
    """One member gateway run by ``gateway --config FILE serve`` in its own process group, its output in a file."""

    def __init__(self, config: Path, url: str, log: Path, env: dict[str, str]) -> None:
        self.config, self.url, self.log = config, url, log
        self._out = log.open("wb")
        self.proc = subprocess.Popen([*gateway_cli(), "--config", str(config), "serve"],
                                     env={**os.environ, **env}, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Return once /health says the HTTP workers, the background loop and the database are up (the gateway
        may still report something failing, such as a dead delivery); fail with its output otherwise."""
        deadline, said = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                answer = requests.get(f"{self.url}/health", timeout=5)
                said = answer.text
                checks = answer.json().get("checks", {})
                if all(checks.get(part, {}).get("ok") for part in ("http", "background", "database")):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        lines = [line for line in self.output().splitlines() if '"GET /health"' not in line]
        pytest.fail(f"gateway at {self.url} did not come up: {said[:2000]}\n" + "\n".join(lines[-40:]),
                    pytrace=False)

    def output(self) -> str:
        """What the gateway wrote so far (its log lines)."""
        self._out.flush()
        return self.log.read_text("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM, as an operator's service manager would; SIGKILL to its own group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


@contextmanager
def serving(*gateways: Served) -> Iterator[tuple[Served, ...]]:
    """Gateways started together (they start in parallel), ready inside, stopped after."""
    try:
        for gw in gateways:
            gw.wait_ready()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()


class Recorder:
    """Every request a page made, and every error its console printed (a CSP refusal shows there)."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def elsewhere(self) -> list[str]:
        """Requests to anything but the gateways on loopback (the console must work on a cut-off intranet)."""
        return [u for u in self.urls
                if not (urlsplit(u).scheme in ("http", "https") and urlsplit(u).hostname == "127.0.0.1")
                and not u.startswith(("data:", "about:blank"))]


def figures(page: Any, name: str | None = None) -> list[dict[str, str]]:
    """The figures of the page (``data-figure`` elements) as dicts of their data-* attributes, text and link."""
    found: list[dict[str, str]] = page.eval_on_selector_all("[data-figure]", FIGURES_JS)
    return [f for f in found if name is None or f["figure"] == name]


def log_in(page: Any, base: str, name: str, password: str) -> Any:
    """Fill in and send the log-in form as a person would; returns the answer to the POST."""
    page.goto(f"{base}/console/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("main button[type=submit]")
    page.wait_for_load_state()
    return answer.value
