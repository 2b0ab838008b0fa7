"""The job metrics of docs/design.md §7, counted once per finished run and pushed to the gateway.

The `job_metrics` sensor (`sensor.py`) walks the event log's run status events (RUN_SUCCESS,
RUN_FAILURE) from where it stopped and adds each finished run to the totals of the jobs it counts
for (`state.py`, kept in its cursor); `recount.py` recounts one job over all of history instead:
the reference the tests and benchmarks compare with, and what `nova-assets health` reads.
"""
