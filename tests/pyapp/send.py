"""Publish tasks of the test app without waiting for them; print their ids as a JSON list.

    PYAPP_BROKER=... python send.py QUEUE[,QUEUE...] TASK ARGS_JSON [COUNT]

COUNT messages (default 1) of `pyapp.TASK` with the JSON list ARGS_JSON as arguments go to the
queues in turn. The supervision tests read the results from the backend themselves.
"""

import json
import sys

import pyapp


def main(queues, task, args, count):
    queues = queues.split(",")
    task = pyapp.app.tasks["pyapp." + task]
    ids = [task.apply_async(args=args, queue=queues[i % len(queues)]).id for i in range(count)]
    print(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
