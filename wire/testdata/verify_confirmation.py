#!/usr/bin/env python3
"""Verifies a tally confirmation file (PROTOCOL.md §10, §11) without tally's code.

Usage: verify_confirmation.py FILE OPERATOR_PUBLIC_KEY_HEX
Prints "ok" and exits 0 only if the confirmation's bytes verify under that key (the readable
fields are not compared here; `tally verify` does that too). Needs Python 3 and `cryptography`.
"""
import hashlib
import json
import struct
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from verify_consistency import inclusion_root, sha256  # noqa: E402


def main(path, pk_hex):
    pk = bytes.fromhex(pk_hex)
    f = json.load(open(path))
    assert f["format"] == "tally-confirmation-v1"
    b = bytes.fromhex(f["confirmation_hex"])
    assert len(b) >= 554 and (len(b) - 554) % 32 == 0 and b[0] == 0, "layout"
    request, receipt, signed, proof = b[1:209], b[209:289], b[289:545], b[545:]
    header = signed[:192]
    Ed25519PublicKey.from_public_bytes(request[72:104]).verify(request[144:208], request[:144])
    assert receipt[16:48] == hashlib.sha256(request).digest(), "the receipt names the request"
    assert receipt[60] == request[48], "operation"
    assert receipt[48:56] == header[56:64], "height"
    index, size, count = struct.unpack("<IIB", proof[:9])
    assert len(proof) == 9 + 32 * count, "proof length"
    assert index == struct.unpack("<I", receipt[56:60])[0], "leaf index"
    assert size == struct.unpack("<I", header[80:84])[0], "tree size"
    path = [proof[9 + 32 * i : 41 + 32 * i] for i in range(count)]
    root = inclusion_root(index, size, sha256(b"\x00", receipt), path)
    assert root == header[120:152], "the proof leads to the header's Merkle root"
    assert header[184:192] == sha256(pk)[:8], "the header names the operator key"
    Ed25519PublicKey.from_public_bytes(pk).verify(signed[192:], header)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
