"""``python -m jobs.demo``: the main job end to end (see :mod:`jobs.demo.run`)."""

import sys

from jobs.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
