"""The web UI's Git credentials page (``/settings/git-credentials``, linked from the Forges
page): the account's credentials for private remotes, an HTTPS token or an SSH key
(write-only: never shown again), through ``service.gitcreds`` as the API's
``git_credentials`` routes."""

from openwham.service import gitcreds
from openwham.wire.gitcreds import GitCredentialCreate

from .writeonly import WriteOnlyPage

PAGE = WriteOnlyPage(
    path="/settings/git-credentials",
    template="gitcreds.html",
    rows_key="credentials",
    service=gitcreds,
    body=GitCredentialCreate,
    fields=("url_prefix", "username", "secret", "ssh_private_key", "known_hosts"),
    secret_fields=("secret", "ssh_private_key"),
)
