"""A TCP proxy that holds every chunk back a fixed time in each direction: a network on loopback.

    .venv/bin/python bench/latency.py --target 127.0.0.1:6379 --one-way-ms 0.25

Prints the port it listens on (127.0.0.1, chosen by the kernel), then forwards until killed.
Loopback answers in about 0.1 ms, where a Redis on another host answers in 0.2-1 ms; the feeds
benchmark writes through this proxy to show what pipelining saves over a network. Threads, not
asyncio: the event loop's timers have millisecond resolution, too coarse for sub-millisecond
delays, while `time.sleep` is precise to tens of microseconds. Chunks keep their order, and each
direction of each connection has its own reader and sender, so chunks in flight overlap as they
would on a wire.
"""

import argparse
import queue
import socket
import threading
import time

CHUNK = 1 << 16


def _pump(source: socket.socket, sink: socket.socket, one_way_s: float) -> None:
    """Forward source to sink, each chunk `one_way_s` after it arrived."""
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def send() -> None:
        while True:
            due, data = chunks.get()
            if not data:
                sink.shutdown(socket.SHUT_WR)
                return
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sink.sendall(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while data := source.recv(CHUNK):
            chunks.put((time.perf_counter() + one_way_s, data))
    except OSError:
        pass
    chunks.put((0.0, b""))


def _serve(client: socket.socket, target: tuple[str, int], one_way_s: float) -> None:
    with socket.create_connection(target) as upstream, client:
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client, one_way_s), daemon=True)
        back.start()
        _pump(client, upstream, one_way_s)
        back.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--one-way-ms", type=float, required=True)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=_serve,
            args=(client, (host, int(port)), args.one_way_ms / 1000),
            daemon=True,
        ).start()


if __name__ == "__main__":
    main()
