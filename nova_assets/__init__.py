"""Nova assets: the Dagster code location that keeps the Nova app's Redis caches fresh."""
