"""A concord agent in Python: nats-py for the bus, jsonschema for the contract.

Everything it sends is validated against the committed JSON Schemas in
`schema/` before it leaves, and everything it receives (decisions, error
replies, notices) is validated before it is believed. The wire contract is
the schema, not this file: any language can do the same.
"""

import asyncio
import json
import pathlib
import time

import jsonschema
import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

SCHEMA_DIR = pathlib.Path(__file__).resolve().parents[2] / "schema"


class ConcordError(Exception):
    """The coordinator answered with a typed error, or the reply broke the schema."""

    def __init__(self, code, message, field=None, rule=None, retry_after_ms=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.rule = rule
        self.retry_after_ms = retry_after_ms


class LocalValidationError(Exception):
    """The plan breaks the schema: it was not sent."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def load_schema(name):
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


SCHEMAS = {n: load_schema(n) for n in ("intent", "decision", "error-reply", "notice", "observation")}


def _deepest(error):
    """The error that names the field: inside `oneOf`, the branch whose
    discriminating `kind`/`mode` matched, then the deepest error there."""
    while error.context:
        # Branches whose `const` discriminator failed are not the one meant.
        meant = [e for e in error.context if e.validator != "const" and not _const_failed(error, e)]
        pool = meant or list(error.context)
        error = max(pool, key=lambda e: len(e.absolute_path))
    return error


def _const_failed(parent, err):
    # Any sibling error in the same branch (schema_path[0]) that is a `const` failure.
    branch = err.schema_path[0] if err.schema_path else None
    return any(
        e.validator == "const" and e.schema_path and e.schema_path[0] == branch for e in parent.context
    )


def field_path(error):
    """A jsonschema error as the coordinator names fields: `steps[0].args.value`."""
    error = _deepest(error)
    parts = list(error.absolute_path)
    if error.validator == "required":
        missing = [p for p in error.validator_value if p not in (error.instance or {})]
        if missing:
            parts.append(missing[0])
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        if extra:
            parts.append(extra[0])
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out, error.message


def validate(kind, instance):
    """Raises LocalValidationError (for plans) or ConcordError (for replies) on a schema break."""
    errors = sorted(SCHEMAS[kind].iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    field, message = field_path(errors[0])
    if kind in ("intent", "observation"):
        raise LocalValidationError(field, message)
    raise ConcordError("schema", f"a {kind} that breaks the schema at `{field}`: {message}", field=field)


class Agent:
    """One agent: its own subjects, its own inbox prefix, its notices."""

    def __init__(self, nc, name, domain="default", timeout=5.0, attempts=4):
        self.nc = nc
        self.name = name
        self.prefix = f"concord.v1.{domain}"
        self.timeout = timeout
        self.attempts = attempts
        self.notices = {}
        self.changed = asyncio.Condition()
        self.received = []  # every message received, validated, for the record

    @classmethod
    async def connect(cls, url, name, domain="default", nkey_seed=None):
        opts = dict(servers=[url], name=f"concord-agent-{name}", inbox_prefix=f"_INBOX_{name}")
        if nkey_seed:
            opts["nkeys_seed"] = nkey_seed
        nc = await nats.connect(**opts)
        agent = cls(nc, name, domain)
        await nc.subscribe(f"{agent.prefix}.notify.{name}", cb=agent._on_notice)
        await nc.flush()
        return agent

    async def _on_notice(self, msg):
        notice = json.loads(msg.data)
        validate("notice", notice)
        self.received.append(("notice", notice))
        key = (notice.get("lineage"), notice.get("version"))
        async with self.changed:
            self.notices.setdefault(key, []).append(notice)
            self.changed.notify_all()

    async def propose(self, plan, check_locally=True):
        """Validates the plan, sends it (retrying with the same idempotency
        key), validates the answer, and returns the decision.
        (`check_locally=False` is for tests that show the coordinator agrees.)"""
        plan = dict(plan)
        plan.setdefault("idempotency_key", f"{plan['lineage']}@{plan['version']}")
        if check_locally:
            validate("intent", plan)
        payload = json.dumps(plan).encode()
        last = None
        for attempt in range(self.attempts):
            try:
                msg = await self.nc.request(f"{self.prefix}.intent.{self.name}", payload, timeout=self.timeout)
            except (NatsTimeout, NoRespondersError) as e:
                last = e
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            body = json.loads(msg.data)
            if "error" in body:
                validate("error-reply", body)
                self.received.append(("error-reply", body))
                e = body["error"]
                if e["code"] in ("busy", "rate_limited", "unavailable"):
                    last = ConcordError(**e)
                    await asyncio.sleep(e.get("retry_after_ms", 100) / 1000)
                    continue
                raise ConcordError(**e)
            validate("decision", body)
            self.received.append(("decision", body))
            return body
        raise ConcordError("timed_out", f"no answer after {self.attempts} attempts: {last}")

    async def wait_notice(self, lineage, version, events, timeout):
        """Waits (no polling: woken by the coordinator's notices) for one of `events`."""
        deadline = time.monotonic() + timeout
        async with self.changed:
            while True:
                for n in self.notices.get((lineage, version), []):
                    if n["event"] in events:
                        return n
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except asyncio.TimeoutError:
                    return None

    async def observe(self, path, kind, value):
        """Publishes an observation: kind is `liveness`, `app_health` or `metric`."""
        obs = {"protocol": 1, "path": path, "kind": kind, "value": value, "observed_at_ms": int(time.time() * 1000)}
        validate("observation", obs)
        await self.nc.publish(f"{self.prefix}.observe.{self.name}", json.dumps(obs).encode())

    async def close(self):
        await self.nc.drain()
