"""asmtp in a Flask application, through :mod:`asmtp.sync`: one pooled
:class:`asmtp.sync.Mailer` per application, shared by every request's thread."""
