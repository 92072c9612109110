"""Stanchion's operator side: the `stanchion` CLI, node checks, the local cluster, certificates and
benchmarks."""
