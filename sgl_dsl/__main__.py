"""``python -m sgl_dsl serve ...``: the ``sgl-dsl`` command (see :mod:`sgl_dsl.cli`)."""

import sys

from sgl_dsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
