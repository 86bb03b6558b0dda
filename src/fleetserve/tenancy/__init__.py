"""Tenancy: keys, limits, budgets and the usage ledger, over SQL and Redis stores."""
