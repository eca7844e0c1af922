"""Construction shared by ``WhamClient`` and ``AsyncWhamClient``: base URL, auth, headers."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from openwham.client.core import DEFAULT_TIMEOUT, RetryPolicy, default_headers
from openwham.client.urls import CHATGPT_BASE_URL, api_root, normalize_base_url


@dataclass
class ClientOptions:
    """Everything both twins need to build their ``httpx`` client."""

    base_url: str
    api_root: str
    headers: dict[str, str]
    auth: httpx.Auth | None
    timeout: httpx.Timeout
    retry: RetryPolicy


def client_options(
    base_url: str | None,
    token: str | None,
    auth: httpx.Auth | None,
    account_id: str | None,
    timeout: float | httpx.Timeout | None,
    retries: int,
) -> ClientOptions:
    """``token`` is a bearer token (openwham); ``auth`` an ``httpx.Auth`` (e.g. ``CodexAuth``
    for chatgpt.com, which refreshes). Path style follows the base URL (see ``urls``)."""
    base = normalize_base_url(base_url or CHATGPT_BASE_URL)
    headers = default_headers(account_id)
    if token is not None:
        if auth is not None:
            raise ValueError("pass either token or auth, not both")
        headers["Authorization"] = f"Bearer {token}"
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, httpx.Timeout):
        timeout = httpx.Timeout(timeout)
    return ClientOptions(
        base_url=base,
        api_root=api_root(base) + "/",
        headers=headers,
        auth=auth,
        timeout=timeout,
        retry=RetryPolicy(retries=retries),
    )
