"""Checks of an environment's private remotes with the account's git credentials."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from openwham.config import Settings
from openwham.engine import branches
from openwham.service import environments as envs
from openwham.service import gitcreds


def check_remotes(db: Session, settings: Settings, account_id: str, body: dict[str, Any]) -> None:
    """Every repository of the environment that one of the account's credentials is for
    answers with it (400 naming the URL and what was refused otherwise). A repository
    without a credential is asked briefly without one: a remote that answers and refuses
    (a private repository) is a 400 saying so; one that does not answer in a few seconds is
    saved (it may be reachable later, or from the workers only); a public one answers."""
    box = None
    for key in body.get("repos") or []:
        url = envs.repo_url(body, str(key))
        if not url or url.startswith("/"):
            continue
        row = gitcreds.match(db, account_id, url)
        if row is None:
            branches.check_not_refused(url)
            continue
        box = box or gitcreds.settings_box(settings)
        branches.check_reachable(url, gitcreds.opened(row, box))
