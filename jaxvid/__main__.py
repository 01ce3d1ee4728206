"""`python -m jaxvid generate ...`: the `jaxvid` command."""
import sys

from jaxvid.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
