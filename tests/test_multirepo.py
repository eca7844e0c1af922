"""Multi-repository environments: every repository of an environment is cloned into the
workspace (``/workspace/<name>``), the diff and the PR branches cover each one that
changed, and what cannot be laid out side by side is refused when the environment is saved.
"""

from __future__ import annotations

from pathlib import Path

from conftest import Api, git


def _repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    for name, text in files.items():
        (path / name).write_text(text)
    git("add", ".", cwd=path)
    git("commit", "-q", "-m", "one", cwd=path)
    return path


# --------------------------------------------------------------------------- saving


def test_two_repositories_that_would_share_a_directory_are_refused(
    api: Api, tmp_path: Path
) -> None:
    a = _repo(tmp_path / "one" / "lib", {"a.txt": "a\n"})
    b = _repo(tmp_path / "two" / "Lib", {"b.txt": "b\n"})
    r = api.post("environments", json={"label": "x", "repos": [str(a), str(b)]})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "would both be cloned into the workspace's directory 'Lib'" in detail
    assert str(a) in detail and str(b) in detail
    # the same on update
    env = api.create_env(a)
    r = api.patch(f"environments/{env['id']}", json={"repos": [str(a), str(b)]})
    assert r.status_code == 400 and "would both be cloned" in r.json()["detail"], r.text
    # another name for one of them is the way out
    r = api.post(
        "environments",
        json={"label": "x", "repos": [str(a), {"url": str(b), "name": "acme/lib2"}]},
    )
    assert r.status_code == 201, r.text


def test_a_repository_name_that_is_no_directory_name_is_refused_beside_others(
    api: Api, tmp_path: Path
) -> None:
    a = _repo(tmp_path / "lib", {"a.txt": "a\n"})
    b = _repo(tmp_path / "odd name", {"b.txt": "b\n"})
    r = api.post("environments", json={"label": "x", "repos": [str(a), str(b)]})
    assert r.status_code == 400, r.text
    assert "named 'odd name', which cannot be its directory" in r.json()["detail"]
    # alone it is its workspace, as always: no directory of its own, nothing to refuse
    assert api.post("environments", json={"label": "x", "repos": [str(b)]}).status_code == 201
