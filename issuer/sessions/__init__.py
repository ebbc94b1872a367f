"""Sessions, i.e. refresh-token families: start, rotate, grace replay, reuse detection, revocation."""
