#!/usr/bin/env python3
"""Send Celery canvas workflows from a real Python Celery client, for celeriac's tests.

Uses the app of pytasks.py (CELERY_BROKER_URL, CELERY_RESULT_BACKEND). Every signature is
routed to the queue given with --queue (or, per task-name prefix, to --py-queue for the `py.*`
tasks of a Python worker), so the workers under test get every step.

    canvas_client.py CASE --queue Q [--py-queue P] [--timeout S] [--steps N]

Prints ONE JSON line: {"case": CASE, "checks": {name: {"want": ..., "got": ...}}}. A check
whose "got" differs from its "want" is a failure the test reports. Exit status 0 whatever the
checks say; 1 on usage errors, 2 when a result did not arrive in time (the line then says which).

Cases: chain3, link, link_error, errback_chain, unregistered, group100, chord100, chord_fail, nested,
group_of_chains, builtins, mixed_chain, mixed_chord.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from celery import chain, chord, group  # noqa: E402
from celery.canvas import xmap, xstarmap  # noqa: E402
from celery.result import AsyncResult, GroupResult, ResultSet  # noqa: E402

from pytasks import app  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument('case')
    p.add_argument('--queue', required=True)
    p.add_argument('--py-queue')
    p.add_argument('--timeout', type=float, default=60)
    p.add_argument('--group-id', help='restore_group: the id of a group saved by celeriac')
    a = p.parse_args()
    checks = {}

    def sig(name, *args, immutable=False, **kw):
        q = a.py_queue if name.startswith('py.') and a.py_queue else a.queue
        s = app.signature(name, args=args, kwargs=kw, immutable=immutable)
        return s.set(queue=q)

    def check(name, want, got):
        checks[name] = {'want': want, 'got': got}

    def get(result):
        return result.get(timeout=a.timeout, propagate=False)

    def state(task_id):
        return AsyncResult(task_id, app=app).state

    def failure(result):
        """`[type name, str(exc)]` of a failed result, as Python rebuilds it."""
        result.get(timeout=a.timeout, propagate=False)
        exc = result.result
        return [type(exc).__name__, str(exc)]

    case = a.case
    if case == 'chain3':
        c = chain(sig('celeriac.add', 1, 2), sig('celeriac.add', 10), sig('celeriac.add', 100))
        r = c.apply_async()
        check('result', 113, get(r))
        check('parent', 13, get(r.parent))
        check('grandparent', 3, get(r.parent.parent))
        first = AsyncResult(r.parent.parent.id, app=app)
        check('first.children', [r.parent.id], [ch.id for ch in (first.children or [])])
    elif case == 'link':
        cb = sig('celeriac.add', 10).freeze()
        cb_sig = sig('celeriac.add', 10).set(task_id=cb.id)
        eb = sig('celeriac.echo').freeze()
        r = app.signature('celeriac.add', args=(2, 3)).set(queue=a.queue).apply_async(
            link=cb_sig, link_error=sig('celeriac.echo').set(task_id=eb.id))
        check('result', 5, get(r))
        check('callback', 15, get(AsyncResult(cb.id, app=app)))
        check('children', [cb.id], [ch.id for ch in (AsyncResult(r.id, app=app).children or [])])
        check('callback.parent_id', r.id, AsyncResult(cb.id, app=app)._get_task_meta().get('parent_id'))
        check('errback not sent', 'PENDING', state(eb.id))
    elif case == 'link_error':
        eb = sig('celeriac.echo').freeze()
        cb = sig('celeriac.add', 1).freeze()
        r = sig('celeriac.fail', 'boom').apply_async(
            link_error=sig('celeriac.echo').set(task_id=eb.id), link=sig('celeriac.add', 1).set(task_id=cb.id))
        check('failure', ['RuntimeError', 'boom'], failure(r))
        check('errback got the failed id', r.id, get(AsyncResult(eb.id, app=app)))
        check('callback not sent', 'PENDING', state(cb.id))
    elif case == 'errback_chain':
        eb = sig('celeriac.echo').freeze()
        last = sig('celeriac.add', 5).freeze()
        c = chain(sig('celeriac.add', 1, 1), sig('celeriac.fail', 'halfway', immutable=True),
                  sig('celeriac.add', 5).set(task_id=last.id))
        r = c.apply_async(link_error=sig('celeriac.echo').set(task_id=eb.id))
        failed = r.parent
        check('failed step', ['RuntimeError', 'halfway'], failure(failed))
        check('first step', 2, get(r.parent.parent))
        check('errback got the failed id', failed.id, get(AsyncResult(eb.id, app=app)))
        check('later step failed, never ran', ['FAILURE', 'RuntimeError', 'halfway'],
              [state(last.id)] + failure(AsyncResult(last.id, app=app)))
    elif case == 'unregistered':
        # A task no worker has, in a chain and in a chord: the workflow fails, nothing hangs.
        eb = sig('celeriac.echo').freeze()
        last = sig('celeriac.add', 5).freeze()
        c = chain(sig('celeriac.add', 1, 1), sig('no.such.task'), sig('celeriac.add', 5).set(task_id=last.id))
        r = c.apply_async(link_error=sig('celeriac.echo').set(task_id=eb.id))
        check('failed step', 'NotRegistered', failure(r.parent)[0])
        check('errback got the failed id', r.parent.id, get(AsyncResult(eb.id, app=app)))
        check('later step failed', ['FAILURE', 'NotRegistered'], [state(last.id), failure(AsyncResult(last.id, app=app))[0]])
        ch = chord([sig('celeriac.add', 1, 1), sig('no.such.task', 1)], sig('celeriac.tsum')).apply_async()
        got = failure(ch)
        check('chord body fails', ['ChordError', True], [got[0], got[1].startswith('Dependency ')])
    elif case == 'group100':
        g = group(sig('celeriac.add', i, i) for i in range(100))
        r = g.apply_async()
        check('results', [2 * i for i in range(100)], r.get(timeout=a.timeout))
        r.save()
        restored = GroupResult.restore(r.id, app=app)
        check('GroupResult.restore(...).get()', [2 * i for i in range(100)], restored.get(timeout=a.timeout))
        check('ResultSet.get()', [0, 2, 4], ResultSet(r.results[:3], app=app).get(timeout=a.timeout))
        check('group ids', [r.id] * 3, [AsyncResult(x.id, app=app)._get_task_meta().get('group_id')
                                         for x in r.results[:3]])
    elif case == 'chord100':
        c = chord((sig('celeriac.add', i, i) for i in range(100)), sig('celeriac.tsum'))
        r = c.apply_async()
        check('body', sum(2 * i for i in range(100)), get(r))
        check('header', [2 * i for i in range(100)], r.parent.get(timeout=a.timeout))
    elif case == 'chord_fail':
        eb = sig('celeriac.echo').freeze()
        body = sig('celeriac.tsum').on_error(sig('celeriac.echo').set(task_id=eb.id))
        c = chord([sig('celeriac.add', 1, 1), sig('celeriac.fail', 'x'), sig('celeriac.add', 2, 2)], body)
        r = c.apply_async()
        got = failure(r)
        failed_id = r.parent.results[1].id
        check('body failure', ['ChordError', f"Dependency {failed_id} raised RuntimeError('x')"], got)
        check('body errback got the body id', r.id, get(AsyncResult(eb.id, app=app)))
    elif case == 'nested':
        c = chain(sig('celeriac.add', 1, 1), group(sig('celeriac.add', 10), sig('celeriac.add', 20)),
                  sig('celeriac.tsum'), group(sig('celeriac.add', 1), sig('celeriac.add', 2)), sig('celeriac.tsum'))
        r = c.apply_async()
        check('result', 71, get(r))
    elif case == 'group_of_chains':
        g = group(chain(sig('celeriac.add', 1, 1), sig('celeriac.add', 2)),
                  chain(sig('celeriac.add', 3, 3), sig('celeriac.add', 4)))
        r = g.apply_async()
        check('results', [4, 10], r.get(timeout=a.timeout))
    elif case == 'builtins':
        # The builtin tasks Celery's canvas sends as messages (celery/app/builtins.py).
        echo, add = sig('celeriac.echo'), sig('celeriac.add')
        mapped = xmap(echo, [1, 'two', [3]], app=app).set(queue=a.queue).apply_async()
        check('map', [1, 'two', [3]], mapped.get(timeout=a.timeout))
        starred = xstarmap(add, [(1, 1), (2, 2), (3, 3)], app=app).set(queue=a.queue).apply_async()
        check('starmap', [2, 4, 6], starred.get(timeout=a.timeout))
        r = app.send_task('celery.chunks', kwargs={'task': dict(add), 'it': [[i, i] for i in range(10)], 'n': 3}, queue=a.queue)
        from celery.result import result_from_tuple
        parts = result_from_tuple(r.get(timeout=a.timeout), app)
        check('chunks', [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]], parts.get(timeout=a.timeout))
        check('chunks children', [parts.id], [ch.id for ch in (AsyncResult(r.id, app=app).children or [])])
        check('accumulate', 2, app.send_task('celery.accumulate', args=[1, 2, 3], kwargs={'index': 1}, queue=a.queue).get(timeout=a.timeout))
        check('accumulate all', [1, 2, 3], app.send_task('celery.accumulate', args=[1, 2, 3], queue=a.queue).get(timeout=a.timeout))
        chained = chain(sig('celeriac.add', 2, 3), sig('celery.accumulate', immutable=False))
        check('accumulate in a chain', [5], chained.apply_async().get(timeout=a.timeout))
    elif case == 'restore_group':
        # A group celeriac saved (GroupResult::save), restored and read by Python.
        restored = GroupResult.restore(a.group_id, app=app)
        check('restored', True, restored is not None)
        check('values', [2 * i for i in range(5)], restored.get(timeout=a.timeout) if restored else None)
    elif case == 'save_group':
        # A group Python saved, for celeriac to restore: its id goes out as "got" of 'id'.
        r = group(sig('celeriac.add', i, i) for i in range(5)).apply_async()
        r.get(timeout=a.timeout)
        r.save()
        check('id', r.id, r.id)
    elif case == 'mixed_chain':
        # Steps alternate between the celeriac worker (--queue) and a Python worker (--py-queue).
        c = chain(sig('celeriac.add', 1, 2), sig('py.add', 10), sig('celeriac.add', 100), sig('py.add', 1000))
        r = c.apply_async()
        check('result', 1113, get(r))
    elif case == 'mixed_chord':
        header = [sig('celeriac.add' if i % 2 else 'py.add', i, i) for i in range(20)]
        c = chord(header, sig('py.tsum'))
        r = c.apply_async()
        check('body', sum(2 * i for i in range(20)), get(r))
    else:
        print(f'unknown case {case!r}', file=sys.stderr)
        sys.exit(1)
    print(json.dumps({'case': case, 'checks': checks}))


if __name__ == '__main__':
    try:
        main()
    except Exception as e:  # a timeout or a broken connection: say which
        print(json.dumps({'error': f'{type(e).__name__}: {e}'}))
        sys.exit(2)
