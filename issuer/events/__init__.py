"""Revocation events: recorded with each revocation, served as Security Event Tokens to verifiers."""
