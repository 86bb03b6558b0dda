"""The tenant store's schema migrations (Alembic), shipped in the package.

`tenancy.database` builds Alembic's configuration in code (no alembic.ini) and runs env.py
here with a connection it has opened and locked. To add a revision, change tenancy/schema.py,
then write the next file in versions/ (named `NNNN_what.py`, `down_revision` the previous
one), reviewing what autogenerate proposes:

    from alembic import command
    from fleetserve.tenancy.database import alembic_config
    config = alembic_config()
    config.attributes["connection"] = sync_connection  # a database at the current head
    command.revision(config, "what changed", autogenerate=True, rev_id="0002")

tests/integration/test_tenancy_migrations.py checks that head and schema.py agree.
"""
