"""``python -m celeriac_child MODULE:ATTR``: what a celeriac worker runs as each pool child;
``python -m celeriac_child --describe MODULE:ATTR``: the app's configuration as JSON, which the
worker reads once before its pool starts (``describe.py``)."""

import sys

if len(sys.argv) == 3 and sys.argv[1] == "--describe":
    from celeriac_child.describe import main as describe

    sys.exit(describe(sys.argv[2]))

from celeriac_child import main

sys.exit(main(sys.argv[1:]))
