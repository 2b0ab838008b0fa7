"""Development tooling: the local stack, demo data and traffic, run histories, the instance config.

Used by `make dev`, the tests and the benchmarks; the code location's core and definitions never
import it (a lint rule enforces that).
"""
