"""Scheduling heuristics: global dispatchers and local queue orders over the read-only state view."""
