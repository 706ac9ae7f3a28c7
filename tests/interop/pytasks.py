"""Python Celery app used by celeriac's interop tests (see README.md).

Run a real Python worker with, e.g.:

    PYTHONPATH=tests/interop target/pyenv/bin/celery -A pytasks worker \
        -P solo -Q my-unique-queue --loglevel=info

Configured only from environment variables:

    CELERY_BROKER_URL      default amqp://guest:guest@127.0.0.1:5672//
    CELERY_RESULT_BACKEND  default redis://127.0.0.1:6379/0
    CELERY_DEFAULT_QUEUE   default 'celery' (task_default_queue)
    INTEROP_REDIS_DB       default 13: Redis db of the py.record lists
                           (host/port/password taken from CELERY_RESULT_BACKEND
                           when it is a redis:// URL, else 127.0.0.1:6379)
"""
import json
import os
import time
from urllib.parse import urlparse

from celery import Celery

BROKER_URL = os.environ.get('CELERY_BROKER_URL',
                            'amqp://guest:guest@127.0.0.1:5672//')
RESULT_BACKEND = os.environ.get('CELERY_RESULT_BACKEND',
                                'redis://127.0.0.1:6379/0')
DEFAULT_QUEUE = os.environ.get('CELERY_DEFAULT_QUEUE', 'celery')

app = Celery('pytasks', broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.update(
    task_default_queue=DEFAULT_QUEUE,
    task_serializer='json',
    result_serializer='json',
    accept_content=['json'],
    result_accept_content=['json'],
    broker_connection_retry_on_startup=True,
)


def _record_redis():
    import redis

    db = int(os.environ.get('INTEROP_REDIS_DB', '13'))
    u = urlparse(RESULT_BACKEND)
    if u.scheme in ('redis', 'rediss'):
        return redis.Redis(host=u.hostname or '127.0.0.1', port=u.port or 6379,
                           password=u.password, db=db,
                           ssl=(u.scheme == 'rediss'))
    return redis.Redis(host='127.0.0.1', port=6379, db=db)


_redis = None


@app.task(name='py.add')
def add(x, y):
    return x + y


@app.task(name='py.tsum')
def tsum(values):
    return sum(values)


@app.task(name='py.fail')
def fail(message):
    raise ValueError(message)


@app.task(name='py.sleep')
def sleep(seconds):
    time.sleep(float(seconds))
    return seconds


@app.task(name='py.echo')
def echo(value):
    return value


@app.task(name='py.record')
def record(key, value):
    """RPUSH value to Redis list `key` (db INTEROP_REDIS_DB); returns the
    new list length. Lets a test count how often a task really ran.
    str/int/float are pushed as-is (redis-py formats numbers), anything else
    (bool, None, list, dict) as its JSON text."""
    global _redis
    if _redis is None:
        _redis = _record_redis()
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        value = json.dumps(value)
    return _redis.rpush(key, value)


@app.task(name='celeriac.add')
def celeriac_add(x, y):
    """The same name and behaviour as celeriac's built-in, so a Python worker and a celeriac
    worker can share one queue of these tasks."""
    return x + y
