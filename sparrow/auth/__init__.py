"""API authentication: bearer tokens, roles and tenants (``tokens``), and where the CLI keeps them
(``credentials``)."""
