"""The `fleetserve` command line: thin typer commands that parse, build settings and call in."""
