"""Layer 3, I/O: talking to the network, and nothing else.

The asyncio driver (``asyncio_driver``: a ``BufferedProtocol`` that runs a session's steps
from its read callback), the anyio driver (``anyio_driver``: the same steps over anyio
streams, for trio), the options both drivers' ``open_*`` functions take (``connect``),
tunnels through a proxy (``proxy``), the one map from the network's exceptions to
asmtp's that both drivers use (``exceptions``), and the MX resolver (``resolver``:
dnspython's async resolver). These modules run the sans-IO core (layer 1) over sockets;
they decide nothing about SMTP. They may import layers 0-2 (errors, the core, config
and results), asyncio, anyio and dnspython.
"""
