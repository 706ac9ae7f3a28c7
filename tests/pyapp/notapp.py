"""Imports fine, but `app` is not a Celery app (a test of --python-app's refusal)."""

app = object()
