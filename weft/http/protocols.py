"""The application protocols weft serves, by their ALPN ids (RFC 7301).

Its own module, with nothing imported, because two sides need the list and one of them must
stay light: the config reader (`weft.config_tls`, run by ``weft check`` without trio) checks a
listener's ``alpn`` against it, and the dispatcher (`weft.http.dispatch`, which imports every
adapter) picks the adapter for what a TLS handshake negotiated.
"""

#: ALPN protocol ids a connection can be served with; the dispatcher has an adapter for each
SERVED_ALPN = frozenset({"h2", "http/1.1"})
