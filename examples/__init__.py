"""Example applications built on metered-middleware; run them from the repository root."""
