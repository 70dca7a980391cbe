"""Alembic migrations: the only source of truth for the database schema."""
