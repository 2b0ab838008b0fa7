"""The dead-letter queue: its message, its publisher and its replay."""
