"""Send a task that stays running, and ask its worker what Celery's remote control shows of it.

    PYAPP_BROKER=... PYAPP_BACKEND=... python inspectclient.py QUEUE NODE KEY

`pyapp.block_late(KEY)` is sent by this (Celery) client to QUEUE through the direct exchange
QUEUE.x (declared and bound here), routing key QUEUE; once NODE lists it in `inspect active` (30 s at
most), one JSON object is printed: the task's `id`, its `delivery_info` there, and NODE's
`registered` tasks without and with Celery's builtins (`builtins=True`). The task runs until
the caller pushes an item on KEY.
"""

import json
import sys
import time

import pyapp


def main(queue, node, key):
    from kombu import Exchange, Queue

    # Sent through an exchange of its own (QUEUE.x, direct, bound to QUEUE), not the default one.
    exchange = Exchange(queue + ".x", type="direct")
    with pyapp.app.connection_for_write() as conn:
        Queue(queue, exchange, routing_key=queue)(conn.default_channel).declare()
    task_id = pyapp.block_late.apply_async(args=[key], exchange=exchange, routing_key=queue).id
    inspect = pyapp.app.control.inspect(destination=[node], timeout=2)
    found = None
    deadline = time.monotonic() + 30
    while found is None and time.monotonic() < deadline:
        active = (inspect.active() or {}).get(node) or []
        found = next((t for t in active if t["id"] == task_id), None)
    registered = (inspect.registered() or {}).get(node)
    builtins = (inspect._request("registered", builtins=True) or {}).get(node)
    print(json.dumps({
        "id": task_id,
        "delivery_info": found and found["delivery_info"],
        "registered": registered,
        "builtins": builtins,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
