"""Observability: the profiler, its quantile sketches, exporters and the HTML report."""
