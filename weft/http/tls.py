"""TLS under the protocol adapters: `TLSTransport`, the same methods as `TCPTransport` over an
`ssl.SSLObject` and a pair of `ssl.MemoryBIO`s on the non-blocking socket.

Why memory BIOs and not `ssl.SSLSocket`: weft's I/O is "try the system call, wait for readiness
on EAGAIN" on non-blocking sockets, with deadlines on the worker's `Timers` heap (see
`weft.http.io`). An SSLObject does no I/O at all: ciphertext from ``sock.recv`` is written into
the incoming BIO, plaintext comes out of ``SSLObject.read``, and whatever the SSL object wants
sent (records, alerts, handshake messages) is taken from the outgoing BIO and written with
``sock.send``. So every wait is still weft's own wait on the socket, and h1_server and
h1_client run unchanged on it.

The rules that keep it equivalent to TCP for the adapters:

* **Plaintext already decrypted is readable.** After a read, the SSL object may hold more
  plaintext (``pending()``), or the incoming BIO more whole records, while the socket has
  nothing: a wait on the socket then would sleep on data that is already here (a pipelined
  request in one record with the previous one). Every read and `wait_readable` looks at that
  buffered state first and waits on the socket only when it is empty, or holds only part of a
  record (`_starved`: the last read found the BIO short and the socket empty). `readable_now`
  (the pool's idle check) decrypts what the socket has, so a TLS 1.3 session ticket that came
  after the handshake is consumed and not taken for a stray response. What works on the raw
  fd stays correct: `Timers` and `PeerWatch` watch for deadlines and hang-ups (POLLRDHUP), which
  are facts of the TCP connection, not of the plaintext.
* **Writes keep the "send what you can, retry the rest" contract.** `send_some` encrypts at
  most `WRITE_CHUNK` bytes at a time and hands the records to the kernel. A record the kernel
  did not take whole stays in `_out`, and the plaintext it carries is reported as *not* sent
  (`_owed`), so the caller, as with a TCP short write, awaits `send_all` with the rest; that
  first finishes writing the pending records and then counts the owed bytes as sent (OpenSSL's
  own SSL_write retry rule: the retry starts with the same bytes). Nothing is ever left
  encrypted but unsent after a write the caller believes complete, and no more than one
  chunk's records wait in memory per connection.
* **Reads and writes may run in two tasks** (a tunnel, a request body pumped while the response
  is read): both only call the SSL object synchronously between awaits; the reader waits on
  readability, the writer on writability, which trio allows at once. Bytes a read makes the SSL
  object send (a TLS 1.3 KeyUpdate answer) join `_out` in order and go with the next write.
* **EOF**: a peer's close_notify and a TCP close without it both read as ``b""`` (HTTP framing
  finds a truncated message itself). `shutdown_write` sends close_notify, then FIN; `close`
  sends close_notify if it can without waiting.

Handshakes run with a deadline (`handshake`), in the connection's task. A failure is one
`HandshakeFailed` with a `reason` word from a fixed list (`weft.http.tls_errors`, the label values
of ``weft_tls_handshake_failures_total``) and OpenSSL's text as the detail, for an info log line
without a traceback: a client that cannot do TLS is routine on a public port.

Errors otherwise are the transport's usual ones: `ssl.SSLError` is an `OSError` (a broken
record reads as a broken connection), `TimeoutError`, `trio.ClosedResourceError`.
"""

from __future__ import annotations

import _ssl
import math
import select
import socket
import ssl

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable

from weft.http.io import SCRATCH, Timers, close
from weft.http.tls_errors import HandshakeFailed, UpstreamTLSError, failure_reason, refused
from weft.http.transport import TCPTransport, Transport

# Plaintext encrypted per step of a write: four full TLS records (16 KiB each, RFC 8446 §5.1).
# It bounds the ciphertext a connection holds when the kernel's buffer is full.
WRITE_CHUNK = 64 * 1024
RECV_SIZE = len(SCRATCH)  # ciphertext read per recv: the worker's scratch buffer


class TLSTransport(Transport):
    """A TLS connection over a non-blocking socket (see the module docstring)."""

    __slots__ = (
        "_eof",
        "_in",
        "_out",
        "_outgoing",
        "_owed",
        "_plain",
        "_ssl",
        "_starved",
        "alpn",
        "peer_id",
        "sock",
    )

    tls = True

    def __init__(self, sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.sock = sock
        self._ssl = sslobj
        self._in = incoming
        self._outgoing = outgoing
        self._out = bytearray()  # ciphertext taken from the SSL object, not yet sent
        self._owed = 0  # plaintext bytes in _out that send_some reported as not sent
        self._plain = bytearray()  # plaintext decrypted by peek/readable_now, not yet read
        self._eof = False  # the socket reached EOF (the BIO was told)
        self._starved = False  # the BIO holds at most part of a record: the socket must speak
        self.alpn: str | None = None
        self.peer_id = None  # set by whoever verified the peer's SVID (weft.svid)

    @classmethod
    def server(cls, sock: socket.socket, context: ssl.SSLContext) -> TLSTransport:
        """The server side of a connection accepted on `sock` (before its handshake)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return cls(sock, context.wrap_bio(incoming, outgoing, server_side=True), incoming,
                   outgoing)

    @classmethod
    def client(cls, sock: socket.socket, context: ssl.SSLContext,
               server_name: str | None) -> TLSTransport:
        """The client side on a connected `sock`; `server_name` is sent as SNI and verified
        (an IP address is verified against the certificate's IP entries, and not sent)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = context.wrap_bio(incoming, outgoing, server_side=False,
                                  server_hostname=server_name)
        return cls(sock, sslobj, incoming, outgoing)

    # -- what the connection says about itself --------------------------------------------------

    @property
    def peer_certificate(self) -> bytes | None:
        """The peer's leaf certificate, DER, when it sent one (mTLS, or any server)."""
        try:
            return self._ssl.getpeercert(binary_form=True)
        except ValueError:  # before the handshake
            return None

    def peer_chain(self) -> list[bytes]:
        """The certificates the peer sent, DER, its leaf first ([] when it sent none, or on a
        resumed session, which carries no chain: contexts that check chains issue no tickets).

        Python < 3.13 has this only as private API of the ``_ssl`` object (3.10-3.12); the
        server side of OpenSSL's chain lacks the leaf, which CPython puts back first. 3.13
        made it public, returning DER already."""
        public = getattr(self._ssl, "get_unverified_chain", None)
        if public is not None:  # Python >= 3.13
            return list(public() or [])
        chain = self._ssl._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        if not chain:
            return []
        # 3.11 puts a None first on the server side when the client sent no certificate.
        return [c.public_bytes(_ssl.ENCODING_DER) for c in chain if c is not None]

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- the handshake ------------------------------------------------------------------------

    async def handshake(self, timeout: float) -> None:
        """Run the handshake, at most `timeout` seconds. Raises TimeoutError, ssl.SSLError
        (refused; the alert that says why is sent first when the kernel takes it), OSError."""
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    self._ssl.do_handshake()
                except ssl.SSLWantReadError:
                    await self._flush()
                    if self._feed_now() is None:
                        await wait_readable(self.sock)
                    continue
                except ssl.SSLError:
                    self._flush_now()  # the alert, so that the peer learns why
                    raise
                await self._flush()  # the last flight (and TLS 1.3 session tickets)
                self.alpn = self._ssl.selected_alpn_protocol()
                return
        assert scope.cancelled_caught
        raise TimeoutError(f"TLS handshake not done in {timeout:g}s")

    def _feed_now(self) -> int | None:
        """Move what the socket has into the incoming BIO: the byte count, 0 at EOF (the BIO
        is told), None when the socket has nothing. Raises OSError."""
        try:
            n = self.sock.recv_into(SCRATCH)
        except BlockingIOError:
            return None
        if n:
            self._in.write(SCRATCH[:n])
            self._starved = False
        else:
            self._eof = True
            self._in.write_eof()
        return n

    # -- reads --------------------------------------------------------------------------------

    def _buffered(self) -> bool:
        """Whether a read can make progress without the socket."""
        return bool(
            self._plain
            or self._eof
            or self._ssl.pending()
            or (self._in.pending and not self._starved)
        )

    def _decrypt_now(self, size: int, view: memoryview | None) -> bytes | int | None:
        """Plaintext from the SSL object, reading the socket without waiting when it needs
        more: bytes (or a count into `view`), empty/0 at EOF, None when nothing is there."""
        ssl_read = self._ssl.read
        while True:
            try:
                data = ssl_read(size) if view is None else ssl_read(size, view)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                return b"" if view is None else 0
            else:
                if self._outgoing.pending:
                    self._flush_now()  # a read may answer the peer (KeyUpdate)
                return data
            if self._eof:
                return b"" if view is None else 0
            if self._feed_now() is None:
                self._starved = True
                return None

    def recv_now(self, size: int) -> bytes | None:
        """One read without waiting: the bytes, ``b""`` at EOF, None when nothing is there.
        Raises OSError (a reset, or a broken record)."""
        if self._plain:
            data = bytes(self._plain[:size])
            del self._plain[:size]
            return data
        return self._decrypt_now(size, None)  # type: ignore[return-value]

    def recv_into_now(self, view: memoryview) -> int | None:
        """`recv_now` into `view`: the byte count, 0 at EOF, None when nothing is there."""
        plain = self._plain
        if plain:
            n = min(len(plain), len(view))
            view[:n] = plain[:n]
            del plain[:n]
            return n
        if not len(view):
            return 0
        return self._decrypt_now(len(view), view)  # type: ignore[return-value]

    async def recv(self, size: int) -> bytes:
        """Read up to `size` bytes; ``b""`` at EOF. Raises OSError."""
        data = self.recv_now(size)
        if data is not None:
            await checkpoint()
            return data
        while True:
            await wait_readable(self.sock)
            data = self.recv_now(size)
            if data is not None:
                return data

    async def recv_until(
        self, size: int, deadline: float, timers: Timers, *, try_first: bool = True
    ) -> bytes:
        """`recv` with a deadline from `timers` (TimeoutError; then close the transport).
        `try_first=False` still reads at once what is decrypted or buffered already."""
        if try_first or self._buffered():
            data = self.recv_now(size)
            if data is not None:
                await checkpoint()
                return data
        entry = timers.arm(deadline, self.sock)
        try:
            while True:
                await self._wait_armed(entry)
                data = self.recv_now(size)
                if data is not None:
                    return data
        finally:
            timers.disarm(entry)

    async def recv_into(
        self, view: memoryview, deadline: float, timers: Timers, *, try_first: bool = True
    ) -> int:
        """`recv_until` into `view`: the byte count, 0 at EOF. As `weft.http.io`'s, a read that
        succeeds at once yields *before* it, so nothing awaits between it and the return (the
        caller copies out of the shared scratch buffer)."""
        if try_first or self._buffered():
            await checkpoint()
            n = self.recv_into_now(view)
            if n is not None:
                return n
        entry = timers.arm(deadline, self.sock)
        try:
            while True:
                await self._wait_armed(entry)
                n = self.recv_into_now(view)
                if n is not None:
                    return n
        finally:
            timers.disarm(entry)

    async def _wait_armed(self, entry: list) -> None:
        try:
            await wait_readable(self.sock)
        except trio.ClosedResourceError:
            if entry[2] is None:
                raise TimeoutError("nothing received by the deadline") from None
            raise

    async def wait_readable(self) -> None:
        """Wait until a read would not block: plaintext or records already here count."""
        if self._buffered():
            await checkpoint()
            return
        await wait_readable(self.sock)

    def readable_now(self) -> bool:
        """Whether a read would return plaintext, EOF or an error now. What the socket has is
        decrypted (into `_plain`) to tell: records that carry no plaintext, such as a TLS 1.3
        session ticket, make an idle connection look busy otherwise."""
        if self._buffered():
            return True
        try:
            readable, _, _ = select.select([self.sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        try:
            data = self._decrypt_now(RECV_SIZE, None)
        except OSError:
            return True  # broken: a read would say so
        if data is None:
            return False  # records without plaintext (a session ticket), or part of one
        self._plain += data  # type: ignore[arg-type]
        return True

    def peek(self, size: int) -> bytes | None:
        """Plaintext waiting to be read, left in place: ``b""`` at EOF, None when nothing is
        there or the connection broke."""
        if not self._plain:
            try:
                data = self._decrypt_now(size, None)
            except OSError:
                return None
            if data is None:
                return None
            self._plain += data  # type: ignore[arg-type]
            if not data:
                return b""
        return bytes(self._plain[:size])

    def peer_closed(self) -> bool:
        """Whether the peer closed or reset its side (only meaningful once readable);
        plaintext that came instead is kept for the next read."""
        if self._plain:
            return False
        try:
            data = self._decrypt_now(RECV_SIZE, None)
        except OSError:
            return True
        if data is None:
            return False
        self._plain += data  # type: ignore[arg-type]
        return not data

    # -- writes -------------------------------------------------------------------------------

    def _flush_now(self) -> None:
        """Take the SSL object's output into `_out` and write what the kernel takes of it."""
        if self._outgoing.pending:
            self._out += self._outgoing.read()
        out = self._out
        if out:
            try:
                n = self.sock.send(out)
            except BlockingIOError:
                return
            del out[:n]

    async def _flush(self) -> None:
        """Write every pending record, waiting for the socket as needed (no bound of its own:
        the caller's scope bounds it)."""
        self._flush_now()
        while self._out:
            await wait_writable(self.sock)
            self._flush_now()

    def send_some(self, data: bytes | memoryview) -> int:
        """One non-blocking write: how much of `data` is on its way (see the module docstring:
        a short count means "call again with the rest", exactly as for TCP). Raises OSError."""
        taken = 0
        if self._out or self._owed or self._outgoing.pending:
            self._flush_now()
            if self._out:
                return 0
            taken, self._owed = self._owed, 0
            assert taken <= len(data), "a write after a short one must start with its rest"
        end = len(data)
        write = self._ssl.write
        while taken < end:
            chunk = data[taken : taken + WRITE_CHUNK]
            write(chunk)
            self._flush_now()
            if self._out:
                self._owed = len(chunk)
                return taken
            taken += len(chunk)
        return taken

    def send_parts(self, parts: list[bytes | memoryview]) -> int:
        """The parts in order, as one write (records carry them together)."""
        return self.send_some(b"".join(parts))

    async def send_all(self, data: bytes | memoryview, timeout: float = math.inf) -> None:
        """Write everything, at most `timeout` seconds without progress (TimeoutError)."""
        view = memoryview(data)
        sent = self.send_some(view)
        while sent < len(view):
            with trio.move_on_after(timeout) as scope:
                await wait_writable(self.sock)
            if scope.cancelled_caught:
                raise TimeoutError(f"no write progress in {timeout:g}s")
            sent += self.send_some(view[sent:])

    # -- ending ---------------------------------------------------------------------------------

    def _close_notify(self) -> bool:
        """Queue close_notify and write it without waiting; whether all output went out."""
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent ours; theirs is not awaited
        except (ssl.SSLError, ValueError):
            return False
        try:
            self._flush_now()
        except OSError:
            return False
        return not self._out

    def shutdown_write(self) -> None:
        """close_notify, then FIN: the peer reads EOF after what was written. Raises OSError.
        When the kernel cannot take the alert now, the FIN is left to the close."""
        if self._close_notify():
            self.sock.shutdown(socket.SHUT_WR)

    def wake(self) -> None:
        """Wake a task waiting on this transport (ClosedResourceError), leaving it open."""
        notify_closing(self.sock)

    def close(self) -> None:
        """Close now (idempotent), with a close_notify if the kernel takes it at once."""
        if self.sock.fileno() == -1:
            return
        if not self._out and not self._eof:
            self._close_notify()
        close(self.sock)

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1


# -- opening --------------------------------------------------------------------------------------


async def accept(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> TLSTransport:
    """The server side of an accepted connection, handshaken within `timeout` seconds.
    Raises HandshakeFailed (the socket is closed then); cancellation closes it too."""
    transport = TLSTransport.server(sock, context)
    try:
        await transport.handshake(timeout)
    except (OSError, TimeoutError, EOFError) as e:
        transport.close()
        detail = (e.reason or str(e)) if isinstance(e, ssl.SSLError) else str(e) or "closed"
        raise HandshakeFailed(failure_reason(e), detail) from None
    except BaseException:
        transport.close()
        raise
    return transport


async def connect(tcp: TCPTransport, context: ssl.SSLContext, server_name: str,
                  timeout: float = math.inf) -> TLSTransport:
    """TLS over a connected `tcp` to an upstream, `server_name` sent and verified. Raises
    UpstreamTLSError (`tcp` closed) naming the verification error when the certificate is
    refused; cancellation closes `tcp`."""
    transport = TLSTransport.client(tcp.sock, context, server_name)
    try:
        await transport.handshake(timeout)
    except ssl.SSLCertVerificationError as e:
        transport.close()
        # "Hostname mismatch, certificate is not valid for 'x'." -> "Hostname mismatch"
        why = (e.verify_message or e.reason or "refused").split(",")[0].rstrip(".")
        raise UpstreamTLSError(
            f"TLS to {server_name}: certificate refused: {e.verify_message} "
            f"(code {e.verify_code})",
            f"the upstream's TLS certificate was refused: {why}",
        ) from None
    except (OSError, EOFError) as e:
        transport.close()
        raise refused(e, server_name) from None
    except BaseException:
        transport.close()
        raise
    return transport
