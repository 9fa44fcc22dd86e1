"""Wire messages and the KV data plane between processes (lands with the disaggregation issue)."""
