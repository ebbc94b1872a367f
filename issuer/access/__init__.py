"""Access tokens at the issuer: minting them (``tokens``) and checking the Bearer token of the issuer's own
endpoints (``bearer``), whose user and ``tokenVersion`` are read fresh on every call (``user_lookup``)."""
