"""Shared test setup. Area-specific fixtures live in their own plugin modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

pytest_plugins = ["tests.deploy_fixtures"]
