"""Fuzz: schemathesis against the app's own ``/openapi.json``, every operation, in-process.

Every operation of both path styles gets generated requests (valid ones, and ones that break
the schema) from an account that owns real data: an environment, a finished task, a task with
two attempts (one still queued), a token; a second account has its own. Ids in the path, the
query and the body are mostly drawn from that data, so handlers get past their 404s (and the
second account's ids must stay 404); the token is at times missing or made up. A case fails on
a 5xx, on a status the schema does not declare for the operation, on a content type or body that
does not match it, and on a request that does not answer in 30 s. Attempts never run
(``executor=none``): no sandbox starts. Runs on SQLite and PostgreSQL.

The run is seeded and bounded: about ``WHAM_FUZZ_CASES`` requests in all (default 400, split
evenly over the databases and operations, at least 3 per operation on each: ~540), seed
``WHAM_FUZZ_SEED`` (default 16). The release run (README, "Running the tests") is

    WHAM_FUZZ_CASES=12000 ./scripts/test tests/test_api_fuzz.py -s
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Server, finish_turn, make_repo, make_server, postgres_database
from openwham.service.accounts import ensure_owner

CASES = int(os.environ.get("WHAM_FUZZ_CASES", "400"))
SEED = int(os.environ.get("WHAM_FUZZ_SEED", "16"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# A request that takes longer than this hangs (the fuzz fails on it); a stream of a queued
# attempt never ends by itself, so streams are read for a short while and cut.
REQUEST_SECONDS = 30.0
STREAM_SECONDS = 5.0
# Mostly the account's token; at times none, or a made-up one (bearer or not).
BAD_TOKENS = st.one_of(
    st.just(""),
    st.from_regex(r"Bearer [A-Za-z0-9._~+/=-]{0,400}", fullmatch=True),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")),
)


@dataclass
class Ids:
    """Real values for path parameters, by parameter name."""

    by_name: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, *values: str) -> None:
        self.by_name.setdefault(name, []).extend(values)


def seed_data(server: Server, tmp: Path) -> Ids:
    """An owner's environment and tasks (one finished, one with a queued second attempt) and
    a second account's task: ids the fuzzer can hit."""
    api = server.api
    repo = make_repo(tmp / "widgets")
    server.app_state.settings.local_repo_roots = str(repo.parent)
    env = api.create_env(repo, label="acme/widgets")
    other = api.as_(server.other_account_token())
    theirs_env = other.create_env(repo, label="theirs")["id"]
    theirs = other.create_task(theirs_env)
    done = api.create_task(env["id"], "Fix the failing test")
    pair = api.create_task(env["id"], "second task", metadata={"best_of_n": 2})
    for turn in (done["turn"]["id"], pair["turn"]["id"], theirs["turn"]["id"]):
        finish_turn(server, turn)
    ids = Ids()
    ids.add("env_id", env["id"], theirs_env)
    ids.add("task_id", done["task"]["id"], pair["task"]["id"], theirs["task"]["id"])
    ids.add(
        "turn_id",
        done["turn"]["id"],
        pair["turn"]["id"],
        *pair["turn"]["sibling_turn_ids"],
        done["user_turn"]["id"],
        theirs["turn"]["id"],
    )
    server.owner_token()  # one to revoke
    tokens = api.get("tokens").json()["items"]
    # not the fuzzer's own token: revoking it would end the run
    ids.add("token_id", *[t["id"] for t in tokens if not t.get("current")])
    ids.add("provider", "local", "github")
    ids.add("owner", "acme")
    ids.add("repo", "widgets")
    with server.app_state.db.session() as s:
        ids.add(ACCOUNT_HEADER, ensure_owner(s)[0].id)
    return ids


@pytest.fixture(params=["sqlite", "postgres"])
def fuzz_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "sqlite":
        yield from make_server(tmp_path, f"sqlite:///{tmp_path / 'data' / 'openwham.db'}")
    else:
        with postgres_database() as url:
            yield from make_server(tmp_path, url)


ACCOUNT_HEADER = "ChatGPT-Account-Id"
# Parameter and body field names that take the same kind of id.
SAME_AS = {"environment_id": "env_id"}


def _with_real_ids(ids: Ids) -> Callable[[Any, Any], None]:
    """Replace, at random, ids in the path, the query, headers and body fields with real ones."""

    def pick(data: Any, name: str, value: Any) -> Any:
        pool = ids.by_name.get(SAME_AS.get(name, name))
        if pool and data.draw(st.integers(0, 3), label=f"real {name}?") < 3:
            return data.draw(st.sampled_from(pool), label=name)
        return value

    def walk(data: Any, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, (dict, list)):
                    walk(data, item)
                else:
                    value[key] = pick(data, key, item)
        elif isinstance(value, list):
            for item in value:
                walk(data, item)

    def swap(case: Any, data: Any) -> None:
        for part in (case.path_parameters, case.query):
            for name in list(part or {}):
                part[name] = pick(data, name, part[name])
        headers = case.headers if case.headers is not None else {}
        if ACCOUNT_HEADER in headers:
            how = data.draw(st.sampled_from(["real", "real", "none", "generated"]), label="account")
            if how == "real":
                headers[ACCOUNT_HEADER] = ids.by_name[ACCOUNT_HEADER][0]
            elif how == "none":
                del headers[ACCOUNT_HEADER]
        walk(data, case.body)

    return swap


def fuzz_operation(
    operations: dict[GenerationMode, Any],
    token: str,
    swap: Callable[[Any, Any], None],
    examples: int,
    statuses: Counter[int],
) -> list[str]:
    """Run ``examples`` cases (two thirds valid, a third not); the failures found."""
    failures = []
    for mode, count in (
        (GenerationMode.POSITIVE, examples - examples // 3),
        (GenerationMode.NEGATIVE, examples // 3),
    ):
        operation = operations[mode]
        failure = _fuzz(operation, mode, count, token, swap, statuses)
        if failure:
            failures.append(f"{operation.label} ({mode.value}):\n{failure}")
    return failures


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    count: int,
    token: str,
    swap: Callable[[Any, Any], None],
    statuses: Counter[int],
) -> str | None:
    """``count`` seeded cases of one generation mode; the first failure (shrunk), if any."""
    timeout = STREAM_SECONDS if operation.path.endswith("/stream") else REQUEST_SECONDS
    valid = f"Bearer {token}"

    @seed(SEED)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        auth = valid
        if mode is GenerationMode.POSITIVE:  # a negative case stays invalid
            swap(case, data)
            if data.draw(st.integers(0, 7), label="bad token?") == 7:
                auth = data.draw(BAD_TOKENS, label="token")
        headers = {"Authorization": auth} if auth else {}
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=timeout)
        statuses[response.status_code] += 1

    try:
        run()
    except Unsatisfiable:
        return None  # nothing in this operation to make invalid
    except (Exception, BaseExceptionGroup) as exc:  # each operation's failure is reported
        return _describe(exc)
    return None


def _describe(exc: BaseException, depth: int = 0) -> str:
    """An error and, for a group (schemathesis, Hypothesis' flaky reports), each one inside."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup) and depth < 4:
        text += "".join("\n  " + _describe(sub, depth + 1) for sub in exc.exceptions)
    return text


@pytest.mark.timeout(max(300, CASES // 10))
def test_fuzz_api_against_its_schema(fuzz_server: Server, tmp_path: Path) -> None:
    server = fuzz_server
    ids = seed_data(server, tmp_path)
    app = server.api.client.app
    by_mode = {}
    for mode in GenerationMode:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        if mode is GenerationMode.POSITIVE:
            # valid cases carry the test's token (``_fuzz``), not one made from the security
            # scheme; invalid ones may also leave it out (without it, an operation that has
            # nothing else to break would have no invalid case to make)
            schema.config.generation.update(with_security_parameters=False)
        by_mode[mode] = [result.ok() for result in schema.get_all_operations()]
    operations = [
        dict(zip(GenerationMode, ops, strict=True)) for ops in zip(*by_mode.values(), strict=True)
    ]
    assert all(len({op.label for op in pair.values()}) == 1 for pair in operations)
    # deleting comes last, so the other operations still find the data
    operations.sort(key=lambda pair: pair[GenerationMode.POSITIVE].method.upper() == "DELETE")
    assert len(operations) > 40
    per_operation = max(3, round(CASES / 2 / len(operations)))  # half on each database
    started = time.monotonic()
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    try:
        for pair in operations:
            token = server.owner_token()
            swap = _with_real_ids(ids)
            failures += fuzz_operation(pair, token, swap, per_operation, statuses)
    finally:
        asgi.shutdown_lifespans()  # schemathesis started the app's lifespan: stop it now
    print(
        f"fuzz: {sum(statuses.values())} requests to {len(operations)} operations in"
        f" {time.monotonic() - started:.1f} s (seed {SEED}), by status:",
        dict(sorted(statuses.items())),
    )
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)
