"""Config: typed schema, composition, validation and the dry-run plan (pure Python, no torch)."""
