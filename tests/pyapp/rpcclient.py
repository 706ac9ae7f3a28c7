"""States a task sets while it runs, read through Celery's RPC result backend (``rpc://``: each
state is a message to this client's reply queue).

    PYAPP_BROKER=... PYAPP_BACKEND=rpc:// python rpcclient.py QUEUE CASE

CASE is `progress_for` (`update_state(PROGRESS)`) or `tracked_for` (`track_started`): the task is
sent to QUEUE with 2 (seconds of work), the client polls its state (20 s at most) until it reads
the running state, then waits for the result. One JSON object is printed: whether that state was
read, the keys of its meta, its meta when it names no process, and the result. One case per
process: once `get()` has started Celery's RPC consumer, `state` no longer reads new states.
"""

import json
import sys
import time

import pyapp

CASES = {
    "progress_for": ("PROGRESS", pyapp.progress_for),
    "tracked_for": ("STARTED", pyapp.tracked_for),
}


def main(queue, case):
    running, task = CASES[case]
    r = task.apply_async(args=[2], queue=queue)
    seen, info = False, None
    deadline = time.monotonic() + 20
    while not seen and not r.ready() and time.monotonic() < deadline:
        seen = r.state == running
        info = r.info if seen else None
        time.sleep(0 if seen else 0.05)
    meta = info if isinstance(info, dict) else {}
    out = {"seen": seen, "keys": sorted(meta), "meta": None if "pid" in meta else info, "result": r.get(timeout=30)}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
