"""Every node of one database needs the same server keys: the database keeps a fingerprint
of the first node's keys, and ``wham serve`` with other keys refuses to start, saying what to
copy where, instead of failing tokens and secrets later."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WHAM, start_live_server, stop
from openwham.service.keys import fingerprint


def _serve(data: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WHAM), "serve", "--port", "0", "--data-dir", str(data)],
        env={**os.environ, "WHAM_DATABASE_URL": url, "WHAM_EXECUTOR": "none"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_a_node_with_other_keys_is_refused_and_one_with_the_same_keys_starts(
    tmp_path: Path, postgres_url: str
) -> None:
    env = {"WHAM_DATABASE_URL": postgres_url, "WHAM_EXECUTOR": "none"}
    first = start_live_server(tmp_path / "node-a", env)
    try:
        other = _serve(tmp_path / "node-b", postgres_url)  # keys of its own, made at start
        assert other.returncode != 0
        assert "openwham http" not in other.stdout  # it never served
        message = " ".join(other.stderr.split())
        assert "error: the server keys in " in message
        assert f"{tmp_path / 'node-b' / 'keys'}" in message
        assert "copy the keys/ directory of a node already serving this database into " in message
        assert "Traceback" not in other.stderr
        # nor does it mint tokens the serving node would refuse
        token = subprocess.run(
            [str(WHAM), "token", "create", "--data-dir", str(tmp_path / "node-b")],
            env={**os.environ, "WHAM_DATABASE_URL": postgres_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert token.returncode == 1 and token.stdout == ""
        assert "copy the keys/ directory" in token.stderr and "Traceback" not in token.stderr

        # with the first node's keys, it joins
        joined = tmp_path / "node-c"
        joined.mkdir(mode=0o700)
        shutil.copytree(tmp_path / "node-a" / "keys", joined / "keys")
        second = start_live_server(joined, env)
        try:
            assert second.process.poll() is None
        finally:
            stop(second)
    finally:
        stop(first)
    # the refused node's keys were not taken instead: the first node's still start
    again = start_live_server(tmp_path / "node-a", env)
    try:
        assert again.process.poll() is None
    finally:
        stop(again)


def test_the_fingerprint_tells_nothing_of_the_keys_and_differs_for_either_key() -> None:
    signing, sealing = b"a" * 64, b"b" * 44
    fp = fingerprint(signing, sealing)
    assert len(fp) == 64 and signing.decode() not in fp and sealing.decode() not in fp
    assert fp == fingerprint(signing, sealing)
    assert fp != fingerprint(b"c" * 64, sealing) and fp != fingerprint(signing, b"d" * 44)
