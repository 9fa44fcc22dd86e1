"""The prefill worker process (lands with the disaggregation issue)."""
