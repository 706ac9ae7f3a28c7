"""Send the `python_conf` test cases with `confapp`'s own configuration (its broker, routes and
backend) and print what came back, one JSON object `{case: ...}`.

    CONFAPP_BROKER=... CONFAPP_BACKEND=... CONFAPP_QUEUE=... python confclient.py CASE...

Cases: `add_a` (to the first queue), `mul_b` (routed to the second by `task_routes`), `ticks`
(six rate-limited tasks: their start times), `sleepy` (past the app's hard time limit: the
stored state and exception type).
"""

import json
import sys

import confapp


def _meta(result):
    result.get(timeout=30, propagate=False)
    meta = result.backend.get_task_meta(result.id)
    value = meta["result"]
    if isinstance(value, BaseException):
        value = {"exc_type": type(value).__name__}
    return {"status": meta["status"], "result": value}


CASES = {
    "add_a": lambda: _meta(confapp.add.delay(2, 3)),
    "mul_b": lambda: _meta(confapp.mul.delay(4, 5)),
    "ticks": lambda: [r.get(timeout=30) for r in [confapp.tick.delay() for _ in range(6)]],
    # By name, as a client without the task's module sends it: no time limit in the message, so
    # the worker's own (the app's task_time_limit) is what stops it.
    "sleepy": lambda: _meta(confapp.app.send_task("confapp.sleepy", (60,))),
}

print(json.dumps({case: CASES[case]() for case in sys.argv[1:]}))
