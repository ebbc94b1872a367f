"""What the test modules share: one fake clock, one issuer harness, one JWT toolkit, one set of HTTP
assertions, one TCP fault proxy, and the database the suite runs on."""
