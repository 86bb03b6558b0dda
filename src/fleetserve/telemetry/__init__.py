"""Metric definitions, tracing and logging set-up."""
