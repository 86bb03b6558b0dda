"""Tenancy: tenants, API keys, limits, budgets, fair queueing and the usage ledger (layer 1)."""
