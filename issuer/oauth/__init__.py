"""The client-authenticated side: registered resource servers and gateways, RFC 7662 introspection and
RFC 7009 revocation. (The security-event feed they follow is ``issuer.events``.)"""
