"""Send the `--python-app` test cases to a queue and print what the result backend stored.

    PYAPP_BROKER=... PYAPP_BACKEND=... python client.py QUEUE CASE...

Each case is sent (to QUEUE), waited for, and its stored meta read back from the backend
(`status`, `result`, `traceback` present or not, `children` count); one JSON object
`{case: meta}` is printed. Run against a celeriac worker and a Celery worker, the two outputs
are compared by the Rust test.
"""

import json
import sys
import uuid

from celery.result import AsyncResult

import pyapp

CASES = {
    "add": lambda: pyapp.add.s(2, 3),
    "retry_twice": lambda: pyapp.retry_twice.s(4),
    "autoretry": lambda: pyapp.autoretry.s("k"),
    "retry_forever": lambda: pyapp.retry_forever.s(),
    "fail": lambda: pyapp.fail.s("boom"),
    "rich": lambda: pyapp.rich.s(),
    "unencodable": lambda: pyapp.unencodable.s(),
    "chatty": lambda: pyapp.chatty.s(),
    "fan_out": lambda: pyapp.fan_out.s(3),
    "whoami": lambda: pyapp.whoami.s(),
    "signals_seen": lambda: pyapp.signals_seen.s(),
    "sleep3": lambda: pyapp.sleep.s(3),
    "stuck": lambda: pyapp.stuck.s(),
}


def main(queue, cases, key):
    out = {}
    for case in cases:
        if case.startswith("redis_get_set"):
            sig = pyapp.redis_get_set.s(key, case)
        else:
            sig = CASES[case]()
        r = sig.apply_async(queue=queue)
        try:
            r.get(timeout=60, propagate=False)
        except Exception as exc:  # a timeout: reported, the test fails on it
            out[case] = {"error": "%s: %s" % (type(exc).__name__, exc)}
            continue
        meta = pyapp.app.backend.get_task_meta(r.id)
        result = meta.get("result")
        if isinstance(result, BaseException):
            result = {"exc_type": type(result).__name__, "exc_args": [repr(a) for a in result.args]}
        elif case == "fan_out":
            result = [AsyncResult(i).get(timeout=30) for i in result]
        elif case == "rich":
            result = {k: repr(v) for k, v in result.items()}
        out[case] = {
            "status": meta["status"],
            "result": result,
            "has_traceback": bool(meta.get("traceback")),
            "retries_seen": getattr(r, "retries", None),
        }
    print(json.dumps(out, sort_keys=True, default=repr))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:], "pyapp-test-%s" % uuid.uuid4().hex)
