"""fleetserve: serve open LLMs to many users from one tool."""

__version__ = "0.1.0"
