"""The dead-letter queue: the message we write, reading it back, its publisher and its replay."""
