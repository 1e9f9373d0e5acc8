"""One address in front of a service's replicas (``make up`` with ``--replicas 2``): a TCP proxy.

Each new connection goes to the next replica in turn (round robin); a replica that refuses the connection
(stopped, or killed by hand to watch the other carry on) is skipped, and the client is refused only when
none answers.  Bytes are passed through untouched: TLS and the client certificate go end to end, so each
replica sees the caller exactly as it would directly.  gRPC keeps a connection for many calls: a client
stays with its replica until that connection breaks, then reconnects to a live one.

    python -m devprov_demo.balancer --listen 127.0.0.1:50051 --backend 127.0.0.1:51051 --backend ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
from collections.abc import Sequence

READ_SIZE = 65536


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not host:port: {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(READ_SIZE):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()


class Balancer:
    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        self.backends = list(backends)
        self._turns = itertools.cycle(range(len(self.backends)))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in self.backends:
            host, port = self.backends[next(self._turns)]
            try:
                return await asyncio.open_connection(host, port)
            except OSError:
                continue  # that replica is down: the next one
        return None

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            client_writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(client_reader, up_writer), _pipe(up_reader, client_writer))


async def serve(listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
    balancer = Balancer(backends)
    server = await asyncio.start_server(balancer.handle, *listen)
    print(f"balancer listening on {listen[0]}:{listen[1]} for {len(backends)} replicas", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devprov_demo.balancer", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="host:port")
    parser.add_argument("--backend", type=_address, action="append", required=True, help="host:port (repeat)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
