"""``python -m jobs.demo.corpus --out DIR --n N --seed S [--workers W] ...``"""

import sys

if __name__ == "__main__":
    # Import by the package name so spawned worker processes unpickle the same functions.
    from jobs.demo.corpus.cli import main

    sys.exit(main())
