"""A Celery app whose configuration tells the worker what to do (the `python_conf` tests).

Its broker, backend and queue names come from the environment (CONFAPP_BROKER, CONFAPP_BACKEND,
CONFAPP_QUEUE) so each test has its own; everything else is in `app.conf`, as a Celery shop
writes it: two queues, a route, a rate limit by annotation, an app-wide hard time limit, worker
settings celeriac takes (concurrency, prefetch multiplier, queues' maximum priority) and three it does not act on.
"""

import os
import time

from celery import Celery
from kombu import Exchange, Queue

QUEUE = os.environ.get("CONFAPP_QUEUE", "confapp")
#: With CONFAPP_FANOUT set, a third queue bound to a fanout exchange, whose declaration celeriac
#: does not reproduce (it consumes queues by name).
EXTRA = [Queue(QUEUE + ".fan", Exchange(QUEUE + ".fan", type="fanout"))] if os.environ.get("CONFAPP_FANOUT") else []

app = Celery("confapp", broker=os.environ["CONFAPP_BROKER"], backend=os.environ["CONFAPP_BACKEND"])
app.conf.update(
    task_queues=[Queue(QUEUE + ".a"), Queue(QUEUE + ".b")] + EXTRA,
    task_default_queue=QUEUE + ".a",
    task_routes={"confapp.mul": {"queue": QUEUE + ".b"}},
    task_annotations={"confapp.tick": {"rate_limit": "2/s"}},
    task_time_limit=2,
    worker_concurrency=2,
    worker_prefetch_multiplier=1,
    task_queue_max_priority=10,
    # Settings celeriac does not act on: named in its start-up warning.
    task_acks_on_failure_or_timeout=False,
    result_expires=600,
    worker_hijack_root_logger=False,
)
if os.environ.get("CONFAPP_MAX_MEMORY_KIB"):
    # Celery's worker_max_memory_per_child, in KiB: a test sets one below a fresh child.
    app.conf.worker_max_memory_per_child = int(os.environ["CONFAPP_MAX_MEMORY_KIB"])


@app.task(name="confapp.add")
def add(x, y):
    return x + y


@app.task(name="confapp.mul")
def mul(x, y):
    return x * y


@app.task(name="confapp.tick")
def tick():
    """When it started (seconds since the epoch): the rate limit spaces these."""
    return time.time()


@app.task(name="confapp.sleepy")
def sleepy(seconds):
    time.sleep(seconds)
    return "woke"
