"""A module that does not import (a test of --python-app's refusal)."""

import this_module_does_not_exist  # noqa: F401
