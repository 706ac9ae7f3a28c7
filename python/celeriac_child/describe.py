"""``python -m celeriac_child --describe MODULE:ATTR``: the app's configuration, for the worker.

Before it starts its pool, a celeriac worker runs this once to learn what the Celery app's
``app.conf`` says about the worker: its broker and result backend, the queues Celery's worker
would consume without ``-Q``, its worker settings, and every setting changed from Celery's
defaults (the worker names those it does not act on in one start-up warning). It prints one JSON
object on its standard output and exits 0; an app that cannot be loaded is ``load_failure``'s
text on standard error (one line, then the traceback of an error in the app's own code) and exit
3, as a pool child's; an interpreter without ``celery`` exits 4.

Celery's sources followed: ``celery/app/utils.py`` (``Settings``: ``broker_url`` and
``result_backend`` with their environment variables and older names, ``table()`` for what was
changed; the worker reads its settings from those changes, an unchanged one being Celery's
default, which is celeriac's), ``celery/app/defaults.py`` (the defaults and the older names), ``celery/app/amqp.py``
(``Queues``: without ``-Q`` the worker consumes ``task_queues``, else ``task_default_queue``;
``task_routes`` only routes messages, it adds no queue to consume), kombu's ``Queue`` (what a
queue's declaration may ask for: ``declarations`` lists, per queue, what celeriac, which declares
and consumes a durable queue bound by its own name, does not reproduce).
"""

import json
import os
import sys
import traceback

def _plain(value):
    """``value`` as JSON can carry it (a number, text, a list of them), else its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _changed(conf):
    """``[written, name, value]`` for each Celery setting the app changed from Celery's
    default: the name as the app wrote it (an older upper-case name is kept), its current name
    and its value (as JSON can carry it)."""
    from celery.app.defaults import _TO_NEW_KEY, DEFAULTS

    out = []
    for written in conf.table(with_defaults=False, censored=False):
        name = _TO_NEW_KEY.get(written, written)
        if name not in DEFAULTS:
            continue  # not a Celery setting (the app's own, or Celery's bookkeeping)
        value, default = conf.get(name), DEFAULTS[name]
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
            value, default = list(value), list(default)
        if value != default:
            out.append([written, name, _plain(conf.get(name))])
    return sorted(out)


def _declaration(queue):
    """What ``queue``'s declaration asks for beyond a plain durable queue bound by its own name
    (which is what celeriac declares and consumes), as ``key=value`` words; each queue argument
    is one ``argument:KEY=VALUE`` word (the worker leaves out those its broker URL reproduces)."""
    parts = []
    if queue.exchange is not None and queue.exchange.type != "direct":
        parts.append("exchange_type=%s" % queue.exchange.type)
    parts.extend("argument:%s=%s" % kv for kv in sorted((queue.queue_arguments or {}).items()))
    if len(queue.bindings) > 1:
        parts.append("bindings=%d" % len(queue.bindings))
    if not queue.durable:
        parts.append("durable=False")
    parts.extend("%s=True" % flag for flag in ("auto_delete", "exclusive", "no_declare") if getattr(queue, flag))
    return parts


def _url(value):
    """A broker or backend URL as one string; a list of failover URLs joined with ``;``."""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return None if value is None else str(value)


def describe(spec):
    """The configuration of the app ``spec`` names, as the worker reads it."""
    import celery

    from celeriac_child import load_app

    app = load_app(spec)
    app.loader.import_default_modules()
    app.finalize(auto=True)
    conf = app.conf
    queues = list(app.amqp.queues.consume_from)
    return {
        "celery": celery.__version__,
        "broker_url": _url(conf.broker_url),
        "result_backend": _url(conf.result_backend),
        "queues": queues,
        "queues_from": "task_queues" if conf.task_queues else "task_default_queue",
        "declarations": {q.name: d for q in app.amqp.queues.values() for d in [_declaration(q)] if d},
        "changed": _changed(conf),
    }


def main(spec):
    """Print the description of ``spec``; the process's exit code."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the app prints on import goes to stderr, not into the JSON
    try:
        import celery  # noqa: F401
    except BaseException:
        traceback.print_exc()
        return 4
    try:
        text = json.dumps(describe(spec))
    except BaseException as exc:
        from celeriac_child import load_failure

        sys.stderr.write(load_failure(spec, exc) + "\n")
        return 3
    out.write(text + "\n")
    out.flush()
    return 0
