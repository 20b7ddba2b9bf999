"""Module content: the module store, the cache, the lazy loader and the context builder."""
