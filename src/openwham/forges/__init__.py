"""Forges: the REST APIs of git hosting services that open pull requests (GitHub, GitLab,
Gitea/Forgejo), behind one small protocol (:class:`base.Forge`). Nothing here knows the
database or the API: ``commands.prs`` decides when to open or refresh a pull request and
records what a forge answers."""

from .base import Forge, ForgeError, PullRequest, RepoRef, forge_for

__all__ = ["Forge", "ForgeError", "PullRequest", "RepoRef", "forge_for"]
