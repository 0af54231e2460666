"""One policy interface for heuristics, tuned heuristics and trained networks."""
