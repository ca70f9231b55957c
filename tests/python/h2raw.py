"""A raw HTTP/2 connection for the abuse suite: frames built with hyperframe and header blocks
with hpack (both from the h2 project), sent exactly as given — valid or not — and the server's
frames read back on a thread."""
import socket
import threading
import time

from hpack import Decoder, Encoder
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame, WindowUpdateFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB


class RawConnection:
    def __init__(self, addr, preface=True):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.frames = []  # every frame the server sent, in order
        self.goaway = None  # the server's GOAWAY, once sent
        self.sent_at_goaway = None  # bytes this side had sent when it arrived
        self.opened_at = time.monotonic()
        self.closed = threading.Event()  # the server closed (or reset) the connection
        self.closed_at = None
        self.sent_bytes = 0
        self.read_error = None  # e.g. ConnectionResetError: closed with unread data
        self.ready = threading.Event()  # the server's SETTINGS acknowledged, its windows known
        self._lock = threading.Lock()
        self.speaks = preface  # answers SETTINGS and PINGs (never before a preface of its own)
        if preface:  # before the reader starts: its SETTINGS ACK must not precede the preface
            self.send_raw(PREFACE + SettingsFrame(0).serialize())
        threading.Thread(target=self._read, daemon=True).start()
        if preface:
            # Until the server's SETTINGS are acknowledged, the protocol's default windows
            # (64 KiB) apply; sending more before that is a flow-control error.
            assert self.ready.wait(5), f"no SETTINGS and WINDOW_UPDATE: {self.frames} {self.read_error!r}"

    def send_raw(self, data):
        """Sends bytes; False once the server has closed the connection."""
        try:
            with self._lock:
                self.sock.sendall(data)
                self.sent_bytes += len(data)
            return True
        except OSError:
            self.closed.set()
            return False

    def send(self, *frames):
        return self.send_raw(b"".join(frame.serialize() for frame in frames))

    def request_headers(self, stream_id, path, end_stream=False, end_headers=True, extra=()):
        """A HEADERS frame opening a gRPC call to `path`."""
        block = self.encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "layerd"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra])
        flags = (["END_HEADERS"] if end_headers else []) + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(stream_id, data=block, flags=flags)

    def _read(self):
        buffer = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    frame.parse_body(memoryview(buffer[9:9 + length]))
                    buffer = buffer[9 + length:]
                    if isinstance(frame, HeadersFrame):  # decoded in order: hpack is stateful
                        frame.headers = dict(self.decoder.decode(frame.data, raw=False))
                    self.frames.append(frame)
                    if isinstance(frame, GoAwayFrame):
                        self.goaway, self.sent_at_goaway = frame, self.sent_bytes
                    elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags and self.speaks:
                        self.send(SettingsFrame(0, flags=["ACK"]))
                    elif isinstance(frame, WindowUpdateFrame) and frame.stream_id == 0:
                        self.ready.set()  # hyper raises the connection window right after SETTINGS
                    elif isinstance(frame, PingFrame) and "ACK" not in frame.flags and self.speaks:
                        self.send(PingFrame(0, opaque_data=frame.opaque_data, flags=["ACK"]))
        except Exception as error:  # noqa: BLE001 - kept for the test to show
            self.read_error = error
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()

    def frames_of(self, kind, stream_id=None):
        return [f for f in list(self.frames)
                if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
