"""Token stores: the interface the manager uses (``interface``), the stores behind it, and ``location.open_store``."""
