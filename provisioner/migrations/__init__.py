"""Alembic migrations of the state database, for SQLite and PostgreSQL alike.

Applied by :func:`provisioner.store.open_store` at start (under a lock) or by
``provisioner db upgrade``. Every table and column of the models has a
migration; a test compares the migrated schema with the models.
"""
