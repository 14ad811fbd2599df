"""Pure decisions of the Consent Gateway.

This package owns *what* the gateway decides; it never does I/O. It imports
only the standard library: no asyncio, no database, no sockets, no clock (the
caller passes ``now``). Everything here is deterministic and tested
table-driven and with hypothesis.
"""
