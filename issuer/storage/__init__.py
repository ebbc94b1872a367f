"""Every SQL statement the issuer runs, one module per concern, on one connection pool (``database``).

Domain code calls these modules' functions and never sees SQL or the driver. ``schema`` describes the
tables for Alembic (``migrations``); ``embedded`` runs a development PostgreSQL for ``issuer dev``.
"""
