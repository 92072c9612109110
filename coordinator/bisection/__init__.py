"""Grid-search deterministic node bisection, in one place: the planner (pure: which groups of nodes
to test next, and the verdict a set of trial results supports) and the runner (drives the trials
through the agents and records every round)."""
