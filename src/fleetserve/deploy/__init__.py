"""Kubernetes deployment: the Helm chart rendered with helm (render/validate), and later the
release's status and teardown (lightkube)."""
