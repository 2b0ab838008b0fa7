"""Suggested users to follow.

`assets` defines the asset (its three kinds of step and the run's totals); `ranking` finds the
active users and ranks them; `graph` builds the run's follow graph and loads it into a session;
`shards` splits the users and writes them to Redis; `checks` judges a sample; `sql` holds the SQL.
"""
