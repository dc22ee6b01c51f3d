import sys

from saelib.book.build import main

sys.exit(main())
