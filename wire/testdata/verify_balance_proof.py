#!/usr/bin/env python3
"""Verifies a tally balance proof file (PROTOCOL.md §11.3) without tally's code.

Usage: verify_balance_proof.py FILE OPERATOR_PUBLIC_KEY_HEX
Prints "ok" and exits 0 only if the file verifies under that key. Needs Python 3 and the
`cryptography` package (Ed25519). Written from PROTOCOL.md §4.4, §4.13 and §11.3.
"""
import hashlib
import json
import struct
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def sha256(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def hash32(text):
    b = bytes.fromhex(text)
    if len(b) != 32:
        raise ValueError("a hash is 32 bytes")
    return b


def bit(path, depth):
    return (path[depth // 8] >> (7 - depth % 8)) & 1


def common_bits(a, b):
    n = 0
    while n < 256 and bit(a, n) == bit(b, n):
        n += 1
    return n


def header(pk, signed):
    """Checks a 256-byte SignedHeader; returns (height, state digest)."""
    if len(signed) != 256:
        raise ValueError("a signed header is 256 bytes")
    body, signature = signed[:192], signed[192:]
    if body[:16] != b"tally/header/v1\x00" or body[16] != 2:
        raise ValueError("not a version 2 tally header")
    if body[184:192] != sha256(pk)[:8]:
        raise ValueError("the header names another operator key")
    Ed25519PublicKey.from_public_bytes(pk).verify(signature, body)
    return struct.unpack("<Q", body[56:64])[0], body[152:184]


def main(path, pk_hex):
    pk = bytes.fromhex(pk_hex)
    f = json.load(open(path))
    if f["format"] != "tally-balance-proof-v1":
        raise ValueError("not a balance proof")
    height, digest = header(pk, bytes.fromhex(f["header_hex"]))
    if height != f["height"]:
        raise ValueError("the file's height is not the header's")
    root = hash32(f["map_root"])
    summary = sha256(
        b"tally/state/v2\x00\x00",
        root,
        struct.pack("<Q", f["account_count"]),
        f["total_deposited"].to_bytes(16, "little"),
        f["total_withdrawn"].to_bytes(16, "little"),
        struct.pack("<Q", height),
    )
    if summary != digest:
        raise ValueError("the summary does not give the header's state digest")
    account = bytes.fromhex(f["account"])
    if len(account) != 32:
        raise ValueError("an account is 32 bytes")
    path_ = sha256(b"tally/map/acct\x00\x00", account)
    if hash32(f["path"]) != path_:
        raise ValueError("the file's path is not the account's")
    siblings = [hash32(s) for s in f["siblings"]]
    depth = len(siblings)
    if depth > 256:
        raise ValueError("more than 256 siblings")
    neighbor = f["neighbor"]
    if f["exists"]:
        if neighbor is not None:
            raise ValueError("a present account has no neighbor")
        node = sha256(b"\x00", path_, sha256(struct.pack("<Q", f["balance"])))
    else:
        if f["balance"] != 0:
            raise ValueError("an absent account's balance is 0")
        if neighbor is None:
            node = bytes(32)
        else:
            other = hash32(neighbor["path"])
            if other == path_ or common_bits(other, path_) < depth:
                raise ValueError("the neighbor does not stand where the account's path leads")
            node = sha256(b"\x00", other, hash32(neighbor["value_hash"]))
    for i, sibling in enumerate(siblings):
        if bit(path_, depth - 1 - i):
            node = sha256(b"\x01", sibling, node)
        else:
            node = sha256(b"\x01", node, sibling)
    if node != root:
        raise ValueError("the proof does not lead to the map root")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
