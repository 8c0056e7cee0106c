"""Opens COUNT keep-alive connections to 127.0.0.1:PORT, sends one request on each, reads the
answer, then holds them all idle until stdin closes. Prints "ready" once every connection has had
its answer, so the caller can read the proxy's memory with the connections open."""

import asyncio
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


async def one(port, held):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    held.append(writer)


async def main(port, count):
    held = []
    # In waves, so the listen backlog never overflows.
    for start in range(0, count, 500):
        await asyncio.gather(*(one(port, held) for _ in range(min(500, count - start))))
    print("ready", len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()


asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
