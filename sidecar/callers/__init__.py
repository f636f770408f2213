"""Who may use the login (SPEC §9): the peer's uid, checked once per connection, and the local client key.

- ``policy.py``: pure decisions (is this uid allowed, is this the key), and
  ``allow_users`` resolved to uids once at startup.
- ``peer.py``: the uid of a connection's other end (``SO_PEERCRED`` on a
  unix socket; netlink ``sock_diag``, else ``/proc/net/tcp*``, for loopback
  TCP on Linux).
- ``keys.py``: the client key file: made on first use, rotated, re-read at
  most once a second by a running serve.
- ``redis_key.py``: the key in a Redis login's record, shared by every
  sidecar on it, polled beside the traffic.
- ``key_location.py``: which of the two (or a deployment's Secret) a
  ``store`` setting means.
- ``gate.py``: what the request handler asks: one verdict per connection,
  the key per request, refusals logged at most once a minute per uid.
"""
