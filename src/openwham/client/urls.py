"""Base URLs and path styles, chosen exactly as the Codex CLI chooses them.

docs/reference/codex-cli.md §3.2: trim a trailing ``/``; a chatgpt.com (or chat.openai.com) URL
without ``/backend-api`` gets it appended; a base containing ``/backend-api`` uses the
ChatGPT style ``{base}/wham/…``, any other base the Codex style ``{base}/api/codex/…``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from openwham.client.errors import InvalidURL

CHATGPT_BASE_URL = "https://chatgpt.com/backend-api"
_CHATGPT_HOSTS = ("https://chatgpt.com", "https://chat.openai.com")


def normalize_base_url(url: str) -> str:
    """The base URL as the Codex CLI normalises ``CODEX_CLOUD_TASKS_BASE_URL``."""
    base = url.strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidURL(f"not an http(s) URL: {url!r}", hint="use e.g. http://127.0.0.1:8080")
    if base.startswith(_CHATGPT_HOSTS) and "/backend-api" not in base:
        base += "/backend-api"
    return base


def api_root(base_url: str) -> str:
    """Where the WHAM paths start: ``{base}/wham`` or ``{base}/api/codex``."""
    base = normalize_base_url(base_url)
    return f"{base}/wham" if "/backend-api" in base else f"{base}/api/codex"


def site_root(base_url: str) -> str:
    """The base without a trailing ``/backend-api`` or ``/api/codex``."""
    base = normalize_base_url(base_url)
    return base.removesuffix("/backend-api").removesuffix("/api/codex")


def task_url(base_url: str, task_id: str) -> str:
    """The task's page, as ``codex cloud exec`` prints it: ``{root}/codex/tasks/{id}``."""
    return f"{site_root(base_url)}/codex/tasks/{task_id}"


def task_id_from(ref: str) -> str:
    """A task id, or the last path segment of a task URL (query and fragment dropped)."""
    text = ref.strip()
    if "://" in text:
        path = urlsplit(text).path.rstrip("/")
        return path.rsplit("/", 1)[-1]
    return text
