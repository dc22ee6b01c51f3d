"""``python -m saelib.book.exercises notebooks --out student/``, the same as ``saelib student-copy``."""

import sys

from saelib.book.exercises.student_copy import main

sys.exit(main())
