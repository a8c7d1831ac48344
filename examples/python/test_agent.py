"""The Python agent against a live `concord dev`: the wire contract holds
across languages. Run by `make test` (make python-agent):

    PYTHONPATH=.tools/python python3 examples/python/test_agent.py target/debug/concord

Checks: a plan is validated locally before it is sent; the decision, every
error reply and every notice received validate against the committed
schemas; a held plan is approved by an operator and the agent hears it by
notice; a plan failing local validation gets the same field path back from
the coordinator; observations reach the world model.
"""

import asyncio
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from concord_agent import Agent, ConcordError, LocalValidationError, validate  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def plan(lineage, value, **extra):
    step = {
        "id": "s1", "kind": "set", "path": "svc/api/pool_size", "args": {"value": value},
        "confidence": 0.9, "compensation": {"mode": "restore"},
    }
    step.update(extra)
    return {"protocol": 1, "lineage": lineage, "version": 1, "goal": "more headroom", "steps": [step]}


async def raw_request(nc, subject, body):
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=5)
    return json.loads(msg.data)


async def run(url):
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    agent = await Agent.connect(url, "resource")
    # The coordinator may still be recovering: propose until it answers.
    for _ in range(50):
        try:
            d = await agent.propose(json.load(open(ROOT / "config/examples/pool-60.json")))
            break
        except ConcordError:
            await asyncio.sleep(0.2)
    else:
        raise SystemExit("the coordinator never answered")
    check(d["verdict"] == "admit", f"pool 50 -> 60 is admitted ({d['verdict']})")
    # No executor serves this dev coordinator: the step fails and the saga
    # compensates; the agent hears the end by notice.
    end = await agent.wait_notice("resource-pool-nudge", 1, {"completed", "compensated"}, 30)
    check(end is not None, f"the saga's end arrives as a notice ({end})")

    # Held for a human: an operator approves, the agent is woken by the notice.
    d = await agent.propose(plan("py-pool-110", 110))
    check(d["verdict"] == "needs_approval", f"60 -> 110 waits for a human ({d['verdict']})")
    ops = await nats.connect(url, inbox_prefix="_INBOX_alice")
    answer = await raw_request(ops, "concord.v1.default.ctl.alice", {
        "op": "approve", "lineage": "py-pool-110", "version": 1, "plan_hash": d["plan_hash"],
        "material_hash": d["material_hash"], "reason": "looked at the preview",
    })
    check(answer.get("ok") is True, f"alice approves ({answer})")
    n = await agent.wait_notice("py-pool-110", 1, {"approved", "rejected_by_operator", "approval_expired"}, 30)
    check(n is not None and n["event"] == "approved" and n.get("operator") == "alice", f"approved by alice ({n})")

    # Local validation and the coordinator name the same field.
    bad = [
        plan("py-bad-1", 1, args={}),
        plan("py-bad-2", 1, confidence=1.5),
        plan("py-bad-3", 1, extra=True),
        dict(plan("py-bad-4", 1), protocol=2),
    ]
    for b in bad:
        try:
            await agent.propose(b)
            check(False, f"{b['lineage']} is refused locally")
            continue
        except LocalValidationError as e:
            local = e.field
        # Sent anyway, bypassing the local check: the coordinator's error
        # reply (validated against its schema) names the same field.
        try:
            await agent.propose(b, check_locally=False)
            check(False, f"{b['lineage']} is refused by the coordinator")
        except ConcordError as e:
            check(local == e.field, f"{b['lineage']}: local `{local}` == coordinator `{e.field}` ({e.rule})")

    # Observations: liveness fine, the application failing, a metric.
    await agent.observe("svc/api/health/liveness", "liveness", "ok")
    await agent.observe("svc/api/health/app", "app_health", "failing")
    await agent.observe("svc/api/queue_depth", "metric", 420)
    await agent.nc.flush()
    seen = {}
    for _ in range(50):
        w = await raw_request(ops, "concord.v1.default.query.alice", {"op": "world", "path": "svc/api"})
        seen = {p: r["value"] for p, r in w.get("observations", [])}
        if seen.get("svc/api/queue_depth") == 420:
            break
        await asyncio.sleep(0.1)
    check(seen.get("svc/api/health/app") == "failing", f"app health is in the world model ({seen})")
    check(seen.get("svc/api/health/liveness") == "ok", "liveness is kept apart from app health")
    check(seen.get("svc/api/queue_depth") == 420, "the metric arrived")

    kinds = sorted({k for k, _ in agent.received})
    check({"decision", "error-reply", "notice"} <= set(kinds), f"validated replies of every kind: {kinds}")
    await ops.drain()
    await agent.close()
    return failures


def main():
    concord = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/concord")
    env = dict(os.environ, RUST_LOG="warn")
    # The shipped configuration, with a small log: JetStream reserves a
    # stream's bound on disk and a test needs little.
    tmp = tempfile.mkdtemp(prefix="concord-python-agent-")
    config = pathlib.Path(tmp) / "concord.toml"
    config.write_text(
        f'policy = "{ROOT / "config/policy.toml"}"\n'
        f'world = "{ROOT / "config/examples/world.toml"}"\n'
        "[log]\nmax_bytes = 268435456\n"
    )
    dev = subprocess.Popen(
        [concord, "dev", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )
    try:
        url = None
        end = time.monotonic() + 30
        while time.monotonic() < end and url is None:
            line = dev.stdout.readline()
            if not line:
                break
            m = re.search(r"JetStream at (\S+)", line)
            if m:
                url = m.group(1)
        if url is None:
            raise SystemExit("concord dev did not print its URL")
        failures = asyncio.run(run(url))
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(10)
        except subprocess.TimeoutExpired:
            dev.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("python agent: every check passed")


if __name__ == "__main__":
    main()
