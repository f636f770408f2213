"""Leaving the machine: TLS trust, egress proxies, and the HTTP client sessions built on them."""
