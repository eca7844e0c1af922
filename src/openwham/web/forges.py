"""The web UI's Forges page (``/settings/forges``): the account's connections to GitHub,
GitLab and Gitea that open pull requests (tokens are write-only: never shown again), through
``service.forges`` as the API's ``forge_connections`` routes."""

from openwham.service import forges
from openwham.wire.forges import ForgeConnectionCreate

from .writeonly import WriteOnlyPage

PAGE = WriteOnlyPage(
    path="/settings/forges",
    template="forges.html",
    rows_key="connections",
    service=forges,
    body=ForgeConnectionCreate,
    fields=("kind", "api_base_url", "repo_url_prefix", "token", "bot_token", "pr_authorship_mode"),
    secret_fields=("token", "bot_token"),
    defaults={"kind": "github", "pr_authorship_mode": "user"},
)
