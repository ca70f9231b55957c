"""What both grpcio peers share: a server on one address that runs until SIGTERM or SIGINT."""
import signal
import sys
import threading
from concurrent import futures

import grpc

#: Both peers accept and send messages up to this size (above any benchmark's tensors).
MAX_MESSAGE = 256 << 20


def serve(add_service, addr, workers, name, interceptors=()):
    """Starts a grpcio server with a `workers`-thread pool, `add_service(server)`'s service
    on `addr`, and blocks until SIGTERM or SIGINT; then stops it with a 5 s grace."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=list(interceptors),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE)])
    add_service(server)
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"cannot listen on {addr}")
    server.start()
    print(f"{name} serving on {addr}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(5).wait()
