"""The Celery side of celeriac's comparative benchmark (crates/celeriac-bench).

A Celery 5.7 app with the tasks the benchmark runs, under the names celeriac's built-ins
use, so the same messages go to either worker:

    celeriac.noop()      does nothing; ignore_result
    celeriac.add(x, y)   returns x + y
    celeriac.tsum(xs)    returns sum(xs) (a chord body)

and the Python tasks of the `python` part (src/python.rs), which run this same app two ways:
`celery -A benchtasks worker -P prefork` and `celeriac worker --python-app benchtasks:app`:

    pybench.noop()       does nothing; ignore_result (nothing stored, on either side)
    pybench.getset(i)    one Redis GET and one SET on the real key `pybench:getset`: reads the
                         previous value, writes `i`, returns the previous value (a str or None);
                         its result is stored

Configured only from the environment (the harness sets it):

    BENCH_BROKER_URL        amqp://... of the benchmark's own vhost
    BENCH_RESULT_BACKEND    redis://127.0.0.1:6379/10 (or unset: no result backend)
    BENCH_CONFIRM_PUBLISH   '1': broker_transport_options={'confirm_publish': True}
    BENCH_REDIS_URL         the Redis database pybench.getset works on (the run's db 10)

Everything else is Celery's default (prefetch multiplier 4, acks early, json).
"""
import os

import redis
from celery import Celery

app = Celery('benchtasks', broker=os.environ['BENCH_BROKER_URL'],
             backend=os.environ.get('BENCH_RESULT_BACKEND') or None)
app.conf.update(
    task_serializer='json',
    result_serializer='json',
    accept_content=['json'],
    result_accept_content=['json'],
    broker_connection_retry_on_startup=True,
)
if os.environ.get('BENCH_CONFIRM_PUBLISH') == '1':
    app.conf.broker_transport_options = {'confirm_publish': True}


@app.task(name='celeriac.noop', ignore_result=True)
def noop():
    return None


@app.task(name='celeriac.add')
def add(x, y):
    return x + y


@app.task(name='celeriac.tsum')
def tsum(xs):
    return sum(xs)


#: The key pybench.getset reads and writes.
GETSET_KEY = 'pybench:getset'
#: The Redis client, made on first use in each process (a Celery prefork child is forked: a
#: connection made in the parent must not be shared), by pid.
_redis = {}


def _client():
    pid = os.getpid()
    if pid not in _redis:
        _redis.clear()
        _redis[pid] = redis.Redis.from_url(os.environ['BENCH_REDIS_URL'])
    return _redis[pid]


@app.task(name='pybench.noop', ignore_result=True)
def pybench_noop():
    return None


@app.task(name='pybench.getset')
def pybench_getset(i):
    r = _client()
    previous = r.get(GETSET_KEY)
    r.set(GETSET_KEY, i)
    return None if previous is None else previous.decode()
