"""`python -m kata_vmcache` is `kata-vmcache`."""

import sys

from .cli import main

sys.exit(main())
