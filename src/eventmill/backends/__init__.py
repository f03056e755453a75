"""Storage backends: the ports every backend implements (``base``), the embedded
in-memory backend (``memory``) and PostgreSQL (``postgres``, needs the extra)."""
