"""`python -m service.probing.exported`: the dry run's subprocess entry point (`dryrun.main`)."""

import sys

from service.probing.exported.dryrun import main

if __name__ == "__main__":
    sys.exit(main())
