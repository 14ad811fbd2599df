"""The practice's legal record: users, patients, relationships, consents.

Owns the database schema (sqlmodel models and Alembic migrations) and the only
code that writes registry SQL. Builds the frozen facts ``policies`` reads.
Knows nothing of SMTP, sockets or the gateway; must not import ``gateway``.
"""
