#!/usr/bin/env python3
"""Act as a real Python Celery client for celeriac's interop tests.

Uses the app from pytasks.py, so it is configured by the same environment
variables (CELERY_BROKER_URL, CELERY_RESULT_BACKEND, CELERY_DEFAULT_QUEUE).

    client.py send NAME [--args JSON] [--kwargs JSON] [--queue Q]
                        [--countdown S] [--expires S] [--task-id ID]
                        [--priority N]
        Publish one task by name (app.send_task); prints the task id.

    client.py get ID [--timeout S]
        Wait for the result (default timeout 30 s) and print ONE JSON line:
            {"state": ..., "result": ..., "exc_type": ..., "exc_message": ...,
             "traceback": ...}
        Success: result is the return value, exc_* and traceback are null.
        Failure (or revoked...): AsyncResult.get(propagate=True) raised; the
        exception Python rebuilt from the backend is reported as exc_type =
        type(e).__name__ and exc_message = str(e); traceback is the stored
        traceback text; result is null. Exit status 0 in both cases.
        Timeout: same line with exc_type "TimeoutError" and the state the
        backend reports (e.g. PENDING); exit status 2.

    client.py revoke ID [--terminate]
        app.control.revoke(ID): broadcast the revoke to every worker (no
        reply awaited, as Celery's default); prints the id.

    client.py send-many NAME COUNT [--args JSON] [--kwargs JSON] [--queue Q]
        Publish COUNT identical tasks as fast as possible over one producer;
        prints the ids, one per line, in publish order.

    client.py batch CALLS [--queue Q] [--timeout S]
        Send every call of CALLS (a JSON list of [NAME, ARGS] pairs) first,
        then wait for their results in REVERSE order, all in this one process
        (as the rpc:// backend needs: results come to the sender's reply
        queue, and later ones arrive while an earlier one is waited on).
        Prints one JSON line per call, in the order of CALLS, as `get` does
        plus "id". Exit status 2 if any result timed out.

    client.py numbers [--queue Q] [--timeout S]
        Send celeriac.echo, celeriac.add and celeriac.flaky calls with big
        integers and extreme floats (NaN and the infinities included), wait
        for every result, and print ONE JSON line: a list of
            {"case": ..., "want": <json.dumps of what Python computes>,
             "got": <json.dumps of the value get() returned, or null>,
             "exc_type": ..., "exc_message": ...}
        "want" is null where celeriac must refuse the value (a Rust-typed
        argument that cannot hold it).

Exit status 1 (and a message on stderr) on usage or connection errors.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pytasks import app  # noqa: E402


def _json_arg(text, kind):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f'client.py: --{kind} is not valid JSON: {e}')
    if kind == 'args' and not isinstance(value, list):
        raise SystemExit('client.py: --args must be a JSON array')
    if kind == 'kwargs' and not isinstance(value, dict):
        raise SystemExit('client.py: --kwargs must be a JSON object')
    return value


def cmd_send(ns):
    options = {}
    if ns.queue is not None:
        options['queue'] = ns.queue
    if ns.countdown is not None:
        options['countdown'] = ns.countdown
    if ns.expires is not None:
        options['expires'] = ns.expires
    if ns.task_id is not None:
        options['task_id'] = ns.task_id
    if ns.priority is not None:
        options['priority'] = ns.priority
    result = app.send_task(ns.name, args=_json_arg(ns.args, 'args'),
                           kwargs=_json_arg(ns.kwargs, 'kwargs'), **options)
    print(result.id, flush=True)
    return 0


def cmd_send_many(ns):
    args = _json_arg(ns.args, 'args')
    kwargs = _json_arg(ns.kwargs, 'kwargs')
    options = {'queue': ns.queue} if ns.queue is not None else {}
    ids = []
    with app.producer_or_acquire() as producer:
        for _ in range(ns.count):
            ids.append(app.send_task(ns.name, args=args, kwargs=kwargs,
                                     producer=producer, **options).id)
    sys.stdout.write(''.join(i + '\n' for i in ids))
    sys.stdout.flush()
    return 0


def cmd_revoke(ns):
    app.control.revoke(ns.id, terminate=ns.terminate)
    print(ns.id, flush=True)
    return 0


def _outcome(res, timeout):
    """Wait for `res`; returns (the JSON-able outcome, exit status)."""
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    out = {'state': None, 'result': None, 'exc_type': None,
           'exc_message': None, 'traceback': None}
    status = 0
    try:
        value = res.get(timeout=timeout, propagate=True,
                        disable_sync_subtasks=False)
        out['result'] = value
    except CeleryTimeoutError as e:
        out['exc_type'] = 'TimeoutError'
        out['exc_message'] = str(e)
        status = 2
    except Exception as e:  # the exception Celery rebuilt from the backend
        out['exc_type'] = type(e).__name__
        out['exc_message'] = str(e)
        out['traceback'] = res.traceback
    out['state'] = res.state
    return out, status


def cmd_batch(ns):
    calls = json.loads(ns.calls)
    if not isinstance(calls, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[1], list)
            for c in calls):
        raise SystemExit('client.py: CALLS must be a JSON list of '
                         '[NAME, ARGS] pairs')
    options = {'queue': ns.queue} if ns.queue is not None else {}
    sent = [app.send_task(name, args=args, **options) for name, args in calls]
    outcomes = [None] * len(sent)
    status = 0
    for i in reversed(range(len(sent))):
        out, st = _outcome(sent[i], ns.timeout)
        outcomes[i] = dict(out, id=sent[i].id)
        status = max(status, st)
    for out in outcomes:
        print(json.dumps(out, default=repr), flush=True)
    return status


def cmd_get(ns):
    res = app.AsyncResult(ns.id)
    out, status = _outcome(res, ns.timeout)
    print(json.dumps(out, default=repr), flush=True)
    # A result still pending (timeout) is unsubscribed by AsyncResult.__del__
    # during interpreter shutdown, which prints a spurious ImportError trace;
    # unsubscribe now while the interpreter is intact.
    try:
        res.backend.remove_pending_result(res)
    except Exception:
        pass
    return status


BIG = [2**64 + 1, 2**64, 2**64 - 1, -(2**64), 2**63, 2**63 - 1, -(2**63),
       -(2**63) - 1, 10**30, -(10**30), 2**70, 10**400, 0, -1]
FLOATS = [123456789.123456789, 0.1, 0.1 + 0.2, 5e-324, -5e-324,
          2.2250738585072014e-308, 1.7976931348623157e308,
          -1.7976931348623157e308, 1e16, 1e15, 1e22, 1e23, 1e-5, -0.0, 0.0,
          2113325745016023.25, float('nan'), float('inf'), float('-inf')]
NESTED = {'big': BIG, 'floats': FLOATS,
          'deep': [{'k': 10**30, 'f': [0.1, float('nan')]}, -(2**63) - 1]}


def numbers_cases():
    """(case, task name, args, kwargs, want) with want = json.dumps of what a
    Python worker returns, or None where celeriac must refuse the value."""
    cases = [('echo %s' % json.dumps(v), 'celeriac.echo', [v], {}, json.dumps(v))
             for v in BIG + FLOATS]
    cases.append(('echo nested', 'celeriac.echo', [[BIG, FLOATS]], {},
                  json.dumps([BIG, FLOATS])))
    cases.append(('echo kwargs', 'celeriac.echo', [], {'value': NESTED},
                  json.dumps(NESTED)))
    adds = [(2**63 - 1, 1), (-(2**63), -1), (2**64 + 1, 2**64 + 1),
            (10**30, -1), (10**400, 10**400), (0.1, 0.2), (1, 0.5),
            (2**63 - 1, 0.0), (1e16, 1), (1.7976931348623157e308,
            1.7976931348623157e308), (float('nan'), 1), (-0.0, -0.0),
            (5e-324, 5e-324), (float('inf'), 1)]
    cases += [('add %s %s' % (json.dumps(x), json.dumps(y)), 'celeriac.add',
               [x, y], {}, json.dumps(x + y)) for x, y in adds]
    # A retried task carries its arguments unchanged through two retries.
    cases.append(('flaky retried', 'celeriac.flaky', [2], {'value': NESTED},
                  json.dumps(NESTED)))
    # Rust-typed arguments that cannot hold the value: refused, not changed.
    cases.append(('flaky 2**70', 'celeriac.flaky', [2**70], {}, None))
    cases.append(('flaky 1.5', 'celeriac.flaky', [1.5], {}, None))
    cases.append(('sleep 10**400', 'celeriac.sleep', [10**400], {}, None))
    cases.append(('add 10**400 0.5', 'celeriac.add', [10**400, 0.5], {}, None))
    return cases


def cmd_numbers(ns):
    options = {'queue': ns.queue} if ns.queue is not None else {}
    sent = [(case, app.send_task(name, args=args, kwargs=kwargs, **options), want)
            for case, name, args, kwargs, want in numbers_cases()]
    report = []
    for case, res, want in sent:
        row = {'case': case, 'want': want, 'got': None, 'exc_type': None,
               'exc_message': None}
        try:
            row['got'] = json.dumps(res.get(timeout=ns.timeout))
        except Exception as e:
            row['exc_type'] = type(e).__name__
            row['exc_message'] = str(e)
        report.append(row)
    print(json.dumps(report), flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog='client.py', description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)

    s = sub.add_parser('send', help='publish one task; prints its id')
    s.add_argument('name')
    s.add_argument('--args', default='[]', help='JSON array (default [])')
    s.add_argument('--kwargs', default='{}', help='JSON object (default {})')
    s.add_argument('--queue')
    s.add_argument('--countdown', type=float)
    s.add_argument('--expires', type=float, help='seconds from now')
    s.add_argument('--task-id')
    s.add_argument('--priority', type=int)
    s.set_defaults(func=cmd_send)

    g = sub.add_parser('get', help='wait for a result; prints one JSON line')
    g.add_argument('id')
    g.add_argument('--timeout', type=float, default=30.0)
    g.set_defaults(func=cmd_get)

    r = sub.add_parser('revoke', help='app.control.revoke(ID)')
    r.add_argument('id')
    r.add_argument('--terminate', action='store_true')
    r.set_defaults(func=cmd_revoke)

    m = sub.add_parser('send-many', help='publish COUNT tasks; prints ids')
    m.add_argument('name')
    m.add_argument('count', type=int)
    m.add_argument('--args', default='[]', help='JSON array (default [])')
    m.add_argument('--kwargs', default='{}', help='JSON object (default {})')
    m.add_argument('--queue')
    m.set_defaults(func=cmd_send_many)

    b = sub.add_parser('batch', help='send calls, wait in reverse order')
    b.add_argument('calls', help='JSON list of [NAME, ARGS] pairs')
    b.add_argument('--queue')
    b.add_argument('--timeout', type=float, default=30.0)
    b.set_defaults(func=cmd_batch)

    n = sub.add_parser('numbers', help='big integers and extreme floats '
                       'through celeriac tasks; prints one JSON report')
    n.add_argument('--queue')
    n.add_argument('--timeout', type=float, default=30.0)
    n.set_defaults(func=cmd_numbers)

    ns = p.parse_args(argv)
    try:
        return ns.func(ns)
    except SystemExit:
        raise
    except Exception as e:
        print(f'client.py: {type(e).__name__}: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
