"""Suggested users to follow."""
