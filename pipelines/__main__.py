"""`python -m pipelines --home H [-i N -a host:port -a host:port] [--stop-at-end]`."""

import sys

from pipelines.run import main

sys.exit(main())
