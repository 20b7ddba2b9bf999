"""Comparisons and figure-reproducing scripts; the library never imports this package."""
