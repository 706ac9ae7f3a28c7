"""Send the `--python-app` test cases to a queue and print what the result backend stored.

    PYAPP_BROKER=... PYAPP_BACKEND=... python client.py QUEUE CASE...

Each case is sent (to QUEUE), waited for, and its stored meta read back from the backend
(`status`, `result`, `traceback` present or not, `children` count); one JSON object
`{case: meta}` is printed. Run against a celeriac worker and a Celery worker, the two outputs
are compared by the Rust test.
"""

import json
import sys
import time
import uuid

from celery import chain, chord, group
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
    "over_limit": lambda: pyapp.over_limit.s(),
}


def _linked(sig, kind, other):
    """`sig` with `other` (frozen, its id known) linked as its callback or errback."""
    other.freeze()
    getattr(sig, kind)(other)
    return sig, other


def _flow_link():
    sig, cb = _linked(pyapp.add.s(2, 2), "link", pyapp.mul.s(10))
    r = sig.apply_async()
    return [r.get(timeout=60), AsyncResult(cb.id).get(timeout=60)]


def _flow_link_error():
    sig, eb = _linked(pyapp.fail.s("x"), "link_error", pyapp.errback.s())
    r = sig.apply_async()
    r.get(timeout=60, propagate=False)
    return [r.status, AsyncResult(eb.id).get(timeout=60)]


def _flow_stop_chain():
    r = chain(pyapp.add.s(1, 1), pyapp.stop_chain.s(), pyapp.add.s(100)).apply_async()
    stopped = r.parent.get(timeout=60)
    # A task sent after the chain's tail would have been: done, the tail is still PENDING.
    sentinel = pyapp.add.delay(0, 0).get(timeout=60)
    return [stopped, sentinel, r.status]


#: Workflows: each returns what the client read back.
FLOWS = {
    "chain": lambda: (lambda r: [r.parent.parent.get(timeout=60), r.parent.get(timeout=60), r.get(timeout=60)])(
        chain(pyapp.add.s(1, 2), pyapp.add.s(3), pyapp.add.s(4)).apply_async()),
    "link": _flow_link,
    "link_error": _flow_link_error,
    "group": lambda: group(pyapp.add.s(i, i) for i in range(4)).apply_async().get(timeout=60),
    "chord": lambda: chord([pyapp.add.s(i, i) for i in range(4)], pyapp.tsum.s()).apply_async().get(timeout=60),
    "stop_chain": _flow_stop_chain,
    "replaced": lambda: pyapp.replaced.delay(1).get(timeout=60),
    "replaced_in_chain": lambda: chain(pyapp.replaced.s(1), pyapp.add.s(1)).apply_async().get(timeout=60),
    "replaced_by_group": lambda: pyapp.replaced_by_group.delay(3).get(timeout=60),
}


def _settled(sig, key):
    """Send `sig`, wait for its outcome: [state, result or exception type, runs counted in `key`]."""
    r = sig.apply_async()
    r.get(timeout=60, propagate=False)
    result = r.result
    if isinstance(result, BaseException):
        result = type(result).__name__
    return [r.status, result, int(pyapp._data().get(key) or 0)]


#: How a message is settled (acks_late, reject_on_worker_lost, Reject): each given a fresh key.
SETTLING = {
    "die_early": lambda k: pyapp.die_early.s(k, 100),
    "die_late": lambda k: pyapp.die_late.s(k, 100),
    "die_requeue_once": lambda k: pyapp.die_requeue.s(k, 2),
    "die_retry_once": lambda k: pyapp.die_retry.s(k, 2),
    "die_retry": lambda k: pyapp.die_retry.s(k, 100),
    "reject_requeue": lambda k: pyapp.rejected.s(k, True),
    "reject_drop": lambda k: pyapp.rejected.s(k, False),
}


def _timed_out(sig, key, final):
    """Send `sig`, wait (60 s at most) for its state to be `final`: [state, result or exception
    type, runs counted in `key`, whether the stored traceback is null]."""
    r = sig.apply_async()
    deadline = time.monotonic() + 60
    while pyapp.app.backend.get_task_meta(r.id)["status"] != final and time.monotonic() < deadline:
        time.sleep(0.1)
    meta = pyapp.app.backend.get_task_meta(r.id)
    result = meta.get("result")
    if isinstance(result, BaseException):
        result = type(result).__name__
    return [meta["status"], result, int(pyapp._data().get(key) or 0), meta.get("traceback") is None]


#: A task killed at its hard time limit, acks_late: acknowledged, or (not acks_on_timeout)
#: requeued and run again; each with the state to wait for.
TIMED_OUT = {
    "timeout_late": (lambda k: pyapp.timeout_late.s(k), "FAILURE"),
    "timeout_requeue": (lambda k: pyapp.timeout_requeue.s(k), "SUCCESS"),
}


def _tb_shape(tb):
    """A traceback's unindented lines: its headers, each exception's `Type: message` and the
    lines between chained exceptions (frames differ between workers; the shape does not)."""
    return [line for line in tb.splitlines() if not line.startswith(" ")] if tb else None


def main(queue, cases, key):
    out = {}
    for case in cases:
        if case in TIMED_OUT:
            k = "%s-%s" % (key, case)
            make, final = TIMED_OUT[case]
            out[case] = {"value": _timed_out(make(k), k, final)}
            continue
        if case in SETTLING:
            k = "%s-%s" % (key, case)
            try:
                out[case] = {"value": _settled(SETTLING[case](k), k)}
            except Exception as exc:  # a timeout: reported, the test fails on it
                out[case] = {"error": "%s: %s" % (type(exc).__name__, exc)}
            continue
        if case in FLOWS:
            try:
                out[case] = {"value": FLOWS[case]()}
            except Exception as exc:  # a timeout or a failure: reported, the test fails on it
                out[case] = {"error": "%s: %s" % (type(exc).__name__, exc)}
            continue
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
            "tb_shape": _tb_shape(meta.get("traceback")),
            "retries_seen": getattr(r, "retries", None),
            "id": r.id,
        }
    print(json.dumps(out, sort_keys=True, default=repr))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:], "pyapp-test-%s" % uuid.uuid4().hex)
