"""Kubernetes deployment: chart values, render/validate, status, verify, teardown."""
