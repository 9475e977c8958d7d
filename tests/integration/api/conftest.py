"""The consumer API tests: a real runtime and API server per test (``api_harness``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # api_harness
