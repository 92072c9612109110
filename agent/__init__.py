"""Per-node agent: registers with the coordinator, runs and watches the node's trainer ranks, exports metrics."""
