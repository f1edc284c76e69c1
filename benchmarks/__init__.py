"""Benchmark harness, outside the library: kmclust against its peers on the path users run."""
