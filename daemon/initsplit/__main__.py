"""`python3 -m initsplit`: the same as the `initsplit` command."""

import sys

from .cli import main

sys.exit(main())
