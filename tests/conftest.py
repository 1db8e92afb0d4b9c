"""Shared fixtures: real SMTP servers (aiosmtpd and a byte-level fault server), a real
DNS server and TLS material, all on loopback. See servers.py and dnsserver.py."""

from dnsserver import dns_server
from servers import (
    ca,
    ca_pem_file,
    fault_server,
    smtp_server,
    tls_client_context,
    tls_server_context,
)

__all__ = [
    "ca",
    "ca_pem_file",
    "dns_server",
    "fault_server",
    "smtp_server",
    "tls_client_context",
    "tls_server_context",
]
