"""What a later attempt needs from an earlier one, readable on every node (issue 17):
the ``ArtifactStore`` on the database (store/artifacts.py), the archive of a Codex home
(engine/artifacts.py) and how attempts' storage uses them (engine/storage.py). The last test
runs a task on one node and its follow-up and fork on another (real sandbox and Codex)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from conftest import (
    Server,
    completed_task,
    engine_settings,
    finish_turn,
    make_server,
    wait_for_task,
)
from openwham.engine import artifacts as packing
from openwham.engine import storage
from openwham.service.artifacts import open_store
from openwham.store import models as m
from openwham.store.artifacts import (
    ArtifactError,
    ArtifactStore,
    ArtifactTooLarge,
    DatabaseArtifactStore,
)
from openwham.store.s3 import S3ArtifactStore
from support.s3server import S3Server, s3_server
from support.scripted_model import Patch, Say, ScriptedModel, Shell

MB = 1 << 20


def _turns(server: Server, repo: Path, n: int, status: str = "completed") -> list[str]:
    env = server.api.create_env(repo)
    turns = [server.api.create_task(env["id"], f"task {i}")["turn"]["id"] for i in range(n)]
    for turn in turns:
        finish_turn(server, turn, status)
    return turns


def _home(path: Path) -> Path:
    """A compacted Codex home as an attempt leaves it."""
    (path / "sessions" / "2026" / "12").mkdir(parents=True)
    (path / "sessions" / "2026" / "12" / "rollout-1.jsonl").write_text('{"a": 1}\n' * 500)
    (path / "config.toml").write_text("model = 'x'\n")
    (path / "empty").mkdir()
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# --------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) for this module's tests."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres", "s3"])
def store_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A server whose artifact store is the database (SQLite, PostgreSQL) or an S3 bucket."""
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        url = str(request.getfixturevalue("sqlite_url"))
        yield from make_server(tmp_path, url, **s3.settings())
    else:
        yield from make_server(tmp_path, str(request.getfixturevalue(f"{request.param}_url")))


def _store(server: Server, max_mb: int) -> ArtifactStore:
    """A store like the server's with another cap (another node's setting)."""
    settings = server.app_state.settings.model_copy(update={"artifact_max_mb": max_mb})
    return open_store(settings, server.app_state.db)


def _stored_bytes(store: ArtifactStore, turn: str, name: str) -> bytes:
    """What the store holds for the artifact (compressed)."""
    if isinstance(store, S3ArtifactStore):
        response = store.client.get_object(store.bucket, f"{store.prefix}{turn}/{name}")
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()
    assert isinstance(store, DatabaseArtifactStore)
    with store.db.session() as s:
        row = s.get(m.Artifact, (turn, name))
        assert row is not None
        return row.data


def _tamper(store: ArtifactStore, turn: str, name: str, packed: bytes) -> None:
    """Replace the stored blob as someone with access to the store could."""
    if isinstance(store, S3ArtifactStore):
        store.client.put_object(
            store.bucket,
            f"{store.prefix}{turn}/{name}",
            io.BytesIO(packed),
            len(packed),
            metadata={"codec": "zlib"},
        )
        return
    assert isinstance(store, DatabaseArtifactStore)
    with store.db.session() as s:
        row = s.get(m.Artifact, (turn, name))
        assert row is not None
        row.data = packed


def test_the_store_round_trips_compresses_caps_and_deletes(
    store_server: Server, repo: Path
) -> None:
    first, second = _turns(store_server, repo, 2)
    store = _store(store_server, 1)
    data = b'{"type": "message", "text": "remember pelican"}\n' * 2000
    store.put(first, "codex-home", data)
    store.put(first, "other", b"x")
    store.put(second, "codex-home", b"second")
    assert store.get(first, "codex-home") == data
    assert store.get(first, "missing") is None and store.get("turn_nothere", "x") is None
    assert store.present([first, second, "turn_nothere"], "codex-home") == {first, second}
    packed = _stored_bytes(store, first, "codex-home")
    assert len(packed) < len(data) // 10 and zlib.decompress(packed) == data
    store.put(first, "codex-home", b"replaced")
    assert store.get(first, "codex-home") == b"replaced"

    with pytest.raises(ArtifactTooLarge, match="WHAM_ARTIFACT_MAX_MB"):
        store.put(first, "big", os.urandom(MB + 1))
    assert store.get(first, "big") is None

    store.delete([first])
    assert store.present([first, second], "codex-home") == {second}
    assert store.get(first, "other") is None
    # a task's artifacts go with it (the delete command; in the database also its turns'
    # foreign key)
    task_id = store_server.api.get("tasks/list").json()["items"][0]["id"]
    assert store_server.api.delete(f"tasks/{task_id}").status_code == 200
    assert store.present([first, second], "codex-home") == set()


def test_the_orphan_sweep_deletes_what_a_crash_left_of_deleted_tasks(
    store_server: Server, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task deleted while the store was unreachable (or the node died between the rows'
    delete and the store's): the delete still answers 200 and the artifacts stay behind;
    the orphan sweep (every node's start, then every few hours) deletes them and only them.
    On the database store the rows go with their turn at once; on a bucket they would stay
    for good without the sweep."""
    kept, orphan = _turns(store_server, repo, 2)
    store = store_server.app_state.artifacts
    for turn in (kept, orphan):
        store.put(turn, packing.CODEX_HOME, b"session of " + turn.encode())
    assert {kept, orphan} <= set(store.turns())
    task_of = {
        store_server.api.get(f"tasks/{item['id']}").json()["current_assistant_turn"]["id"]: item[
            "id"
        ]
        for item in store_server.api.get("tasks/list").json()["items"]
    }

    def unreachable(turn_ids: object) -> None:
        raise ArtifactError("Could not delete artifacts: connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(store, "delete", unreachable)
        r = store_server.api.delete(f"tasks/{task_of[orphan]}")
    assert r.status_code == 200, r.text
    left = set(store.turns())
    if isinstance(store, S3ArtifactStore):
        assert orphan in left  # what the sweep is for
        # an object beside the prefix is not the sweep's
        store.client.put_object(store.bucket, "elsewhere/x", io.BytesIO(b"x"), 1)
    assert storage.sweep_orphans(store_server.app_state.db, store) == (1 if orphan in left else 0)
    assert set(store.turns()) == {kept}, (kept, orphan, left)
    assert store.get(kept, packing.CODEX_HOME) == b"session of " + kept.encode()
    assert store.get(orphan, packing.CODEX_HOME) is None
    assert storage.sweep_orphans(store_server.app_state.db, store) == 0
    if isinstance(store, S3ArtifactStore):
        assert store.client.stat_object(store.bucket, "elsewhere/x").size == 1


def test_a_stored_blob_that_would_inflate_past_the_cap_is_refused_not_inflated(
    store_server: Server, repo: Path
) -> None:
    """A zlib bomb in the store (32 MB of zeros in ~32 KB) read by a node whose cap is 1 MB:
    it stops inflating at the cap and says so, naming the setting; a damaged blob is an
    error too, not a crash."""
    (turn,) = _turns(store_server, repo, 1)
    big = _store(store_server, 64)
    big.put(turn, "codex-home", bytes(32 * MB))
    with pytest.raises(ArtifactTooLarge, match="WHAM_ARTIFACT_MAX_MB"):
        _store(store_server, 1).get(turn, "codex-home")
    packed = _stored_bytes(big, turn, "codex-home")
    _tamper(big, turn, "codex-home", packed[: len(packed) // 2])
    with pytest.raises(ArtifactError, match=r"damaged|cut short"):
        big.get(turn, "codex-home")


def test_a_node_whose_bucket_is_missing_or_keys_wrong_refuses_to_start(
    s3: S3Server, tmp_path: Path, sqlite_url: str
) -> None:
    """``WHAM_ARTIFACT_STORE=s3`` is checked at start (``wham serve`` exits 1 with the
    message), not at the first follow-up on another node."""
    from openwham.config import Settings
    from openwham.server.state import AppState

    for extra, message in (
        ({"artifact_s3_bucket": None}, "needs WHAM_ARTIFACT_S3_BUCKET"),
        ({"artifact_s3_bucket": "nothere"}, "'nothere' does not exist"),
        ({"artifact_s3_secret_access_key": "wrong"}, "openwham-test"),
    ):
        options = s3.settings(**extra)
        settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, **options)
        with pytest.raises(ArtifactError, match=message):
            AppState.open(settings)


# --------------------------------------------------------------------------- the archive


def test_a_codex_home_packs_and_unpacks_without_what_the_agent_linked(tmp_path: Path) -> None:
    home = _home(tmp_path / "home")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    (home / "sessions" / "link").symlink_to(outside / "secret")
    (home / "linked-dir").symlink_to(outside)
    os.mkfifo(home / "fifo")  # would block a reader
    os.link(home / "config.toml", home / "hard")  # a hard link is packed as a plain file
    data = packing.pack(home, MB)
    dest = tmp_path / "dest"
    packing.unpack(data, dest, MB)
    assert _files(dest) == {
        "config.toml": b"model = 'x'\n",
        "hard": b"model = 'x'\n",
        "sessions/2026/12/rollout-1.jsonl": b'{"a": 1}\n' * 500,
    }
    assert (dest / "empty").is_dir()
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not (dest / "fifo").exists() and not (dest / "linked-dir").exists()
    assert (dest / "config.toml").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ArtifactTooLarge, match=r"Codex session is .* MB.*WHAM_ARTIFACT_MAX_MB"):
        packing.pack(home, 4000)


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def _attacks(outside: Path) -> dict[str, bytes]:
    """Archives a tampered store could hand a follow-up, each trying to write ``outside``."""
    evil = b"pwned\n"
    rel = os.path.relpath(outside, "/")
    return {
        "absolute": _tar((_member(str(outside / "f")), evil)),
        "dot-dot": _tar((_member("../" * 12 + rel + "/f"), evil)),
        "dot-dot-inside": _tar(
            (_member("sessions", tarfile.DIRTYPE), None),
            (_member("sessions/../../f"), evil),
        ),
        "symlink-then-file": _tar(
            (_member("sessions", tarfile.SYMTYPE, str(outside)), None),
            (_member("sessions/f"), evil),
        ),
        "relative-symlink": _tar((_member("up", tarfile.SYMTYPE, "../../.."), None)),
        "hardlink": _tar((_member("passwd", tarfile.LNKTYPE, "/etc/passwd"), None)),
        "fifo": _tar((_member("pipe", tarfile.FIFOTYPE), None)),
        "device": _tar((_member("null", tarfile.CHRTYPE), None)),
        "twice": _tar((_member("config.toml"), b"a"), (_member("config.toml"), b"b")),
        "file-then-dir": _tar(
            (_member("sessions"), b"a"), (_member("sessions/f", tarfile.REGTYPE), b"b")
        ),
        "too-big": _tar(*((_member(f"f{i}"), bytes(300_000)) for i in range(5))),
        "sparse": _tar((_sparse("session.jsonl", 50 * MB), b"x" * 512)),  # 10 KB → 50 MB
        "not-a-tar": b"\x00garbage" * 100,
    }


def _sparse(name: str, size: int) -> tarfile.TarInfo:
    """A member whose 512 stored bytes extract to ``size`` (PAX sparse 0.1: holes are zeros)."""
    info = _member(name)
    info.pax_headers = {
        "GNU.sparse.map": "0,512",
        "GNU.sparse.size": str(size),
        "GNU.sparse.realsize": str(size),
    }
    return info


@pytest.mark.parametrize("attack", sorted(_attacks(Path("/x"))))
def test_a_crafted_archive_cannot_write_outside_the_new_codex_home(
    tmp_path: Path, attack: str
) -> None:
    """docs/security.md, "Stored sessions": absolute names, ``..``, links (symbolic and hard)
    and special files are refused, a name cannot be given twice, and the bytes written are
    counted against the cap while they are written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data = _attacks(outside)[attack]
    dest = tmp_path / "attempt" / "codex-home"
    dest.parent.mkdir()
    with pytest.raises(ArtifactError):
        packing.unpack(data, dest, MB)
    assert list(outside.iterdir()) == []
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert not (dest / "passwd").exists()


def test_an_attack_archive_in_the_store_fails_the_restore_and_leaves_nothing(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    """The same through the follow-up's path: the store hands out the crafted archive, the
    restore fails with a message and removes what it had written."""
    (turn,) = _turns(server, repo, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    store = DatabaseArtifactStore(server.app_state.db, MB)
    root = tmp_path / "attempts"
    root.mkdir()
    for name, data in _attacks(outside).items():
        if len(data) > store.max_bytes:
            continue  # refused by the store already
        store.put(turn, packing.CODEX_HOME, data)
        dest = root / "turn_new" / "codex-home"
        dest.parent.mkdir(exist_ok=True)
        with pytest.raises(ArtifactError, match="stored Codex session"):
            storage.restore_codex_home(root, store, turn, dest, wait=0, stored_wait=0)
        assert not dest.exists(), name
        assert list(outside.iterdir()) == [], name


# --------------------------------------------------------------------------- storage


def test_a_follow_up_without_the_files_here_resumes_from_the_store_or_says_why(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    done, big, lost = _turns(server, repo, 3)
    store = DatabaseArtifactStore(server.app_state.db, MB)
    root = tmp_path / "node-a"
    home = _home(root / done / storage.CODEX_HOME)
    storage.store_session(store, root / done, done)
    (root / big / storage.CODEX_HOME / "sessions").mkdir(parents=True)
    (root / big / storage.CODEX_HOME / "sessions" / "big").write_bytes(os.urandom(MB + 10))
    storage.store_session(store, root / big, big)  # too big: why is stored instead
    assert store.present([done, big], packing.CODEX_HOME) == {done}

    other = tmp_path / "node-b"  # no files of those attempts
    for new in ("new", "n2", "n3"):
        (other / new).mkdir(parents=True)
    storage.restore_codex_home(other, store, done, other / "new" / "codex-home", wait=5)
    assert _files(other / "new" / "codex-home") == _files(home)
    with pytest.raises(ArtifactError, match=r"not stored .*MB.*WHAM_ARTIFACT_MAX_MB"):
        storage.restore_codex_home(other, store, big, other / "n2" / "codex-home", wait=5)
    started = time.monotonic()
    with pytest.raises(ArtifactError, match="neither stored nor on this node"):
        storage.restore_codex_home(
            other, store, lost, other / "n3" / "codex-home", wait=5, stored_wait=0.5
        )
    assert 0.4 < time.monotonic() - started < 5
    # the node that ran the big one kept its files: it resumes there
    storage.restore_codex_home(root, store, big, tmp_path / "n4", wait=5)
    assert (tmp_path / "n4" / "sessions" / "big").stat().st_size == MB + 10
    # a stored session is used even where the files are still there (the store is the truth)
    (root / done / storage.CODEX_HOME / "config.toml").write_text("changed here")
    storage.restore_codex_home(root, store, done, tmp_path / "n5", wait=5)
    assert _files(tmp_path / "n5") == _files(other / "new" / "codex-home")


def test_the_end_of_an_attempt_and_the_sweep_store_sessions_and_drop_removed_ones(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    """``tidy`` stores a completed attempt's session and removes its directory; the
    start-up sweep does so for those whose server died first (or ran a version without the
    store), removes the directories of attempts whose session is stored already, keeps a
    session too big for the store (marked, so the next sweep asks nothing), and deletes
    removed attempts' artifacts."""
    done, swept, already, big, failed = _turns(server, repo, 5)
    finish_turn(server, failed, "failed")
    db = server.app_state.db
    store = DatabaseArtifactStore(db, MB)
    root = server.app_state.settings.resolved_data_dir / "attempts"
    for turn in (done, swept, already, big, failed):
        _home(root / turn / storage.CODEX_HOME)
        (root / turn / "workspace").mkdir()
    (root / big / storage.CODEX_HOME / "big.bin").write_bytes(os.urandom(MB + 10))
    store.put(already, packing.CODEX_HOME, packing.pack(root / already / "codex-home", MB))
    store.put(failed, packing.CODEX_HOME, b"left by an earlier run")
    storage.tidy(root, db, done, store)
    assert not (root / done).exists()
    assert store.present([done, swept], packing.CODEX_HOME) == {done}

    storage.sweep(root, db, store)
    assert store.present([done, swept, already, big, failed], packing.CODEX_HOME) == {
        done,
        swept,
        already,
    }
    assert store.present([big], packing.CODEX_HOME_MISSING) == {big}
    assert sorted(p.name for p in root.iterdir()) == [big]
    assert sorted(p.name for p in (root / big).iterdir()) == ["closed", "codex-home"]
    # the next start asks the store nothing: the big one's marker says why it stays
    asked: list[str] = []
    real_present = store.present
    store.present = lambda ids, name: asked.extend(ids) or real_present(ids, name)  # type: ignore[method-assign]
    storage.sweep(root, db, store)
    assert asked == []
    dest = tmp_path / "restored"
    storage.restore_codex_home(root, store, swept, dest, wait=0)
    assert _files(dest) == _files(_home(tmp_path / "expected"))


def test_a_fork_on_a_node_without_the_files_copies_the_stored_session(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    (turn,) = _turns(server, repo, 1)
    store = server.app_state.artifacts
    attempts = tmp_path / "elsewhere"
    _home(attempts / turn / storage.CODEX_HOME)
    storage.store_session(store, attempts / turn, turn)
    task_id = server.api.get("tasks/list").json()["items"][0]["id"]
    r = server.api.post(f"tasks/{task_id}/fork", json={"turn_id": turn})  # files not here
    assert r.status_code == 200, r.text
    copy = r.json()["current_assistant_turn"]["id"]
    assert store.get(copy, packing.CODEX_HOME) == store.get(turn, packing.CODEX_HOME)
    assert server.api.delete(f"tasks/{r.json()['task']['id']}").status_code == 200
    assert store.present([turn, copy], packing.CODEX_HOME) == {turn}


def test_a_fork_of_an_attempt_that_ended_long_ago_without_a_stored_session_does_not_wait(
    server: Server, repo: Path
) -> None:
    """The fork waits for a session only while its attempt may still be closing down (until
    ``STORED_WAIT_SECONDS`` after it ended): an attempt that ended long ago and stored
    nothing answers at once, the copy saying why there is no session (it waited the whole 30 s,
    longer than a client's read timeout, before)."""
    (turn,) = _turns(server, repo, 1)
    with server.app_state.db.session() as s:
        s.execute(
            update(m.Turn)
            .where(m.Turn.id == turn)
            .values(updated_at=time.time() - 10 * storage.STORED_WAIT_SECONDS)
        )
    store = server.app_state.artifacts
    assert store.present([turn], packing.CODEX_HOME) == set()
    task_id = server.api.get("tasks/list").json()["items"][0]["id"]
    started = time.monotonic()
    r = server.api.post(f"tasks/{task_id}/fork", json={"turn_id": turn})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < storage.STORED_WAIT_SECONDS / 2
    copy = r.json()["current_assistant_turn"]["id"]
    assert store.present([copy], packing.CODEX_HOME_MISSING) == {copy}


# --------------------------------------------------------------------------- two nodes

NOTE = "*** Begin Patch\n*** Add File: NOTES.md\n+remember pelican\n*** End Patch"
BIG = "head -c 2000000 /dev/urandom > /home/openwham/.codex/sessions/big.bin; echo wrote"


def _node(tmp_path: Path, url: str, model: ScriptedModel, **options: Any) -> Iterator[Server]:
    return make_server(tmp_path, url, **engine_settings(model, **options))


@pytest.mark.sandbox
@pytest.mark.parametrize("kind", ["database", "s3"])
def test_a_follow_up_and_a_fork_run_on_a_node_without_the_first_attempts_files(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_url: str,
    scripted_model: ScriptedModel,
    repo: Path,
    kind: str,
) -> None:
    """Issue 17: node A runs a task; A stops and its attempt files are gone; node B (its own
    data directory, A's keys, the same database) runs a follow-up and a fork's follow-up,
    which resume the same Codex session (the model sees the first conversation). A task
    whose session is over ``WHAM_ARTIFACT_MAX_MB`` completes, and its follow-up on B says
    why it cannot resume. Once with the database as the store, once with an S3 bucket."""
    store: dict[str, Any] = {}
    if kind == "s3":
        store = request.getfixturevalue("s3").settings()
    node_a = _node(tmp_path / "a", postgres_url, scripted_model, artifact_max_mb=1, **store)
    a = next(node_a)
    env = a.api.create_env(repo)
    task_id, turn_id, _ = completed_task(
        a.api, scripted_model, env["id"], "Add notes, remember pelican", [Patch(NOTE), Say("Ok.")]
    )
    big_task, big_turn, _ = completed_task(
        a.api, scripted_model, env["id"], "Write a big session", [Shell(BIG), Say("Big.")]
    )
    deadline = time.monotonic() + 30
    while a.app_state.artifacts.present([turn_id], packing.CODEX_HOME) != {turn_id} or (
        not a.app_state.artifacts.present([big_turn], packing.CODEX_HOME_MISSING)
    ):
        assert time.monotonic() < deadline, "the sessions were never stored"
        time.sleep(0.1)
    with a.app_state.db.session() as s:  # where the sessions went
        rows = s.scalar(select(func.count()).select_from(m.Artifact))
    assert rows == (0 if kind == "s3" else 2)
    next(node_a, None)  # node A stops
    shutil.rmtree(tmp_path / "a" / "data" / "attempts")
    (tmp_path / "b" / "data").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "data" / "keys", tmp_path / "b" / "data" / "keys")

    node_b = _node(tmp_path / "b", postgres_url, scripted_model, **store)
    b = next(node_b)
    try:
        for task, turn, prompt in ((task_id, turn_id, "And now?"),):
            scripted_model.requests.clear()
            scripted_model.script = [Say(f"Answered {prompt}")]
            follow = b.api.follow_up(task, turn, prompt)
            current = wait_for_task(b.api, task)["current_assistant_turn"]
            assert current["id"] == follow["turn"]["id"]
            assert current["turn_status"] == "completed", current["error"]
            history = str(scripted_model.requests[0]["input"])
            assert "remember pelican" in history and prompt in history  # resumed

        r = b.api.post(f"tasks/{task_id}/fork", json={"turn_id": turn_id})
        assert r.status_code == 200, r.text
        fork_id, fork_turn = r.json()["task"]["id"], r.json()["current_assistant_turn"]["id"]
        scripted_model.requests.clear()
        scripted_model.script = [Say("Forked answer")]
        b.api.follow_up(fork_id, fork_turn, "Fork?")
        current = wait_for_task(b.api, fork_id)["current_assistant_turn"]
        assert current["turn_status"] == "completed", current["error"]
        history = str(scripted_model.requests[0]["input"])
        assert "remember pelican" in history and "Fork?" in history

        scripted_model.script = [Say("(not reached)")]
        b.api.follow_up(big_task, big_turn, "Go on")
        failed = wait_for_task(b.api, big_task)["current_assistant_turn"]
        assert failed["turn_status"] == "failed"
        assert failed["error"]["code"] == "follow_up_error"
        assert "WHAM_ARTIFACT_MAX_MB" in failed["error"]["message"], failed["error"]
        assert not (tmp_path / "b" / "data" / "attempts" / turn_id).exists()
    finally:
        next(node_b, None)
