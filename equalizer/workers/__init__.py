"""Several worker processes behind one proxy listener (SPEC 9): the supervisor, the
worker entry point, the control channel's commands and the aggregation of their figures."""
