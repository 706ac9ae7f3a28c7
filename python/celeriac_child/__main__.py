"""``python -m celeriac_child MODULE:ATTR``: what a celeriac worker runs as each pool child."""

import sys

from celeriac_child import main

sys.exit(main(sys.argv[1:]))
