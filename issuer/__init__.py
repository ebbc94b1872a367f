"""An RS256 access-token issuer with rotating refresh-token families.

Kept import-free on purpose: ``issuer.verifier`` must be importable without the server's dependencies.
"""
