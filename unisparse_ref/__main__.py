"""``python -m unisparse_ref COMMAND``: see :mod:`unisparse_ref.cli`."""

import sys

from .cli import main

sys.exit(main())
