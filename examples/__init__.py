"""Small programs that use the issuer from outside; not part of the installed package."""
