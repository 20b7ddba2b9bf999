"""The benchmark tests: ``bench/`` is a directory of scripts at the repository root,
not an installed package, so the root goes on ``sys.path`` for ``import bench...``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
