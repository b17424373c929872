"""weft: a reverse proxy and server-side middleware layer on trio."""

__version__ = "0.1.0"
