"""Holds idle keep-alive connections open so the caller can read a proxy's memory with them open.

    idle.py COUNT PORT [TLS-COUNT TLS-PORT]

Opens COUNT connections to 127.0.0.1:PORT, sends one request on each and reads the answer, prints
"ready N", and holds them. With TLS-PORT, it then waits for a line on stdin, opens TLS-COUNT TLS 1.3
connections (HTTP/1.1 by ALPN; the certificate is not checked: loopback only) to TLS-PORT the same
way, and prints "ready N" again, still holding the first ones, so the second reading grows from the
first and no memory freed in between can be counted twice. Closes everything when stdin closes."""

import asyncio
import ssl
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


def tls_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    return context


async def one(port, tls, held):
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="bench.test" if tls else None
    )
    writer.write(REQUEST)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    held.append(writer)


async def open_all(port, count, tls, held):
    opened = len(held)
    # In waves, so the listen backlog never overflows.
    for start in range(0, count, 500):
        await asyncio.gather(*(one(port, tls, held) for _ in range(min(500, count - start))))
    print("ready", len(held) - opened, flush=True)


async def main(count, port, tls_count, tls_port):
    held = []
    loop = asyncio.get_running_loop()
    await open_all(port, count, None, held)
    if tls_port:
        await loop.run_in_executor(None, sys.stdin.readline)
        await open_all(tls_port, tls_count, tls_context(), held)
    await loop.run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()


numbers = [int(arg) for arg in sys.argv[1:]]
asyncio.run(main(*numbers[:2], *(numbers[2:4] if len(numbers) > 3 else (0, None))))
