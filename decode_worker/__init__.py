"""The decode worker process (lands with the disaggregation issue)."""
