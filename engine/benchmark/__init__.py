"""Benchmarks: scheduling strategies on seeded draws, engine overhead, the suite."""
