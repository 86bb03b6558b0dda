"""bench's report: one data model (`model.py`) and its renderers (console, JSON, CSV, HTML)."""
