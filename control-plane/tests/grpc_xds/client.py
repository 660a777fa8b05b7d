"""A proxyless gRPC client for tests: dials `xds:///SERVICE` through the control plane.

Usage: GRPC_XDS_BOOTSTRAP=bootstrap.json python3 client.py TARGET

Reads one command a line from stdin and answers each with one JSON line on stdout:
  call N      -> {"servers": {"a": 3, "b": 2}, "errors": ["..."]}  (N unary Echo calls)
  quit        -> exits (so does end of input)
The first call of a session waits for the channel to become ready (the xDS resolver needs
LDS, then CDS and EDS, before it can pick), bounded by READY_TIMEOUT; later calls use
CALL_TIMEOUT each. Requests and replies are hand-encoded protobuf: no generated code.
"""

import json
import sys

import grpc

METHOD = "/tern.testing.v1.Echo/Unary"
READY_TIMEOUT = 30.0
CALL_TIMEOUT = 5.0


def encode_request(message: str) -> bytes:
    """EchoRequest { string message = 1; }"""
    data = message.encode()
    return b"\x0a" + varint(len(data)) + data


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes, i: int):
    shift = 0
    value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def decode_server(buf: bytes) -> str:
    """EchoReply { string message = 1; string server = 2; uint32 sequence = 3; } -> server"""
    i = 0
    server = ""
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = read_varint(buf, i)
        elif wire == 2:
            length, i = read_varint(buf, i)
            if field == 2:
                server = buf[i : i + length].decode()
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire} for field {field}")
    return server


def main() -> None:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target)
    unary = channel.unary_unary(
        METHOD, request_serializer=None, response_deserializer=None
    )
    first = True
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] != "call":
            print(json.dumps({"error": f"unknown command {words[0]!r}"}), flush=True)
            continue
        servers = {}
        errors = []
        for n in range(int(words[1])):
            try:
                reply = unary(
                    encode_request(f"hello {n}"),
                    timeout=READY_TIMEOUT if first else CALL_TIMEOUT,
                    wait_for_ready=first,
                )
                first = False
                server = decode_server(reply)
                servers[server] = servers.get(server, 0) + 1
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")
                first = False
        print(json.dumps({"servers": servers, "errors": errors}), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
