"""Warmed feeds of the most active users."""
