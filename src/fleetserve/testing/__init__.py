"""Fakes and helpers shipped for tests: fake engines, a gateway runner, processes."""
