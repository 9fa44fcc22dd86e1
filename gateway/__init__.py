"""The gateway process: OpenAI routes, tenants, quotas, fair scheduling (lands with later issues)."""
