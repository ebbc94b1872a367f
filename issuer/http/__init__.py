"""The HTTP layer: the one Starlette app (``app``), its routes (``auth``, ``wellknown``, ``health``), request
parsing (``requests``) and per-IP limits (``throttle``). Domain code raises; only this layer answers."""
