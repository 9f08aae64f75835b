"""Measure and decide: cached features, domain similarity, the four-scenario decision, layer groups."""
