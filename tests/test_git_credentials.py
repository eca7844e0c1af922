"""Git credentials (issue 18): an account's HTTPS tokens and SSH deploy keys, matched to a
repository by URL prefix, used by host git only (mirror clone and fetch, branch lookups,
PR pushes) and for that one call. Against real servers on loopback: git's smart-HTTP server
behind Basic auth and OpenSSH's sshd. A wrong credential is refused with a message naming
the URL; the secret is nowhere the API, logs, the database file or the sandbox show."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Api,
    Server,
    cli_user,
    completed_task,
    git,
    make_repo,
    run_cli,
    wait_for_task,
)
from openwham.gitauth import GitAuth
from openwham.sandbox.workspace import Mirrors, RemoteRefused, WorkspaceError
from openwham.service import gitcreds
from support.browser import sign_in
from support.git_servers import SmartHttpGit, SshGit, bare_copy, keygen
from support.scripted_model import Patch, Say, ScriptedModel, Shell

USER = "deploy"
TOKEN = "ghp_s3cretTOKENvalue0123456789"
WRONG = "ghp_wrongTOKEN000000000000000"
FIX = """\
*** Begin Patch
*** Update File: calc.py
@@
 def add(a, b):
-    return a - b
+    return a + b
*** End Patch"""


@pytest.fixture
def http_remote(tmp_path: Path) -> Iterator[tuple[SmartHttpGit, Path, str]]:
    """A private repository ``acme/widgets.git`` behind Basic auth ``deploy:TOKEN``."""
    root = tmp_path / "srv"
    remote = bare_copy(make_repo(tmp_path / "work"), root / "acme" / "widgets.git")
    server = SmartHttpGit(root, USER, TOKEN).start()
    yield server, remote, f"{server.url}/acme/widgets.git"
    server.stop()


def add_https(api: Api, prefix: str, secret: str = TOKEN) -> dict[str, Any]:
    r = api.post("git_credentials", json={"url_prefix": prefix, "username": USER, "secret": secret})
    assert r.status_code == 201, r.text
    return dict(r.json())


def scan(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` that holds ``secret`` (bytes, any encoding of it as is)."""
    found = []
    needle = secret.encode()
    for root in roots:
        for directory, _, files in os.walk(root):  # attempts' directories may go meanwhile
            for name in files:
                path = Path(directory, name)
                try:
                    if not path.is_symlink() and needle in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    pass
    return found


# --------------------------------------------------------------------------- the API


def test_credentials_are_the_accounts_own_and_write_only(server: Server, api: Api) -> None:
    made = add_https(api, "https://git.example.com")
    assert made["url_prefix"] == "https://git.example.com/"
    assert (made["kind"], made["username"]) == ("https", USER)
    listed = api.get("git_credentials").json()["items"]
    assert listed == [made] and TOKEN not in str(listed)
    other = api.as_(server.other_account_token())
    assert other.get("git_credentials").json()["items"] == []
    assert other.delete(f"git_credentials/{made['id']}").status_code == 404
    with server.app_state.db.session() as s:
        row = s.get(gitcreds.m.GitCredential, made["id"])
        assert row is not None and TOKEN not in row.secret  # sealed
        other_account = s.scalar(
            gitcreds.select(gitcreds.m.Account.id).where(gitcreds.m.Account.id != row.account_id)
        )
        assert other_account is not None
        url = "https://git.example.com/acme/widgets.git"
        assert gitcreds.match(s, row.account_id, url) is not None
        assert gitcreds.match(s, other_account, url) is None  # never another account's
    assert api.delete(f"git_credentials/{made['id']}").status_code == 204
    assert api.get("git_credentials").json()["items"] == []


def test_longest_prefix_wins_and_another_host_never_matches(server: Server, api: Api) -> None:
    add_https(api, "https://github.com", "tok-host")
    add_https(api, "https://github.com/acme/", "tok-org")
    with server.app_state.db.session() as s:
        account = s.scalar(gitcreds.select(gitcreds.m.GitCredential.account_id))
        assert account is not None
        box = server.app_state.secret_box

        def secret(url: str) -> str | None:
            auth = gitcreds.auth_for(s, account, url, box)
            return auth.secret if auth else None

        assert secret("https://github.com/acme/widgets.git") == "tok-org"
        assert secret("https://github.com/other/widgets.git") == "tok-host"
        assert secret("https://github.com.evil/acme/widgets.git") is None
        assert secret("https://github.com.evil.example/x.git") is None
        assert secret("http://github.com/acme/widgets.git") is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"url_prefix": "https://h/", "username": "u"}, "both"),
        ({"url_prefix": "https://h/", "secret": "s"}, "both"),
        ({"url_prefix": "https://h/"}, "either"),
        ({"url_prefix": "https://h/", "username": "u", "secret": "two words"}, "one word"),
        ({"url_prefix": "ftp://h/", "username": "u", "secret": "s"}, "https://"),
        ({"url_prefix": "https://u:p@h/", "username": "u", "secret": "s"}, "credentials"),
        ({"url_prefix": "https://h/\nx", "username": "u", "secret": "s"}, "one line"),
        ({"url_prefix": "git@h:o/r", "username": "u", "secret": "s"}, "SSH URL"),
        ({"url_prefix": "ssh://h/", "ssh_private_key": "k", "known_hosts": "h t k"}, "private key"),
        (
            {
                "url_prefix": "ssh://h/",
                "ssh_private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n"
                "-----END OPENSSH PRIVATE KEY-----",
                "known_hosts": "nonsense",
            },
            "known_hosts",
        ),
        ({"url_prefix": "https://h/", "username": "u", "secret": "s", "x": 1}, "x"),
    ],
)
def test_bad_credentials_are_refused(api: Api, body: dict[str, Any], words: str) -> None:
    r = api.post("git_credentials", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


# --------------------------------------------------------------------------- HTTPS remotes


def test_https_remote_needs_the_right_token_at_environment_save_and_task_start(
    server: Server, http_remote: tuple[SmartHttpGit, Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = server.api
    httpd, _, url = http_remote
    # no credential at all: the remote answers and refuses, so the save says what to do
    r = api.post("environments", json={"label": "w", "repos": [url]})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == (
        f"repository not reachable: authentication failed (no credential) for {url}; "
        "no git credential of this account matches it: add one (wham git-credential add)"
    )
    assert api.get("environments").json() == []  # nothing saved
    # a remote that does not answer now is saved (offline, or reachable from workers only)
    assert api.create_env("http://127.0.0.1:9/acme/later.git", label="later")["id"]
    wrong = add_https(api, httpd.url, WRONG)
    r = api.post("environments", json={"label": "w", "repos": [url]})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == f"repository not reachable: authentication failed for {url}"
    assert api.delete(f"git_credentials/{wrong['id']}").status_code == 204
    # the longest prefix: the repository's own credential, not the host's wrong one
    add_https(api, httpd.url, WRONG)
    add_https(api, f"{httpd.url}/acme/")
    env = api.create_env(url)
    task = api.create_task(env["id"], "hi", new_task={"branch": "main"})
    assert task["task"]["id"]
    r = api.post("tasks", json=_task_body(env["id"], "nope"))
    assert r.status_code == 400 and "'nope' not found" in r.json()["detail"], r.text
    for made in api.get("git_credentials").json()["items"]:
        assert api.delete(f"git_credentials/{made['id']}").status_code == 204
    r = api.post("tasks", json=_task_body(env["id"], "main"))
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("repository not reachable: authentication failed")
    assert url in r.json()["detail"]
    assert any(h.startswith("Basic ") for h in httpd.seen_auth)
    data = server.app_state.settings.resolved_data_dir
    assert scan(TOKEN, data) == [] and scan(WRONG, data) == []
    assert TOKEN not in caplog.text and WRONG not in caplog.text


def _task_body(env_id: str, branch: str) -> dict[str, Any]:
    return {
        "new_task": {"environment_id": env_id, "branch": branch},
        "input_items": [
            {"type": "message", "role": "user", "content": [{"content_type": "text", "text": "x"}]}
        ],
    }


def test_the_credential_is_given_for_one_call_and_never_kept(
    tmp_path: Path, http_remote: tuple[SmartHttpGit, Path, str]
) -> None:
    httpd, remote, url = http_remote
    auth = GitAuth(url_prefix=f"{httpd.url}/", kind="https", username=USER, secret=TOKEN)
    mirrors = Mirrors(tmp_path / "mirrors")
    (tmp_path / "mirrors").mkdir()
    with pytest.raises(RemoteRefused) as refused:
        mirrors.ensure("k", url)
    assert (
        str(refused.value)
        == f"repository not reachable: authentication failed (no credential) for {url}"
    )
    mirror = mirrors.ensure("k", url, auth=auth)
    head = git("rev-parse", "refs/heads/main", cwd=mirror).strip()
    # a new commit on the remote is fetched with the credential, refused without
    work = tmp_path / "work"
    (work / "NEW.md").write_text("new\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "new", cwd=work)
    git("push", "-q", str(remote), "main", cwd=work)
    with pytest.raises(RemoteRefused):
        mirrors.ensure("k", url)
    wrong = GitAuth(url_prefix=f"{httpd.url}/", kind="https", username=USER, secret=WRONG)
    with pytest.raises(RemoteRefused) as refused:
        mirrors.ensure("k", url, auth=wrong)
    assert WRONG not in str(refused.value)
    mirrors.ensure("k", url, auth=auth)
    assert git("rev-parse", "refs/heads/main", cwd=mirror).strip() != head
    assert scan(TOKEN, tmp_path / "mirrors") == []  # not in the mirror's config or anywhere


@pytest.mark.sandbox
def test_private_https_repository_end_to_end(
    engine_server: Server,
    scripted_model: ScriptedModel,
    tmp_path: Path,
    http_remote: tuple[SmartHttpGit, Path, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api = engine_server.api
    httpd, remote, url = http_remote
    add_https(api, f"{httpd.url}/")
    env = api.create_env(url)
    assert TOKEN not in str(env) and env["repo_map"][env["repos"][0]]["clone_url"] == url
    # the agent looks for the token everywhere it can see: files, every process's
    # environment and command line (the pattern is split, and given to grep on a pipe, so
    # that no command line holds it)
    half = len(TOKEN) // 2
    look = (
        f"T='{TOKEN[:half]}''{TOKEN[half:]}'; "
        'F=$(grep -rIlF --exclude-dir=proc --exclude-dir=sys -f <(printf %s "$T") / 2>/dev/null'
        " | head); "
        "P=$(for p in /proc/[0-9]*; do cat $p/environ $p/cmdline 2>/dev/null; done "
        '| tr "\\0" " " | grep -cF -f <(printf %s "$T")); echo "files:[$F] processes:$P"'
    )
    task_id, turn_id, details = completed_task(
        api, scripted_model, env["id"], "Fix add", [Shell(look), Patch(FIX), Say("Fixed.")]
    )
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert "return a + b" in git("show", f"{branch}:calc.py", cwd=remote)
    # a new commit on the remote: the next task's mirror fetch brings it
    work = tmp_path / "work"
    (work / "NEW.md").write_text("new\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "new", cwd=work)
    git("push", "-q", str(remote), "main", cwd=work)
    new_head = git("rev-parse", "main", cwd=work).strip()
    task2, _, details2 = completed_task(
        api, scripted_model, env["id"], "List", [Shell("ls NEW.md"), Say("Listed.")]
    )
    text = str(details2)
    assert "NEW.md" in text
    mirror_dir = engine_server.app_state.settings.resolved_data_dir / "mirrors"
    assert any(
        git("rev-parse", "refs/heads/main", cwd=m).strip() == new_head
        for m in mirror_dir.glob("*.git")
    )
    # the secret scan: API answers, logs, every file of the data directory (database,
    # mirrors, attempts), what the agent saw
    answers = [api.get(f"tasks/{t}").text for t in (task_id, task2)] + [
        api.get("environments").text,
        api.get("git_credentials").text,
        str(details),
    ]
    for t in (task_id,):
        answers.append(api.get(f"tasks/{t}/turns/{turn_id}/logs").text)
    assert all(TOKEN not in a for a in answers)
    sightings = _shell_outputs(details)
    assert any("files:[] processes:0" in out for out in sightings), sightings
    assert TOKEN not in caplog.text
    assert scan(TOKEN, engine_server.app_state.settings.resolved_data_dir) == []
    # a wrong token now: the next task fails naming the URL
    for made in api.get("git_credentials").json()["items"]:
        api.delete(f"git_credentials/{made['id']}")
    add_https(api, f"{httpd.url}/", WRONG)
    scripted_model.script = [Say("never")]
    created = api.create_task(env["id"], "again")
    failed = wait_for_task(api, created["task"]["id"])["current_assistant_turn"]
    assert failed["turn_status"] == "failed"
    assert f"repository not reachable: authentication failed for {url}" in str(failed["error"])
    assert WRONG not in str(failed)


def _shell_outputs(details: dict[str, Any]) -> list[str]:
    """The outputs of the agent's commands in the work log."""
    messages = details["current_assistant_turn"]["worklog"]["messages"]
    return [
        "".join(str(p) for p in m["content"].get("parts") or [])
        for m in messages
        if m["author"]["role"] == "tool"
    ]


# --------------------------------------------------------------------------- SSH remotes


@pytest.fixture
def ssh_remote(tmp_path: Path) -> Iterator[tuple[SshGit, Path, str, str]]:
    """A repository served over sshd on loopback; the client's private key."""
    key = tmp_path / "client_key"
    pub = keygen(key)
    sshd = SshGit(tmp_path / "sshd", pub).start()
    remote = bare_copy(make_repo(tmp_path / "work"), tmp_path / "srv" / "acme" / "widgets.git")
    yield sshd, remote, sshd.url(remote), key.read_text()
    sshd.stop()


def add_ssh(api: Api, prefix: str, key: str, hosts: str) -> dict[str, Any]:
    body = {"url_prefix": prefix, "ssh_private_key": key, "known_hosts": hosts}
    r = api.post("git_credentials", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_ssh_remote_needs_the_right_key_and_host_key(
    server: Server, tmp_path: Path, ssh_remote: tuple[SshGit, Path, str, str]
) -> None:
    api = server.api
    sshd, _remote, url, key = ssh_remote
    prefix = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    r = api.post("environments", json={"label": "w", "repos": [url]})  # no key at all
    assert r.status_code == 400, r.text
    assert "no git credential of this account matches it" in r.json()["detail"]
    assert url in r.json()["detail"]
    other = tmp_path / "other_key"
    keygen(other)
    made = add_ssh(api, prefix, other.read_text(), sshd.known_hosts)
    assert made["kind"] == "ssh" and "PRIVATE" not in str(made)
    r = api.post("environments", json={"label": "w", "repos": [url]})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == f"repository not reachable: authentication failed for {url}"
    api.delete(f"git_credentials/{made['id']}")
    wrong_host = f"[127.0.0.1]:{sshd.port} " + " ".join(
        Path(f"{other}.pub").read_text().split()[:2]
    )
    made = add_ssh(api, prefix, key, wrong_host)
    r = api.post("environments", json={"label": "w", "repos": [url]})
    assert r.status_code == 400, r.text
    assert "host key verification failed" in r.json()["detail"] and url in r.json()["detail"]
    api.delete(f"git_credentials/{made['id']}")
    add_ssh(api, prefix, key, sshd.known_hosts)
    env = api.create_env(url)
    api.create_task(env["id"], "hi", new_task={"branch": "main"})
    assert scan(key.split("\n")[1], server.app_state.settings.resolved_data_dir) == []


def test_ssh_clone_fetch_and_push_with_a_deploy_key(
    tmp_path: Path, ssh_remote: tuple[SshGit, Path, str, str]
) -> None:
    sshd, remote, url, key = ssh_remote
    auth = GitAuth(
        url_prefix=url, kind="ssh", username=None, secret=key, known_hosts=sshd.known_hosts
    )
    (tmp_path / "mirrors").mkdir()
    mirrors = Mirrors(tmp_path / "mirrors")
    with pytest.raises(RemoteRefused):
        mirrors.ensure("k", url)  # no key: refused
    mirror = mirrors.ensure("k", url, auth=auth)
    head = git("rev-parse", "refs/heads/main", cwd=mirror).strip()
    from openwham.sandbox.workspace import git as host_git

    host_git("push", "-q", url, f"{head}:refs/heads/wham/pr", cwd=mirror, auth=auth, remote=url)
    assert git("rev-parse", "wham/pr", cwd=remote).strip() == head
    assert scan(key.split("\n")[1], tmp_path / "mirrors") == []
    out = subprocess.run(["ls", "/proc/self/fd"], capture_output=True, text=True).stdout
    assert out  # the test process keeps no key descriptor open afterwards:
    assert not [p for p in Path("/proc/self/fd").iterdir() if "wham-git" in str(p.resolve())]


# --------------------------------------------------------------------------- CLI and web UI


def test_cli_adds_lists_and_removes_with_the_secret_from_stdin(
    live_server: Any, tmp_path: Path
) -> None:
    env = cli_user(tmp_path / "home", live_server.url, live_server.token())
    r = run_cli(env, "git-credential", "add", "https://git.example.com", "--username", USER)
    assert r.returncode == 2 and "--secret-stdin" in r.stderr
    r = run_cli(
        env,
        "git-credential",
        "add",
        "https://git.example.com",
        "--username",
        USER,
        "--secret-stdin",
        "--json",
        stdin=f"{TOKEN}\n",
    )
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["url_prefix"] == "https://git.example.com/" and made["kind"] == "https"
    key = tmp_path / "deploy"
    keygen(key)
    r = run_cli(
        env,
        "git-credential",
        "add",
        "ssh://git@git.example.com/",
        "--ssh-key",
        str(key),
        "--known-hosts",
        "git.example.com " + Path(f"{key}.pub").read_text().split(" ")[0] + " AAAAC3Nza",
    )
    assert r.returncode == 0, r.stderr
    listed = run_cli(env, "git-credential", "list")
    assert listed.returncode == 0 and made["id"] in listed.stdout
    assert f"https as {USER}  for https://git.example.com/" in listed.stdout
    assert "ssh  for ssh://git@git.example.com/" in listed.stdout
    assert TOKEN not in listed.stdout + r.stdout and "PRIVATE" not in listed.stdout
    assert run_cli(env, "git-credential", "remove", made["id"]).returncode == 0
    left = json.loads(run_cli(env, "git-credential", "list", "--json").stdout)
    assert [c["kind"] for c in left] == ["ssh"]


def test_web_page_adds_lists_and_removes(server: Server) -> None:
    client = server.api.client
    csrf = sign_in(client, server.api.token or "")
    page = client.get("/settings/git-credentials")
    assert page.status_code == 200 and "No git credentials" in page.text
    assert 'href="/settings/git-credentials"' in client.get("/settings/forges").text
    # a username without a secret: 400 with the reason, the prefix kept, nothing echoed
    bad = client.post(
        "/settings/git-credentials",
        data={"csrf": csrf, "url_prefix": "https://git.example/", "username": USER},
    )
    assert bad.status_code == 400 and "both" in bad.text and "https://git.example/" in bad.text
    bad = client.post(
        "/settings/git-credentials",
        data={"csrf": csrf, "url_prefix": "ftp://git.example/", "username": USER, "secret": TOKEN},
    )
    assert bad.status_code == 400 and TOKEN not in bad.text
    forged = client.post(
        "/settings/git-credentials",
        data={"csrf": "nope", "url_prefix": "https://h/", "username": USER, "secret": TOKEN},
    )
    assert forged.status_code == 403
    assert server.api.get("git_credentials").json()["items"] == []
    made = client.post(
        "/settings/git-credentials",
        data={"csrf": csrf, "url_prefix": "https://git.example", "username": USER, "secret": TOKEN},
        follow_redirects=False,
    )
    assert made.status_code == 303, made.text
    (cred,) = server.api.get("git_credentials").json()["items"]
    listed = client.get("/settings/git-credentials").text
    assert cred["id"] in listed and "https://git.example/" in listed and TOKEN not in listed
    gone = client.post(
        f"/settings/git-credentials/{cred['id']}/remove",
        data={"csrf": csrf},
        follow_redirects=False,
    )
    assert gone.status_code == 303
    assert server.api.get("git_credentials").json()["items"] == []


def test_another_account_without_the_credential_sees_no_branch_of_the_mirror(
    server: Server, http_remote: tuple[SmartHttpGit, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mirrors are per URL, shared by accounts: one fetched with a credential answers
    branch lookups only to callers with one (the others ask the remote, which refuses)."""
    api = server.api
    httpd, _, url = http_remote
    add_https(api, f"{httpd.url}/")
    env = api.create_env(url)
    settings = server.app_state.settings
    from openwham.commands import branches as branch_commands

    with server.app_state.db.session() as s:
        owner = s.scalar(gitcreds.select(gitcreds.m.GitCredential.account_id))
        assert owner is not None
        auth = gitcreds.auth_for(s, owner, url, server.app_state.secret_box)
    Mirrors(settings.resolved_data_dir / "mirrors").ensure(env["repos"][0], url, auth=auth)
    other = api.as_(server.other_account_token())
    theirs = other.post("environments", json={"label": "t", "repos": [url]})
    assert theirs.status_code == 400, theirs.text  # no credential: refused at save
    # saved while the remote did not answer (a save does not wait for it): refused at start
    from openwham.engine import branches

    with monkeypatch.context() as offline:
        offline.setattr(branches, "check_not_refused", lambda url: None)
        theirs = other.post("environments", json={"label": "t", "repos": [url]})
    assert theirs.status_code == 201, theirs.text
    r = other.post("tasks", json=_task_body(theirs.json()["id"], "main"))
    assert r.status_code == 400, r.text
    assert "authentication failed" in r.json()["detail"] and url in r.json()["detail"]
    with server.app_state.db.session() as s:
        assert branch_commands.lookup(settings, s, owner)(env["repos"][0], url, "main")
    assert branches.search_branches(settings, env["repos"][0], url) == []
    assert branches.search_branches(settings, env["repos"][0], url, auth) == ["main"]


@pytest.mark.sandbox
def test_private_ssh_repository_end_to_end(
    engine_server: Server,
    scripted_model: ScriptedModel,
    ssh_remote: tuple[SshGit, Path, str, str],
) -> None:
    api = engine_server.api
    sshd, remote, url, key = ssh_remote
    add_ssh(api, f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/", key, sshd.known_hosts)
    env = api.create_env(url)
    task_id, turn_id, _ = completed_task(
        api, scripted_model, env["id"], "Fix add", [Patch(FIX), Say("Fixed.")]
    )
    r = api.post(f"tasks/{task_id}/turns/{turn_id}/pr")
    assert r.status_code == 200, r.text
    branch = r.json()["pull_request"]["head"]
    assert "return a + b" in git("show", f"{branch}:calc.py", cwd=remote)
    body = key.split("\n")[1]  # a line of the key's base64
    assert scan(body, engine_server.app_state.settings.resolved_data_dir) == []
    assert body not in api.get(f"tasks/{task_id}").text


def test_a_redirect_never_takes_the_credential_to_another_host(
    tmp_path: Path, http_remote: tuple[SmartHttpGit, Path, str]
) -> None:
    """A remote that redirects to another host (here: the real repository on another port)
    gets no credential sent there: git follows no redirect with one."""
    httpd, _, url = http_remote
    target = url

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", target + self.path.split("widgets.git", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()

    front = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        moved = f"http://127.0.0.1:{front.server_address[1]}/acme/widgets.git"
        auth = GitAuth(url_prefix=moved, kind="https", username=USER, secret=TOKEN)
        (tmp_path / "mirrors").mkdir()
        with pytest.raises(WorkspaceError):
            Mirrors(tmp_path / "mirrors").ensure("k", moved, auth=auth)
        assert httpd.seen_auth == []  # the other host never saw a request, let alone the token
    finally:
        front.shutdown()
        front.server_close()
