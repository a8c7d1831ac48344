"""A concord agent in Python, from the command line:

    PYTHONPATH=.tools/python python3 examples/python/agent.py URL NAME PLAN.json

validates the plan against schema/intent.schema.json, proposes it as NAME,
prints the decision, and if a human must decide, waits for the notice.
"""

import asyncio
import json
import sys

from concord_agent import Agent, ConcordError, LocalValidationError


async def main(url, name, plan_file):
    plan = json.load(open(plan_file))
    agent = await Agent.connect(url, name)
    try:
        decision = await agent.propose(plan)
    except LocalValidationError as e:
        print(f"not sent: the plan breaks the schema at `{e.field}`: {e.message}")
        return 1
    except ConcordError as e:
        print(f"refused: {e} (field {e.field}, rule {e.rule})")
        return 1
    print(f"{plan['lineage']} v{plan['version']}: {decision['verdict']}")
    for r in decision["reasons"]:
        print(f"  {r['rule']} ({r['outcome']}): {r['message']}")
    if decision["verdict"] == "needs_approval":
        print("waiting for a human ...")
        n = await agent.wait_notice(
            plan["lineage"], plan["version"], {"approved", "rejected_by_operator", "approval_expired"}, 600
        )
        print(n)
    await agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
