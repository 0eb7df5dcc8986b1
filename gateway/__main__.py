"""``python -m tritonembed.gateway``."""

import sys

from tritonembed.gateway.cli import main

sys.exit(main())
