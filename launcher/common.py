"""What every command module shares: exit codes and "load the spec or exit 2".

Kept apart from `launcher.cli` so `launcher.commands` (imported by the parser on use)
never imports the parser back (docs/architecture.md#layers-and-the-dependency-rule).
"""

import sys
from typing import TYPE_CHECKING

from nextbest.settings import Settings

if TYPE_CHECKING:
    from nextbest.spec.models import Spec

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


def spec_or_exit(settings: Settings) -> "Spec":
    """Load the spec or exit 2 with every problem (commands need a valid spec)."""
    from nextbest.spec.loader import SpecError, load_spec

    try:
        return load_spec(settings.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from None
