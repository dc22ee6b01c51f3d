import sys

from saelib.cli import main

sys.exit(main())
