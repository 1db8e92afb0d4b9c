"""asmtp in a FastAPI service: :mod:`.mail` sends the welcome mail (one pooled Mailer
for the life of the application), :mod:`.main` is the HTTP side (``POST /welcome``)."""
