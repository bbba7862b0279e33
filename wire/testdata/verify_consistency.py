#!/usr/bin/env python3
"""Verifies a tally consistency proof file (PROTOCOL.md §11.1) without tally's code.

Usage: verify_consistency.py FILE OPERATOR_PUBLIC_KEY_HEX
Prints "ok" and exits 0 only if the file verifies under that key. Needs Python 3 and the
`cryptography` package (Ed25519). Written from PROTOCOL.md §4.4, §4.12, §11.1 and RFC 9162.
"""
import base64
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


def node(left, right):
    return sha256(b"\x01", left, right)


def header(pk, signed):
    """Checks a 256-byte SignedHeader; returns (chain id, height)."""
    if len(signed) != 256:
        raise ValueError("a signed header is 256 bytes")
    body, signature = signed[:192], signed[192:]
    if body[:16] != b"tally/header/v1\x00" or body[16] != 2:
        raise ValueError("not a version 2 tally header")
    if body[184:192] != sha256(pk)[:8]:
        raise ValueError("the header names another operator key")
    Ed25519PublicKey.from_public_bytes(pk).verify(signature, body)
    return body[24:56], struct.unpack("<Q", body[56:64])[0]


def checkpoint(note, origin, pk):
    """Opens a signed note under (origin, pk); returns (size, root)."""
    split = note.rindex("\n\n")
    text, block = note[: split + 1], note[split + 2 :]
    key_id = sha256(origin.encode(), b"\n", b"\x01", pk)[:4]
    verified = False
    for line in block.rstrip("\n").split("\n"):
        name, blob = line.removeprefix("\u2014 ").split(" ")
        blob = base64.b64decode(blob)
        if name == origin and blob[:4] == key_id:
            Ed25519PublicKey.from_public_bytes(pk).verify(blob[4:], text.encode())
            verified = True
    if not verified:
        raise ValueError("no signature by the operator key")
    lines = text.split("\n")
    if lines[0] != origin:
        raise ValueError("another origin")
    return int(lines[1]), base64.b64decode(lines[2])


def inclusion_root(index, size, leaf, path):
    """RFC 9162 §2.1.3.2."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ValueError("inclusion proof too short")
    return r


def consistent(m, n, old, new, proof):
    """RFC 9162 §2.1.4.2."""
    if m == n:
        return not proof and old == new
    if m & (m - 1) == 0:
        proof = [old] + proof
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old and sr == new


def main(path, pk_hex):
    pk = bytes.fromhex(pk_hex)
    f = json.load(open(path))
    assert f["format"] == "tally-consistency-proof-v1"
    h = lambda x: bytes.fromhex(x)
    sizes, roots = [], []
    for end in ("from", "to"):
        signed = h(f[end + "_header_hex"])
        chain, height = header(pk, signed)
        origin = "tally.ledger/" + chain.hex()
        assert f["origin"] == origin, "origin"
        size, root = checkpoint(f[end + "_checkpoint"], origin, pk)
        assert size == height == f[end + "_size"], "sizes"
        assert root == h(f[end + "_root"]), "root"
        path = [h(x) for x in f[end + "_inclusion"]]
        assert inclusion_root(size - 1, size, sha256(b"\x00", signed), path) == root, "inclusion"
        sizes.append(size)
        roots.append(root)
    assert sizes[0] <= sizes[1], "order"
    proof = [h(x) for x in f["proof"]]
    assert consistent(sizes[0], sizes[1], roots[0], roots[1], proof), "consistency"
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
