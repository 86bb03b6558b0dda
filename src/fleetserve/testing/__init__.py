"""Fakes and helpers shipped for tests: a fake clock, fake engines, a gateway runner, and
real processes on loopback (free ports, readiness waits, clean stops)."""
