"""`pyarrow.compute` typed as Any: its kernels (min, unique, is_in...) are generated at
import time, so a static checker cannot see them."""

from typing import Any

import pyarrow.compute as _compute

pc: Any = _compute
