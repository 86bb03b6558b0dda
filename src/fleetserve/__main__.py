"""`python -m fleetserve`: the same command line as the `fleetserve` script."""

from fleetserve.cli.main import main

if __name__ == "__main__":
    main()
