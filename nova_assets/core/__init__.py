"""Foundations shared by every definition: settings, sources, resources, cache-asset plumbing.

Nothing here defines Dagster jobs, schedules or sensors, and nothing imports the local tooling.
"""
