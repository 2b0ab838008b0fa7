"""Trending posts over 1h, 24h and 7d."""
