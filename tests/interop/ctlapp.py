"""A tiny Celery app for remote-control tests: no tasks, the broker from `-b`.

    PYTHONPATH=tests/interop target/pyenv/bin/celery -A ctlapp -b amqp://.../vhost inspect ping
"""
from celery import Celery

app = Celery('ctlapp')
