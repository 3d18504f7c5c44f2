"""A listener on 127.0.0.1 that speaks just enough of the PostgreSQL protocol to ask for a
password in clear text (or as md5) and keep every byte it is sent: what a hostile port would
learn from a client that answers.
"""

import socket
import struct
import threading

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CLEARTEXT = 3
MD5 = 5


class PasswordListener:
    """Asks each client for its password (`method`: CLEARTEXT or MD5), records what arrives, then refuses it."""

    def __init__(self, method=CLEARTEXT):
        self.method = method
        self.received = bytearray()
        self.connections = 0
        self.answered = 0  # password messages received (clear text or md5)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def heard(self, secret: str) -> bool:
        with self.lock:
            return secret.encode() in bytes(self.received)

    def close(self):
        self.sock.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with self.lock:
            self.connections += 1
        conn.settimeout(10)
        try:
            with conn:
                self._startup(conn)
                if self.method == MD5:
                    conn.sendall(b"R" + struct.pack("!ii", 12, MD5) + b"salt")
                else:
                    conn.sendall(b"R" + struct.pack("!ii", 8, CLEARTEXT))
                self._keep(conn)
                fields = b'SFATAL\x00C28P01\x00Mpassword authentication failed for user "x"\x00\x00'
                conn.sendall(b"E" + struct.pack("!i", 4 + len(fields)) + fields)
        except OSError:
            pass

    def _startup(self, conn):
        """Answer 'no' to SSL and GSS encryption requests until the startup message comes."""
        while True:
            length = struct.unpack("!i", self._read(conn, 4))[0]
            body = self._read(conn, length - 4)
            self._record(body)
            code = struct.unpack("!i", body[:4])[0]
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                conn.sendall(b"N")
                continue
            return

    def _keep(self, conn):
        """Whatever the client answers (a PasswordMessage, or nothing before it hangs up)."""
        while True:
            try:
                chunk = conn.recv(4096)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            self._record(chunk)
            if chunk[:1] == b"p":
                with self.lock:
                    self.answered += 1
                return

    def _record(self, data):
        with self.lock:
            self.received += data

    @staticmethod
    def _read(conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("client hung up")
            data += chunk
        return data
