#!/usr/bin/env python3
"""Canvas JSON between Rust and Python, for celeriac's tests (crates/celeriac-cli/tests/canvas_rust.rs).

Uses the app of pytasks.py (CELERY_BROKER_URL, CELERY_RESULT_BACKEND).

    canvas_json.py apply [--timeout S]
        Read a signature's JSON on stdin (as Rust's `Canvas::to_json` writes it), load it with
        `celery.signature`, apply it and wait for it. Prints ONE JSON line:
        {"type": <the signature's class name>, "id": <result id>, "result": <value>}.
    canvas_json.py build --queue Q
        Print `json.dumps` of a chain built in Python, every task routed to Q:
        celeriac.add(1, 2) | celeriac.add(10) | group(celeriac.add(1), celeriac.add(2)) | celeriac.tsum
        (its value is 29).

Exit status 0 on success, 1 on usage errors, 2 when the result did not arrive in time.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from celery import chain, group, signature  # noqa: E402

from pytasks import app  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument('command', choices=['apply', 'build'])
    p.add_argument('--queue')
    p.add_argument('--timeout', type=float, default=60)
    a = p.parse_args()
    if a.command == 'apply':
        sig = signature(json.loads(sys.stdin.read()), app=app)
        r = sig.apply_async()
        try:
            value = r.get(timeout=a.timeout)
        except Exception as e:  # a timeout or the task's own error: say which
            print(json.dumps({'type': type(sig).__name__, 'id': r.id, 'error': f'{type(e).__name__}: {e}'}))
            sys.exit(2)
        print(json.dumps({'type': type(sig).__name__, 'id': r.id, 'result': value}))
    else:
        if not a.queue:
            p.error('build needs --queue')

        def add(*args):
            return app.signature('celeriac.add', args=args).set(queue=a.queue)

        c = chain(add(1, 2), add(10), group(add(1), add(2)), app.signature('celeriac.tsum').set(queue=a.queue))
        print(json.dumps(c))


if __name__ == '__main__':
    main()
