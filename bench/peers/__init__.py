"""Peers: what a team would run instead of the issuer, measured by ``make bench`` under the same load.

Each peer lives in its own directory with its own requirements file, installed by ``make bench`` into its
own virtualenv (never the issuer's); the module next to it starts it and drives it for ``bench.run``.
"""
