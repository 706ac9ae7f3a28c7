#!/usr/bin/env python3
"""Send task messages in the forms real Celery and kombu producers use, then
read every result back: compressed bodies (each codec kombu registers by
default, and one it does not), task protocol 1 (from Celery with
task_protocol=1, and hand-written with kombu), and eta/expires texts in the
ISO 8601 forms Celery's parser accepts.

Uses the app from pytasks.py (CELERY_BROKER_URL, CELERY_RESULT_BACKEND).

    wire_forms.py run QUEUE [--timeout S]

Sends every case to QUEUE (a celeriac worker consumes it), then waits for
each result and prints ONE JSON object: {case: {"id", "state", "result",
"exc_type", "exc_message", "sent", "done"}}, where sent/done are UTC ISO
times (done = the backend's date_done). The caller judges the outcomes.
"""
import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kombu.compression  # noqa: E402
from celery import Celery  # noqa: E402

from pytasks import app  # noqa: E402

BIG = 'x' * 20000

# A codec kombu does not ship: the body goes out unchanged, the header says
# snappy (what a producer with python-snappy installed would label it).
kombu.compression.register(lambda b: b, lambda b: b, 'application/x-snappy',
                           aliases=['snappy'])

# The same app speaking task protocol 1.
app_v1 = Celery('wire_forms_v1', broker=app.conf.broker_url,
                backend=app.conf.result_backend, set_as_current=False)
app_v1.conf.update(app.conf.changes, task_protocol=1)


def send_cases(queue):
    ids = {}

    def send(case, name, args=None, kwargs=None, via=app, **options):
        ids[case] = via.send_task(name, args=args, kwargs=kwargs, queue=queue,
                                  **options).id

    # Item 3: compression, every name kombu accepts for its default codecs.
    for codec in ['zlib', 'gzip', 'application/x-gzip', 'bzip2', 'bzip',
                  'application/x-bz2', 'lzma', 'xz', 'application/x-lzma',
                  'zstd', 'zstandard', 'application/zstd']:
        send(f'compressed:{codec}', 'celeriac.echo', [BIG], compression=codec)
    send('compressed:snappy', 'celeriac.echo', ['not run'],
         compression='snappy')
    send('compressed:retried', 'celeriac.flaky', [1], compression='bzip2')

    # Item 4: protocol 1 from Celery itself.
    send('v1:add', 'celeriac.add', [2, 3], via=app_v1)
    send('v1:kwargs', 'celeriac.add', None, {'x': 2, 'y': 3}, via=app_v1)
    send('v1:countdown', 'celeriac.add', [2, 3], via=app_v1, countdown=1)
    send('v1:expired', 'celeriac.add', [2, 3], via=app_v1,
         expires=datetime.now(timezone.utc) - timedelta(seconds=10))
    send('v1:compressed', 'celeriac.echo', [BIG], via=app_v1,
         compression='lzma')
    send('v1:retried', 'celeriac.flaky', [1], via=app_v1)
    send('v1:timelimit', 'celeriac.sleep', [5], via=app_v1, time_limit=1)

    # Item 4: protocol 1 written by hand and published with kombu.
    def raw(case, body):
        task_id = body.setdefault('id', str(uuid.uuid4()))
        with app.producer_or_acquire() as producer:
            producer.publish(body, exchange='', routing_key=queue,
                             serializer='json', correlation_id=task_id)
        ids[case] = task_id

    raw('raw_v1:no_kwargs', {'task': 'celeriac.add', 'args': [2, 3]})
    raw('raw_v1:bad_kwargs', {'task': 'celeriac.add', 'args': [2, 3],
                              'kwargs': [1]})
    raw('raw_v1:eta_naive', {'task': 'celeriac.add', 'args': [2, 3],
                             'kwargs': {}, 'eta': '2015-12-05T10:20:30'})

    # Item 5: eta / expires texts.
    for text in ['2015-12-05', '2015-W49-6', '20151205T1020Z',
                 '2015-12-05 10:20:30,5-03:00', '2015-339T12:00+0530']:
        send(f'eta:{text}', 'celeriac.add', [2, 3], headers={'eta': text})
    future = (datetime.now(timezone.utc) + timedelta(seconds=2)) \
        .replace(tzinfo=None).isoformat()
    send('eta:naive_future', 'celeriac.add', [2, 3], headers={'eta': future})
    send('expires:2999-01-01', 'celeriac.add', [2, 3],
         headers={'expires': '2999-01-01'})
    send('expires:past_naive', 'celeriac.add', [2, 3],
         headers={'expires': '2015-12-05T10:20'})
    send('eta:garbage', 'celeriac.add', [2, 3], headers={'eta': 'tomorrow'})
    return ids


def outcome(task_id, deadline):
    res = app.AsyncResult(task_id)
    out = {'id': task_id, 'state': None, 'result': None, 'exc_type': None,
           'exc_message': None, 'done': None}
    while time.monotonic() < deadline and res.state in ('PENDING', 'RETRY',
                                                        'STARTED'):
        time.sleep(0.05)
    try:
        out['result'] = res.get(timeout=max(deadline - time.monotonic(), 0.1),
                                propagate=True)
    except Exception as e:  # the exception Celery rebuilt from the backend
        out['exc_type'] = type(e).__name__
        out['exc_message'] = str(e)
    out['state'] = res.state
    meta = app.backend.get_task_meta(task_id)
    done = meta.get('date_done')
    out['done'] = done.isoformat() if hasattr(done, 'isoformat') else done
    return out


def cmd_run(ns):
    sent = datetime.now(timezone.utc).isoformat()
    ids = send_cases(ns.queue)
    deadline = time.monotonic() + ns.timeout
    report = {}
    for case, task_id in ids.items():
        report[case] = outcome(task_id, deadline)
        report[case]['sent'] = sent
    print(json.dumps(report), flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog='wire_forms.py', description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help='send every case, print the outcomes')
    r.add_argument('queue')
    r.add_argument('--timeout', type=float, default=60.0)
    r.set_defaults(func=cmd_run)
    ns = p.parse_args(argv)
    return ns.func(ns)


if __name__ == '__main__':
    sys.exit(main())
