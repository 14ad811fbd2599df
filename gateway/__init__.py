"""The imperative shell of the Consent Gateway: sockets, files, clock, keys.

Builds facts for ``policies`` from the SMTP dialogue and ``consent_registry``,
and carries out the decisions: spool, deliver, bounce, quarantine, audit.
Nothing imports ``gateway``.
"""
