import sys

from nextbest.cli import main

sys.exit(main())
