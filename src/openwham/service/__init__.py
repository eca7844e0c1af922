"""Application services: the domain operations that the server, CLI and engine share.

They take a SQLAlchemy session and plain arguments, return ORM rows or wire models, and raise
``ServiceError`` subclasses that the server maps to HTTP statuses.
"""
