"""Storage: SQLAlchemy models, engine factories, the repository (all SQL) and migrations."""
