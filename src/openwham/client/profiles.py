"""Where the SDK and ``wham`` talk to: named profiles.

A profile is either an openwham server (``url`` + ``token``) or a ChatGPT account
(``kind: "chatgpt"``: the tokens of ``$CODEX_HOME/auth.json``, shared with the Codex CLI and
refreshed by :class:`~openwham.client.auth.CodexAuth`). They live in
``$WHAM_CONFIG_DIR/profiles.json`` (default ``$XDG_CONFIG_HOME/openwham``, i.e.
``~/.config/openwham``), mode 0600 because it holds tokens. The profile named ``chatgpt``
always exists.

Which profile is used: ``--profile`` / ``name``, else ``$WHAM_PROFILE``, else ``$WHAM_URL`` with
``$WHAM_TOKEN`` (an unnamed openwham profile, for scripts), else the file's ``default``, else
``chatgpt``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from openwham.client.auth import CodexAuth, default_codex_home
from openwham.client.errors import NotLoggedIn, WhamError
from openwham.client.urls import CHATGPT_BASE_URL, normalize_base_url

CHATGPT = "chatgpt"
ENV_PROFILE = "$WHAM_URL"
Kind = Literal["openwham", "chatgpt"]


def config_dir() -> Path:
    explicit = os.environ.get("WHAM_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "openwham"


@dataclass
class Profile:
    """One target. ``token`` only for openwham; ``codex_home`` only for chatgpt."""

    name: str
    kind: Kind
    url: str
    token: str | None = None
    account_id: str | None = None
    codex_home: str | None = None

    def auth_home(self) -> Path:
        return Path(self.codex_home) if self.codex_home else default_codex_home()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        return {k: v for k, v in data.items() if v is not None}


class ProfileStore:
    """The profiles file: read, change, write atomically (0600)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "profiles.json"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"default": None, "profiles": {}}
        except (OSError, ValueError) as e:
            raise WhamError(f"cannot read {self.path}: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict):
            raise WhamError(f"{self.path} is not a profiles file")
        data.setdefault("profiles", {})
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def default_name(self) -> str | None:
        name = self._load().get("default")
        return name if isinstance(name, str) else None

    def all(self) -> list[Profile]:
        """Every profile, the built-in ``chatgpt`` one included."""
        profiles = self._load()["profiles"]
        out = [self._profile(name, body) for name, body in sorted(profiles.items())]
        if CHATGPT not in profiles:
            out.insert(0, Profile(CHATGPT, "chatgpt", CHATGPT_BASE_URL))
        return out

    def _profile(self, name: str, body: Any) -> Profile:
        if not isinstance(body, dict) or body.get("kind") not in ("openwham", "chatgpt"):
            raise WhamError(f"profile {name!r} in {self.path} is malformed")
        fields = {k: body.get(k) for k in ("url", "token", "account_id", "codex_home")}
        url = fields.pop("url") or CHATGPT_BASE_URL
        return Profile(name=name, kind=body["kind"], url=str(url), **fields)

    def get(self, name: str) -> Profile:
        for profile in self.all():
            if profile.name == name:
                return profile
        known = ", ".join(p.name for p in self.all())
        raise WhamError(
            f"no profile named {name!r} (known: {known})",
            hint="add one with `wham login --server URL --token TOKEN --profile NAME`",
        )

    def put(self, profile: Profile, *, make_default: bool = False) -> None:
        data = self._load()
        data["profiles"][profile.name] = profile.to_json()
        if make_default or not data.get("default"):
            data["default"] = profile.name
        self._save(data)

    def remove(self, name: str) -> bool:
        data = self._load()
        found = data["profiles"].pop(name, None) is not None
        if data.get("default") == name:
            data["default"] = next(iter(data["profiles"]), None)
        if found:
            self._save(data)
        return found

    def select(self, name: str | None = None) -> Profile:
        """The profile to use (see the module docstring for the order)."""
        name = name or os.environ.get("WHAM_PROFILE") or None
        if name:
            return self.get(name)
        url = os.environ.get("WHAM_URL")
        if url:
            token = os.environ.get("WHAM_TOKEN")
            if not token:
                raise NotLoggedIn("WHAM_URL is set but WHAM_TOKEN is not")
            return Profile(ENV_PROFILE, "openwham", normalize_base_url(url), token=token)
        return self.get(self.default_name() or CHATGPT)


def client_kwargs(profile: Profile) -> dict[str, Any]:
    """Constructor arguments of ``WhamClient``/``AsyncWhamClient`` for a profile."""
    if profile.kind == "openwham":
        if not profile.token:
            raise NotLoggedIn(
                f"profile {profile.name!r} has no token",
                hint=f"run `wham login --server {profile.url} --token TOKEN "
                f"--profile {profile.name}`",
            )
        return {"base_url": profile.url, "token": profile.token, "account_id": profile.account_id}
    return {"base_url": profile.url, "auth": CodexAuth(profile.auth_home())}
