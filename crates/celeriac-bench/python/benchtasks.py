"""The Celery side of celeriac's comparative benchmark (crates/celeriac-bench).

A Celery 5.7 app with the two tasks the benchmark runs, under the names celeriac's built-ins
use, so the same messages go to either worker:

    celeriac.noop()      does nothing; ignore_result
    celeriac.add(x, y)   returns x + y
    celeriac.tsum(xs)    returns sum(xs) (a chord body)

Configured only from the environment (the harness sets it):

    BENCH_BROKER_URL        amqp://... of the benchmark's own vhost
    BENCH_RESULT_BACKEND    redis://127.0.0.1:6379/10 (or unset: no result backend)
    BENCH_CONFIRM_PUBLISH   '1': broker_transport_options={'confirm_publish': True}

Everything else is Celery's default (prefetch multiplier 4, acks early, json).
"""
import os

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
