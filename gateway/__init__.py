"""The gateway process: OpenAI routes, tenants, quotas, fair scheduling (later issues)."""
