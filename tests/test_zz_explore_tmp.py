from __future__ import annotations
import json, os, time, uuid
from pathlib import Path
from typing import Any
from conftest import engine_settings, make_server, make_repo, wait_for_task, git, diff_of
from support.scripted_model import Say, Shell

M = uuid.uuid4().hex[:8]
BOMB = f"sleep 4 & s=$!; bash -c ': bomb{M}; :(){{ :|:& }};:' 2>/tmp/bomb.err; wait $s; mapfile -t L < /tmp/bomb.err; echo lines=${{#L[@]}}; echo first=${{L[0]}}"
TOK = r'''
for f in /proc/[0-9]*/environ; do tr '\0' '\n' < $f | grep -q OPENWHAM_GATEWAY_TOKEN= && echo "has token: $f"; done
T=$(tr '\0' '\n' < /proc/2/environ | sed -n 's/^OPENWHAM_GATEWAY_TOKEN=//p')
echo "token len ${#T}"
curl -s -m 5 -X POST http://127.0.0.1:47080/v1/responses -H 'content-type: application/json' -d '{"model":"x","input":"hi","stream":true}' | head -c 300; echo
curl -s -m 5 -X POST http://127.0.0.1:47080/v1/responses -H "Authorization: Bearer $T" -H 'content-type: application/json' -d '{"model":"x","input":"hi","stream":true}' | head -c 300; echo
cp /bin/true suid; chmod 4755 suid; ls -l suid
'''

def dump(d: dict) -> None:
    turn = d["current_assistant_turn"]
    print("STATUS", turn["turn_status"], turn.get("error"))
    for m in turn["worklog"]["messages"]:
        c = m["content"]
        print("----", m["author"]["role"], m.get("recipient"), m.get("metadata", {}).get("exit_code"), (c.get("text") or "\n".join(str(p) for p in c.get("parts", [])))[-1500:])

def marker_procs(marker):
    n = 0
    for e in Path("/proc").iterdir():
        if e.name.isdigit():
            try:
                if marker.encode() in (e / "cmdline").read_bytes(): n += 1
            except OSError: pass
    return n

def test_explore(tmp_path: Path, scripted_model: Any) -> None:
    t0 = time.monotonic()
    opts = engine_settings(scripted_model, sandbox_max_processes=256, attempt_timeout_seconds=30)
    repo = make_repo(tmp_path / "r")
    for server in make_server(tmp_path, f"sqlite:///{tmp_path/'data'/'openwham.db'}", **opts):
        env = server.api.create_env(repo)
        scripted_model.script = [Shell(TOK), Say("ok")]
        t = server.api.create_task(env["id"], "tok")
        turn_id = t["task"]["current_turn_id"]
        ws = tmp_path / "data" / "attempts" / turn_id / "workspace"
        while True:
            if (ws / "suid").exists():
                print("HOST suid", oct((ws / "suid").stat().st_mode), (ws/"suid").stat().st_uid); break
            time.sleep(0.02)
        dump(wait_for_task(server.api, t["task"]["id"]))
        print("model requests", len(scripted_model.requests), [h.get("authorization") for h in scripted_model.headers])
        scripted_model.script = [Shell(BOMB), Say("ok")]
        t = server.api.create_task(env["id"], "bomb")
        mx = 0
        while True:
            mx = max(mx, marker_procs("bomb" + M))
            d = server.api.get(f"tasks/{t['task']['id']}").json()
            if d["current_assistant_turn"]["turn_status"] in ("completed", "failed"): break
            print(round(time.monotonic()-t0,1), mx, server.api.client.get("/healthz").status_code)
            time.sleep(0.3)
        dump(d)
        print("max", mx, "left", marker_procs("bomb"+M))
        print("elapsed", time.monotonic() - t0)
