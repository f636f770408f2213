"""Logging in to a standard OAuth 2.0 / OpenID Connect provider (SPEC §8).

One module per job, imports flowing down this list:

    http         the one seam that talks HTTP to the provider (ProviderSession: the
                 session and the egress proxies; ProviderError)
    client_auth  client authentication: client_secret_basic, client_secret_post, none
    pkce         PKCE S256 verifier and challenge, state, nonce
    discovery    the provider's metadata from its issuer, cached per process
    idtoken      the checks an ID token from the token endpoint must pass
    grant        login grants at the token endpoint, and the pair they make
    codeflow     authorization code + PKCE with a loopback redirect (RFC 8252)
    device       the device authorization grant (RFC 8628)
    revocation   RFC 7009 revocation, for logout
    userinfo     who the access token belongs to, for status
    login        which flow a login runs, with what
"""
