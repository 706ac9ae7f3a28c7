"""celeriac's Python pool child.

A celeriac worker started with ``--python-app MODULE:ATTR`` runs one of these per pool slot
(``python -m celeriac_child MODULE:ATTR``). The worker (the supervisor) consumes from the broker,
stores results and carries out workflows; this process only imports the Celery app once and runs
task bodies, one at a time, as Celery's worker runs them (``celery/app/trace.py``): the request
context, the signals, ``self.retry()``, autoretry, the result encoded with kombu's JSON.

The pipe protocol (the same as celeriac's Rust children speak; see ``python/README.md``): every
frame is a 4-byte big-endian length and that many bytes of JSON. The supervisor writes to this
process's stdin; this process answers on its original stdout, which it keeps for frames alone
(file descriptor 1 is pointed at stderr, so a task that prints cannot break the stream).
Logging is set up as Celery's worker sets up its pool processes' (``setup_logging``), in the
worker's own line format: what tasks log and print is a log line with the task's id and name.

Nothing here connects to the broker: whatever a task publishes (``delay``, ``apply_async``,
``self.retry()``) is handed to the supervisor in a ``publish`` frame, and the task waits for the
answer, as a Celery task waits for its publish.
"""

import datetime
import importlib
import io
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
import traceback

__all__ = ["main"]

_LENGTH = struct.Struct(">I")
#: The largest frame accepted, as the supervisor's limit.
MAX_FRAME = 64 << 20

#: Celery task attributes the supervisor acts on, announced with each task.
_ANNOUNCED = (
    "ignore_result",
    "store_errors_even_if_ignored",
    "acks_late",
    "reject_on_worker_lost",
    "retry_on_worker_lost",
    "acks_on_failure",
    "acks_on_failure_or_timeout",
    "acks_on_timeout",
    "time_limit",
    "soft_time_limit",
    "rate_limit",
    "track_started",
    "max_retries",
    "default_retry_delay",
    "queue",
)


class Pipe:
    """Frames over the supervisor's pipes."""

    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile

    def _read_exact(self, n):
        chunks = []
        while n:
            chunk = self.rfile.read(n)
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read(self):
        """The next frame, decoded; ``None`` when the supervisor closed the pipe."""
        head = self._read_exact(_LENGTH.size)
        if head is None:
            return None
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FRAME:
            raise ValueError("frame of %d bytes" % length)
        body = self._read_exact(length)
        if body is None:
            return None
        return json.loads(body)

    def write(self, frame):
        body = json.dumps(frame).encode("utf-8")
        try:
            self.wfile.write(_LENGTH.pack(len(body)) + body)
            self.wfile.flush()
        except (OSError, ValueError) as exc:  # the frame pipe is gone (a task closed it?): exit
            sys.stderr.write("celeriac child: cannot write frames to the supervisor (fd %d): %s; exiting\n"
                             % (self.wfile.fileno(), exc))
            raise SystemExit(1)


class AppSpecError(Exception):
    """``MODULE:ATTR`` names no Celery app: no such module, no such attribute, or not an app.
    Its message is the whole story (no traceback is shown for it)."""


def load_app(spec):
    """The Celery app named by ``MODULE:ATTR`` (or ``MODULE``, whose ``app`` or ``celery`` is
    taken, as ``celery -A`` does). Raises ``AppSpecError`` when the spec names no app; an error
    raised by the app's own code while it imports goes through as it is."""
    from celery import Celery

    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppSpecError("no module named %r (is its directory on PYTHONPATH, or the current directory?)"
                               % exc.name) from None
        raise
    if attr:
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise AppSpecError("%s has no attribute %r" % (getattr(obj, "__name__", repr(obj)), part))
            obj = getattr(obj, part)
    else:
        obj = _app_in_module(obj, module_name)
    if not isinstance(obj, Celery):
        raise AppSpecError("%s is not a Celery app (it is %s)" % (spec, type(obj).__name__))
    return obj


def _app_in_module(module, name):
    """The app in ``module`` as ``celery -A MODULE`` finds it (``celery/app/utils.py``,
    ``find_app``): its ``app``, else its ``celery``, else, for a package, the app of its
    ``celery`` submodule (``-A proj`` finds ``proj/celery.py``'s app), else any Celery app among
    its globals; the module itself when there is none."""
    from celery import Celery

    for attr in ("app", "celery"):
        candidate = getattr(module, attr, None)
        if isinstance(candidate, Celery):
            return candidate
    if getattr(module, "__path__", None):
        try:
            submodule = importlib.import_module(name + ".celery")
        except ModuleNotFoundError as exc:
            if exc.name != name + ".celery":
                raise
        else:
            found = _app_in_module(submodule, name + ".celery")
            if isinstance(found, Celery):
                return found
    for value in vars(module).values():
        if isinstance(value, Celery):
            return value
    return module


def _internal_frame(frame):
    """Whether a traceback frame is celeriac_child's or importlib's, not the app's."""
    name = frame.filename
    return (os.path.dirname(os.path.abspath(name)) == os.path.dirname(os.path.abspath(__file__))
            or name.startswith("<frozen importlib") or name == importlib.__file__)


def load_failure(spec, exc):
    """Why ``spec`` could not be loaded: one line, ``cannot load the Celery app SPEC: Type:
    message``; for an error raised by the app's own code, its traceback follows, without
    celeriac_child's and importlib's frames."""
    if isinstance(exc, AppSpecError):
        return "cannot load the Celery app %s: %s" % (spec, exc)
    te = traceback.TracebackException.from_exception(exc)
    last = list(te.format_exception_only())[-1].strip()
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if not _internal_frame(f)])
    return "cannot load the Celery app %s: %s\n%s" % (spec, last, "".join(te.format()).rstrip("\n"))


_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR, "off": logging.CRITICAL + 1}


def _log_level(spec):
    """The Python level of the worker's ``-l`` (``CELERIAC_LOG``: a level, or a filter such as
    ``info,celeriac_amqp=debug``, whose bare level is taken); INFO when it names none."""
    for part in (spec or "").split(","):
        part = part.strip().lower()
        if part and "=" not in part:
            return _LEVELS.get(part, logging.INFO)
    return logging.INFO


class LogFormatter(logging.Formatter):
    """A log record as the worker writes its own lines (``CELERIAC_LOG_FORMAT``): text,
    ``<ts> <LEVEL> task{id=.. name=..}: <logger>: <message>``, or one JSON object with ``ts``,
    ``level``, ``msg``, ``target`` (the logger's name), ``pid`` and, while a task runs,
    ``hostname``, ``task_id`` and ``task_name`` (as Celery's ``TaskFormatter`` adds the task)."""

    def __init__(self, json_lines):
        super().__init__()
        self.json_lines = json_lines

    def format(self, record):
        from celery._state import get_current_task

        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        ts = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(record.levelname, record.levelname)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        task = get_current_task()
        req = task.request if task is not None else None
        in_task = req is not None and req.id is not None
        if self.json_lines:
            line = {"ts": ts, "level": level, "msg": msg, "target": record.name, "pid": os.getpid()}
            if in_task:
                if req.hostname:
                    line["hostname"] = req.hostname
                line.update(task_id=req.id, task_name=task.name)
            return json.dumps(line, separators=(",", ":"))
        span = "task{id=%s name=%s}: " % (req.id, task.name) if in_task else ""
        return "%s %5s %s%s: %s" % (ts, level, span, record.name, msg)


class LogWriter(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the child: each line written becomes a log record of
    ``logger`` at ``level``, as Celery's worker redirects them (``worker_redirect_stdouts``, at
    ``worker_redirect_stdouts_level``, WARNING by default; ``celery/utils/log.py``'s
    ``LoggingProxy``). A partial line waits for its end or a ``flush``."""

    def __init__(self, logger, level):
        super().__init__()
        self.logger, self.level, self.pending = logger, level, ""

    def writable(self):
        return True

    def write(self, text):
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            if line.strip():
                self.logger.log(self.level, line)
        return len(text)

    def flush(self):
        if self.pending.strip():
            self.logger.log(self.level, self.pending)
        self.pending = ""


def setup_logging(app):
    """Log as Celery's worker sets up its pool processes' logging, in the worker's own format: a
    handler on the real stderr for the root logger at the worker's ``-l`` level, and what tasks
    print (``sys.stdout``, ``sys.stderr``) as log lines of ``celery.redirected`` at
    ``worker_redirect_stdouts_level``. An app that connects Celery's ``setup_logging`` signal
    configures logging itself, as with Celery (its receivers are called instead); with
    ``worker_redirect_stdouts = False`` prints are written as they are. Writes to file
    descriptors 1 and 2 that bypass ``sys.stdout`` (C code, subprocesses) stay raw lines."""
    from celery import signals

    level = _log_level(os.environ.get("CELERIAC_LOG"))
    if signals.setup_logging.receivers:
        signals.setup_logging.send(sender=None, loglevel=level, logfile=None, format=None, colorize=False)
    else:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(LogFormatter(os.environ.get("CELERIAC_LOG_FORMAT") == "json"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)
        # Celery's loggers (celery.task is get_task_logger's parent) log through the root.
        for name in ("celery", "celery.task"):
            logging.getLogger(name).propagate = True
    if app.conf.worker_redirect_stdouts:
        redirect = logging.getLevelName(str(app.conf.worker_redirect_stdouts_level).upper())
        redirect = redirect if isinstance(redirect, int) else logging.WARNING
        logger = logging.getLogger("celery.redirected")
        sys.stdout = LogWriter(logger, redirect)
        sys.stderr = LogWriter(logger, redirect)


_STATM = []  # /proc/self/statm, opened once: one pread per task (an open and a read cost ~50 µs)


def _rss_kib():
    try:
        if not _STATM:
            _STATM.append((os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC), os.sysconf("SC_PAGE_SIZE")))
        fd, page = _STATM[0]
        return int(os.pread(fd, 128, 0).split()[1]) * page // 1024
    except (OSError, ValueError, IndexError):
        return 0


def _announce(app):
    tasks = []
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue  # Celery's own tasks: the worker runs those it supports itself.
        options = {}
        for attr in _ANNOUNCED:
            value = getattr(task, attr, None)
            if value is not None:
                options[attr] = value if isinstance(value, (bool, int, float, str)) else str(value)
        tasks.append({"name": name, "options": options})
    return tasks


class Child:
    """One pool child: the app, the pipe, and the task being run."""

    def __init__(self, app, pipe):
        self.app = app
        self.pipe = pipe
        from kombu.utils import json as kjson

        self.kjson = kjson
        self._install_publisher()

    # -- publishing through the supervisor ---------------------------------------------------

    def _install_publisher(self):
        """Route the app's task messages to the supervisor (``amqp.send_task_message`` is the
        one place Celery's ``send_task`` publishes through)."""
        amqp = self.app.amqp
        child = self

        def send_task_message(producer, name, message, exchange=None, routing_key=None, queue=None,
                              event_dispatcher=None, retry=None, retry_policy=None, serializer=None,
                              delivery_mode=None, compression=None, declare=None, headers=None,
                              exchange_type=None, timeout=None, confirm_timeout=None, **kwargs):
            from celery import signals
            from kombu import serialization

            headers2, properties, body, _sent_event = message
            if headers:
                headers2.update(headers)
            if kwargs:
                properties.update(kwargs)
            qname = queue
            if queue is None and exchange is None:
                queue = amqp.default_queue
            if queue is not None:
                if isinstance(queue, str):
                    qname = queue
                else:
                    qname = queue.name
            exchange = getattr(exchange, "name", exchange)
            if not routing_key or exchange in (None, ""):
                exchange, routing_key = "", qname
            if compression:
                sys.stderr.write("celeriac child: compression=%r is not applied to messages a task sends\n"
                                 % (compression,))
            ser = serializer or child.app.conf.task_serializer
            content_type, content_encoding, data = serialization.dumps(body, serializer=ser)
            if content_type != "application/json":
                raise ValueError("celeriac sends task messages as JSON; serializer %r is not supported" % ser)
            if isinstance(data, bytes):
                data = data.decode(content_encoding or "utf-8")
            properties = dict(properties)
            properties.update(content_type=content_type, content_encoding=content_encoding,
                              delivery_mode=delivery_mode or 2)
            signals.before_task_publish.send(
                sender=name, body=body, exchange=exchange, routing_key=routing_key,
                declare=declare, headers=headers2, properties=properties, retry_policy=retry_policy)
            child.pipe.write({"publish": {
                "exchange": exchange or "",
                "routing_key": routing_key,
                "headers": child.kjson.dumps(headers2),
                "properties": child.kjson.dumps(properties),
                "body": data,
            }})
            answer = child.pipe.read()
            if answer is None:
                raise SystemExit(0)
            error = answer.get("published", {}).get("error")
            if error:
                from kombu.exceptions import OperationalError
                raise OperationalError(error)
            signals.after_task_publish.send(sender=name, body=body, headers=headers2,
                                            exchange=exchange, routing_key=routing_key)
            return None

        amqp.send_task_message = send_task_message

    # -- running a task ----------------------------------------------------------------------

    def run(self, req):
        """Run one task; the ``outcome`` of its ``done`` frame, and whether the task emptied its
        request's chain (``self.request.chain = None``, Celery's way to stop a chain)."""
        from billiard.einfo import ExceptionInfo
        from kombu import serialization
        from kombu.exceptions import EncodeError
        from celery import signals
        from celery.app.task import Context
        from celery.app.task import Task as BaseTask
        from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
        from celery.utils.objects import mro_lookup

        name = req["name"]
        task = self.app.tasks.get(name)
        if task is None:
            return _error("NotRegistered", repr(name), "celery.exceptions", None, [name]), False
        # No arguments, the common case, skip kombu's decoder (a new JSONDecoder per call).
        args = [] if req["args"] == "[]" else self.kjson.loads(req["args"])
        kwargs = {} if req["kwargs"] == "{}" else self.kjson.loads(req["kwargs"])
        request = dict(req.get("request") or {})
        request.update(id=req["id"], task=name, retries=req.get("retries", 0),
                       hostname=req.get("hostname"), is_eager=False)
        request.setdefault("root_id", req.get("root_id"))
        request.setdefault("parent_id", req.get("parent_id"))
        request.setdefault("group", req.get("group"))
        ctx = Context(request, args=args, called_directly=False, kwargs=kwargs)
        had_chain = bool(ctx.chain)
        # As Celery's task_has_custom: only a __call__ of the app's own classes counts (Celery's
        # Task.__call__ would run the task under a copy of the request it is given).
        custom_call = mro_lookup(task.__class__, "__call__", stop={BaseTask, object},
                                 monkey_patched=["celery.app.task"]) is not None
        fun = task if custom_call else task.run
        soft = req.get("soft_time_limit")

        def soft_limit(signum, frame):
            # As Celery: its worker logs this line (celery/worker/request.py, on_timeout), and
            # billiard raises the exception with no argument.
            logging.getLogger("celery.worker.request").warning(
                "Soft time limit (%ss) exceeded for %s[%s]", float(soft), name, req["id"])
            raise SoftTimeLimitExceeded()

        task_id = req["id"]
        state, retval, outcome = "FAILURE", None, None
        from celery import _state

        # As Celery's tracer: the context object itself on the task's request stack.
        _state._task_stack.push(task)
        task.request_stack.push(ctx)
        try:
            signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs)
            if task.track_started and not _ignores_result(task, ctx):
                # As Celery's tracer: STARTED stored by the child, through the app's backend.
                task.backend.store_result(task_id, {"pid": os.getpid(), "hostname": ctx.hostname}, "STARTED",
                                          request=ctx)
            if soft:
                signal.signal(signal.SIGALRM, soft_limit)
                signal.setitimer(signal.ITIMER_REAL, float(soft))
            try:
                retval = fun(*args, **kwargs)
            finally:
                if soft:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                text = self.kjson.dumps(retval)
            except Exception:
                text = None
            if text is None:  # the value cannot be stored: FAILURE EncodeError, raised by
                # kombu's serializer as in Celery's worker (``kombu/serialization.py``), so its
                # traceback has the same shape (the encoder's error, then kombu's EncodeError);
                # encoded again outside the first error's handler, which would be chained too
                try:
                    serialization.dumps(retval, serializer="json")
                    raise EncodeError("the value could be encoded only on a second try")
                except EncodeError as err:
                    outcome = _error_of(err, ExceptionInfo().traceback, self.kjson)
                state = "FAILURE"
            else:
                state = "SUCCESS"
                outcome = {"value": {"value": text}}
                task.on_success(retval, task_id, args, kwargs)
                signals.task_success.send(sender=task, result=retval)
        except Ignore as exc:  # nothing stored, the message acknowledged (self.replace() ends so)
            state, retval = "IGNORED", exc
            outcome = _error("Ignore", str(exc), "celery.exceptions", None, None)
        except Reject as exc:  # the message rejected; stored as FAILURE unless requeued
            state, retval = "REJECTED", exc
            outcome = _error("Reject", str(exc), "celery.exceptions", ExceptionInfo().traceback, None)
            outcome["error"]["args"] = _args_json([exc.reason, bool(exc.requeue)], self.kjson)
        except Retry as reason:
            einfo = ExceptionInfo()
            state, retval = "RETRY", reason
            exc = reason.exc if isinstance(reason.exc, BaseException) else reason
            when = reason.when
            countdown = None
            if isinstance(when, (int, float)):
                countdown = float(when)
            elif when is not None and hasattr(when, "timestamp"):
                countdown = max(0.0, when.timestamp() - time.time())
            task.on_retry(exc, task_id, args, kwargs, einfo)
            signals.task_retry.send(sender=task, request=task.request, reason=reason, einfo=einfo)
            outcome = _error_of(exc, einfo.traceback, self.kjson)
            outcome["error"]["retry"] = {"countdown": countdown, "sent": True}
        except BaseException as exc:  # the task's own failure, stored as Celery stores it
            if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not isinstance(exc, SoftTimeLimitExceeded):
                raise
            einfo = ExceptionInfo()
            state, retval = "FAILURE", exc
            task.on_failure(exc, task_id, args, kwargs, einfo)
            signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=args, kwargs=kwargs,
                                      traceback=einfo.tb, einfo=einfo)
            outcome = _error_of(exc, einfo.traceback, self.kjson)
        finally:
            try:
                if state not in ("IGNORED", "REJECTED"):
                    task.after_return(state, retval, task_id, args, kwargs, None)
                signals.task_postrun.send(sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs,
                                          retval=retval, state=state)
            finally:
                task.request_stack.pop()
                _state._task_stack.pop()
        return outcome, had_chain and not ctx.chain


def _ignores_result(task, ctx):
    """The task's ignore_result, unless the message sets it (Celery's get_actual_ignore_result)."""
    asked = ctx.__dict__.get("ignore_result")
    return task.ignore_result if asked is None else bool(asked)


def _error(exc_type, message, module, tb, args):
    error = {"exc_type": exc_type, "message": message, "module": module, "traceback": tb, "retry": None}
    if args is not None:
        error["args"] = json.dumps(args)
    return {"error": error}


def _args_json(args, kjson):
    try:
        return kjson.dumps(list(args))
    except Exception:  # arguments that are not JSON: their reprs, as Celery's ensure_serializable
        return json.dumps([a if isinstance(a, (str, int, float, bool, type(None))) else repr(a) for a in args])


def _error_of(exc, tb, kjson):
    """An exception as Celery stores it: type name, module, ``exc.args``."""
    out = _error(type(exc).__name__, str(exc), type(exc).__module__, tb, None)
    out["error"]["args"] = _args_json(exc.args, kjson)
    return out


def main(argv):
    """Run the child loop; the process's exit code."""
    if len(argv) != 1 or not argv[0]:
        sys.stderr.write("usage: python -m celeriac_child MODULE:ATTR\n")
        return 2
    parent = os.environ.get("CELERIAC_PREFORK_PARENT")
    if parent and os.getppid() != int(parent):
        sys.stderr.write("celeriac child: the supervisor (pid %s) is gone\n" % parent)
        return 1
    # Frames go to the original stdout; anything the tasks print goes to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # The supervisor decides when children stop (they have a process group of their own, so a
    # Ctrl-C does not reach them; a SIGINT sent here anyway is ignored).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = Pipe(os.fdopen(0, "rb"), proto_out)  # buffered: a frame's length and body in one read
    try:
        app = load_app(argv[0])
        app.loader.import_default_modules()
        app.finalize(auto=True)
        child = Child(app, pipe)
    except BaseException as exc:
        reason = load_failure(argv[0], exc)
        sys.stderr.write("celeriac child: %s\n" % reason)
        pipe.write({"failed": {"reason": reason}})
        return 3
    setup_logging(app)
    from celery import signals

    signals.worker_process_init.send(sender=None)
    # Tasks run on this thread: the supervisor reads /proc/<pid>/task/<tid>/ to show what a
    # running task is blocked on.
    pipe.write({"ready": {"pid": os.getpid(), "tasks": _announce(app), "tid": threading.get_native_id()}})
    exitcode = 0
    try:
        while True:
            frame = pipe.read()
            if frame is None or frame == "exit":
                break
            if isinstance(frame, dict) and "run" in frame:
                req = frame["run"]
                outcome, chain_stopped = child.run(req)
                done = {"id": req["id"], "outcome": outcome, "rss_kib": _rss_kib()}
                if chain_stopped:
                    done["chain_stopped"] = True
                pipe.write({"done": done})
    finally:
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=exitcode)
    return exitcode
