"""The Celery app the `--python-app` tests run under a celeriac worker (tests/pyapp).

The broker and backend come from the environment (PYAPP_BROKER, PYAPP_BACKEND) so each test
picks its own queue, vhost or database; `celery -A pyapp worker` runs the same app, for
comparing what a Python worker stores.
"""

import datetime
import decimal
import os
import threading
import time
import uuid

from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

app = Celery(
    "pyapp",
    broker=os.environ.get("PYAPP_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("PYAPP_BACKEND", "redis://127.0.0.1:6379/5"),
)
app.conf.task_default_queue = os.environ.get("PYAPP_QUEUE", "pyapp")

#: Signals seen in this process, in order (`signals_seen` returns them).
SEEN = []


@signals.worker_process_init.connect
def _init(**_):
    SEEN.append("worker_process_init")


@signals.task_prerun.connect
def _prerun(task_id=None, task=None, **_):
    SEEN.append("task_prerun:%s" % task.name)


@signals.task_postrun.connect
def _postrun(task_id=None, task=None, state=None, **_):
    SEEN.append("task_postrun:%s:%s" % (task.name, state))


@signals.task_success.connect
def _success(sender=None, **_):
    SEEN.append("task_success:%s" % sender.name)


@signals.task_failure.connect
def _failure(sender=None, **_):
    SEEN.append("task_failure:%s" % sender.name)


@signals.task_retry.connect
def _retry(sender=None, **_):
    SEEN.append("task_retry:%s" % sender.name)


@app.task
def add(x, y):
    return x + y


@app.task(bind=True)
def whoami(self):
    r = self.request
    return {
        "id": r.id,
        "task": r.task,
        "retries": r.retries,
        "hostname": r.hostname,
        "root_id": r.root_id,
        "parent_id": r.parent_id,
        "routing_key": (r.delivery_info or {}).get("routing_key"),
        "called_directly": r.called_directly,
        "pid": os.getpid(),
    }


@app.task(bind=True, max_retries=5, default_retry_delay=0)
def retry_twice(self, x):
    if self.request.retries < 2:
        raise self.retry(exc=ValueError("not yet %d" % self.request.retries), countdown=0)
    return x * 10


@app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 3, "countdown": 0})
def autoretry(self, key):
    if self.request.retries < 1:
        raise KeyError(key)
    return "retried %d" % self.request.retries


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def retry_forever(self):
    raise self.retry(exc=RuntimeError("again"), countdown=0)


@app.task
def fail(msg):
    raise ValueError(msg, 42)


@app.task
def rich():
    return {
        "when": datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.timezone.utc),
        "price": decimal.Decimal("19.99"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    }


@app.task
def unencodable():
    return object()


@app.task
def chatty():
    print("hello from a task that prints")
    get_task_logger(__name__).info("hello from a task that logs")
    return "printed"


@app.task
def fan_out(n):
    return [add.delay(i, i).id for i in range(n)]


@app.task
def signals_seen():
    return list(SEEN)


@app.task
def redis_get_set(key, value):
    import redis

    client = redis.Redis.from_url(os.environ.get("PYAPP_DATA_REDIS", "redis://127.0.0.1:6379/5"))
    old = client.get(key)
    client.set(key, value)
    return old.decode() if old is not None else None


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def stuck():
    """Blocked on a lock forever (a futex wait), shrugging off the soft time limit: only the
    hard limit ends it."""
    lock = threading.Lock()
    lock.acquire()
    while True:
        try:
            lock.acquire()
        except SoftTimeLimitExceeded:
            SEEN.append("stuck: soft limit ignored")


# -- Tasks of the supervision tests (crates/celeriac-cli/tests/python_supervision.rs) -----------


def _data():
    import redis

    return redis.Redis.from_url(os.environ.get("PYAPP_DATA_REDIS", "redis://127.0.0.1:6379/5"))


@app.task(bind=True)
def tally(self, key):
    """Count this run under its task id in the hash `key` (a task run twice shows 2); the pid."""
    _data().hincrby(key, self.request.id, 1)
    return os.getpid()


@app.task(acks_late=True, reject_on_worker_lost=True)
def slow_once(key, seconds):
    """The first run (the one that sets `key`) sleeps `seconds`; any later run returns at once.
    Acknowledged late and given back if its worker is lost, so Celery too would run it again."""
    if _data().set(key, os.getpid(), nx=True):
        time.sleep(seconds)
        return "first run"
    return "run again"


def _frame_fd():
    """The pipe a celeriac child keeps for its frames: the one pipe above fd 2 that is not
    stdin, stdout or stderr (the child points fd 1 at stderr)."""
    import stat

    std = {os.fstat(fd).st_ino for fd in (0, 1, 2)}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if int(name) > 2 and stat.S_ISFIFO(st.st_mode) and st.st_ino not in std:
            return int(name)
    raise RuntimeError("no frame pipe in this process (not a celeriac child?)")


@app.task
def frame_garbage():
    """Write what is not a frame where the child's frames go."""
    os.write(_frame_fd(), b"this is not a frame\n")
    return "wrote garbage"


@app.task
def frame_close():
    """Close the pipe the child keeps for its frames."""
    os.close(_frame_fd())
    return "closed it"


@app.task(acks_late=True, reject_on_worker_lost=True)
def frame_short(key):
    """On its first run (the one that sets `key`), write on the frame pipe a frame's length and
    only part of the body it announces."""
    if _data().set(key, os.getpid(), nx=True):
        import struct

        os.write(_frame_fd(), struct.pack(">I", 1000) + b"abc")
        return "wrote a short frame"
    return "run again"


#: What `hog` keeps: a leak, as a module-level cache that only grows.
_HOARD = []


@app.task
def hog(mb):
    """Keep `mb` more megabytes resident in this process; the pid."""
    _HOARD.append(b"x" * (mb * 1000 * 1000))
    return os.getpid()


@app.task
def loud():
    """Print a lot, through print, sys.__stdout__ and fd 1 itself."""
    import sys

    print("x" * 200000)
    sys.__stdout__.write("through sys.__stdout__\n")
    sys.__stdout__.flush()
    os.write(1, b"straight to fd 1\n")
    return "still framed"


# -- Celery task semantics under the supervisor (crates/celeriac-cli/tests/python_semantics.rs) --


def _die_unless(key, survive_at):
    """Count this run in `key`; kill this process (SIGKILL) until the count reaches `survive_at`."""
    import signal

    n = _data().incr(key)
    if n < survive_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@app.task(acks_late=True, reject_on_worker_lost=True)
def die_requeue(key, survive_at):
    return _die_unless(key, survive_at)


@app.task(acks_late=True)
def die_late(key, survive_at):
    return _die_unless(key, survive_at)


@app.task
def die_early(key, survive_at):
    return _die_unless(key, survive_at)


@app.task(retry_on_worker_lost=True, max_retries=1, default_retry_delay=0)
def die_retry(key, survive_at):
    return _die_unless(key, survive_at)


@app.task
def block_early(key):
    """Wait (up to 60 s) for an item pushed on the list `key`."""
    return bool(_data().blpop(key, timeout=60))


@app.task(acks_late=True)
def block_late(key):
    return bool(_data().blpop(key, timeout=60))


@app.task(bind=True)
def progress(self, key):
    """A custom state stored while it waits for an item on `key`."""
    self.update_state(state="PROGRESS", meta={"step": 1})
    return bool(_data().blpop(key, timeout=60))


@app.task(acks_late=True, acks_on_failure=False)
def fail_rejected(msg):
    """A FAILURE whose message is rejected (to the queue's dead-letter exchange), not acked."""
    raise ValueError(msg)


@app.task(track_started=True)
def tracked(key):
    """STARTED stored while it waits for an item on `key`."""
    return bool(_data().blpop(key, timeout=60))


@app.task(bind=True)
def ignored(self):
    from celery.exceptions import Ignore

    self.update_state(state="PROGRESS", meta={"step": 2})
    raise Ignore()


@app.task(acks_late=True)
def rejected(key, requeue):
    """Rejects its message the first time (`requeue` or not); returns the run count after."""
    from celery.exceptions import Reject

    n = _data().incr(key)
    if n == 1:
        raise Reject("first run", requeue=requeue)
    return n


@app.task(ignore_result=True)
def quiet(key):
    _data().rpush(key, "ran")
    return "not stored"


@app.task
def mul(x, y):
    return x * y


@app.task
def tsum(values):
    return sum(values)


@app.task
def errback(task_id):
    return "errback for a %d-character id" % len(task_id)


@app.task(bind=True)
def stop_chain(self, x):
    self.request.chain = None
    return x


@app.task(bind=True)
def replaced(self, x):
    return self.replace(add.s(x, 100))


@app.task(bind=True)
def replaced_by_group(self, n):
    from celery import group

    return self.replace(group(add.s(i, i) for i in range(n)))


# -- Gaps closed after the first cut (python_semantics.rs, python_app.rs) -----------------------


def _slow_first_run(key):
    """Count this run in `key`; the first run outlives any hard limit (30 s); the count."""
    n = _data().incr(key)
    if n == 1:
        time.sleep(30)
    return n


@app.task(acks_late=True, time_limit=2)
def timeout_late(key):
    """Killed at its hard limit on its first run: FAILURE, acknowledged (acks_on_timeout)."""
    return _slow_first_run(key)


@app.task(acks_late=True, acks_on_failure_or_timeout=False, time_limit=2)
def timeout_requeue(key):
    """Killed at its hard limit on its first run: FAILURE stored, then requeued and run again."""
    return _slow_first_run(key)


@app.task(time_limit=1)
def over_limit():
    time.sleep(30)


@app.task(ignore_result=True)
def quiet_fail(key):
    _data().rpush(key, "ran")
    raise ValueError("not stored")


@app.task(ignore_result=True, store_errors_even_if_ignored=True)
def quiet_fail_kept(key):
    _data().rpush(key, "ran")
    raise ValueError("stored all the same")


@app.task(bind=True)
def progress_for(self, seconds):
    """A custom state, then `seconds` of work (no Redis: for the rpc:// backend's test)."""
    self.update_state(state="PROGRESS", meta={"step": 1})
    time.sleep(seconds)
    return seconds


@app.task(track_started=True)
def tracked_for(seconds):
    time.sleep(seconds)
    return seconds
