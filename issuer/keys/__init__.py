"""Signing keys: rows and their states over time (``records``), key material and encryption at rest
(``material``), the in-memory key ring (``ring``), rotation decisions (``policy``), the process's key
manager (``manager``) and operator PEM import (``importing``)."""
