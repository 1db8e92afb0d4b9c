"""asmtp: an asyncio SMTP client with concurrent fan-out."""

__version__ = "0.1.0"
