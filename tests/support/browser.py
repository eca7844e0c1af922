"""Headless Chromium from Debian's ``chromium`` package, driven by Playwright.

Playwright's own browser download cannot work here, so the browser is the system's
(``scripts/setup.sh --with-postgres`` installs it). Screenshots go to ``WHAM_TEST_ARTIFACTS``
(default: a directory under pytest's temporary directory), to be looked at by a person.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(
            f"{CHROMIUM} is missing: run ./scripts/test (its setup installs Debian's chromium)"
        )
    with sync_playwright() as p:
        # --no-sandbox: Chromium's own sandbox needs user namespaces set up for it, and the
        # tests may run as root; the pages are our own.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def artifacts_dir(default: Path) -> Path:
    path = Path(os.environ.get("WHAM_TEST_ARTIFACTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def sign_in(client: Any, token: str) -> str:
    """Sign a test client in to the web UI through its form; returns the signed-in session's
    CSRF token."""
    page = client.get("/login")
    r = client.post(
        "/login",
        data={"csrf": csrf_of(page.text), "token": token, "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/").text)
