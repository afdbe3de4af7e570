"""Security decisions as plain functions over typed values: TLS identity, development PKI."""
