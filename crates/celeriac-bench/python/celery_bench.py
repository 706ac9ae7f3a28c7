#!/usr/bin/env python3
"""Client-side measurements of Celery for celeriac's comparative benchmark.

    celery_bench.py publish --count N --warmup W --queue Q
        W then N `celeriac.noop.apply_async(queue=Q)` in a loop (one process, Celery's
        producer pool, ignore_result). Set BENCH_CONFIRM_PUBLISH=1 for publisher confirms.
        Prints one JSON line: {"count": N, "seconds": S, "body_bytes": B, "celery": version}.

    celery_bench.py roundtrip --count N --warmup W --queue Q
        W then N sequential `celeriac.add.apply_async((i, 1), queue=Q).get(timeout=10)`.
        Prints one JSON line: {"latencies": [seconds, ...]} (the N timed ones).

    celery_bench.py canvas --chord N --chain M --queue Q [--timeout S]
        `chord([add.s(i, i) for i in range(N)], tsum.s())` then `chain(add.s(0, 0), *[add.s(1)] * (M - 1))`,
        every signature routed to Q, each timed from apply_async to its last result (`.get()`); either
        is skipped when 0. Prints one JSON line:
        {"chord_seconds": S, "chain_seconds": S, "chain_built": M, "celery": version}.

Configuration: see benchtasks.py. Exit status 1 with a message on stderr on any error.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import celery  # noqa: E402
from benchtasks import add, noop, tsum  # noqa: E402
from celery import chain, chord  # noqa: E402


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


def cmd_canvas(ns):
    out = {'celery': celery.__version__}
    if ns.chord:
        n = ns.chord
        workflow = chord([add.s(i, i).set(queue=ns.queue) for i in range(n)], tsum.s().set(queue=ns.queue))
        started = time.perf_counter()
        value = workflow.apply_async().get(timeout=ns.timeout)
        out['chord_seconds'] = time.perf_counter() - started
        if value != n * (n - 1):
            raise RuntimeError(f'the chord of {n} returned {value!r}')
    if ns.chain:
        m = ns.chain
        # Built flat (chain(*sigs)): chaining with | would nest and recurse m deep.
        steps = [add.s(0, 0).set(queue=ns.queue)] + [add.s(1).set(queue=ns.queue) for _ in range(m - 1)]
        workflow = chain(*steps)
        started = time.perf_counter()
        value = workflow.apply_async().get(timeout=ns.timeout)
        out['chain_seconds'] = time.perf_counter() - started
        if value != m - 1:
            raise RuntimeError(f'the chain of {m} returned {value!r}')
        out['chain_built'] = m
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(prog='celery_bench.py')
    sub = p.add_subparsers(dest='cmd', required=True)
    for name, func in (('publish', cmd_publish), ('roundtrip', cmd_roundtrip)):
        s = sub.add_parser(name)
        s.add_argument('--count', type=int, required=True)
        s.add_argument('--warmup', type=int, default=0)
        s.add_argument('--queue', required=True)
        s.set_defaults(func=func)
    s = sub.add_parser('canvas')
    s.add_argument('--chord', type=int, default=0)
    s.add_argument('--chain', type=int, default=0)
    s.add_argument('--queue', required=True)
    s.add_argument('--timeout', type=float, default=600)
    s.set_defaults(func=cmd_canvas)
    ns = p.parse_args()
    try:
        ns.func(ns)
    except Exception as e:  # one line for the harness
        print(f'celery_bench.py: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
