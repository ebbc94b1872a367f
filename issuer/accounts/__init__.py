"""Accounts: registration and the fields' shapes (``service``), argon2id hashing (``passwords``), the
per-account lock-out (``lockout``) and the password login that orders them (``login``)."""
