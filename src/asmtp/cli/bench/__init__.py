"""``asmtp bench``: a load generator for load-testing your own SMTP server (layer 6)."""
