#!/usr/bin/env python3
"""Client-side measurements of Celery for celeriac's comparative benchmark.

    celery_bench.py publish --count N --warmup W --queue Q
        W then N `celeriac.noop.apply_async(queue=Q)` in a loop (one process, Celery's
        producer pool, ignore_result). Set BENCH_CONFIRM_PUBLISH=1 for publisher confirms.
        Prints one JSON line: {"count": N, "seconds": S, "body_bytes": B, "celery": version}.

    celery_bench.py roundtrip --count N --warmup W --queue Q
        W then N sequential `celeriac.add.apply_async((i, 1), queue=Q).get(timeout=10)`.
        Prints one JSON line: {"latencies": [seconds, ...]} (the N timed ones).

Configuration: see benchtasks.py. Exit status 1 with a message on stderr on any error.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celery  # noqa: E402
from benchtasks import add, noop  # noqa: E402


def cmd_publish(ns):
    for _ in range(ns.warmup):
        noop.apply_async(queue=ns.queue)
    started = time.perf_counter()
    for _ in range(ns.count):
        noop.apply_async(queue=ns.queue)
    seconds = time.perf_counter() - started
    # The size of one message body, for the record.
    body = noop.app.amqp.as_task_v2('0' * 36, 'celeriac.noop', args=(), kwargs={}).body
    print(json.dumps({'count': ns.count, 'seconds': seconds,
                      'body_bytes': len(json.dumps(body, separators=(', ', ': '))),
                      'celery': celery.__version__}), flush=True)


def cmd_roundtrip(ns):
    latencies = []
    for i in range(ns.warmup + ns.count):
        started = time.perf_counter()
        value = add.apply_async((i, 1), queue=ns.queue).get(timeout=10)
        elapsed = time.perf_counter() - started
        if value != i + 1:
            raise RuntimeError(f'add({i}, 1) returned {value!r}')
        if i >= ns.warmup:
            latencies.append(elapsed)
    print(json.dumps({'latencies': latencies, 'celery': celery.__version__}), flush=True)


def main():
    p = argparse.ArgumentParser(prog='celery_bench.py')
    sub = p.add_subparsers(dest='cmd', required=True)
    for name, func in (('publish', cmd_publish), ('roundtrip', cmd_roundtrip)):
        s = sub.add_parser(name)
        s.add_argument('--count', type=int, required=True)
        s.add_argument('--warmup', type=int, default=0)
        s.add_argument('--queue', required=True)
        s.set_defaults(func=func)
    ns = p.parse_args()
    try:
        ns.func(ns)
    except Exception as e:  # one line for the harness
        print(f'celery_bench.py: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
