"""Run retention: finished runs older than RUN_RETENTION_DAYS go, with their files."""
