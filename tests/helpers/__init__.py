"""Helpers shared by the test modules: imported from here (or conftest.py), never from another test module.

- ``wire``: raw HTTP/1.1 on a socket (one response read, chunked bodies decoded once).
- ``proxying``: talking to an in-process proxy and checking what it answers.
- ``scripted``: a raw upstream whose bytes on the wire each test scripts.
- ``serving``: ``sidecar serve`` as a real subprocess.
"""
