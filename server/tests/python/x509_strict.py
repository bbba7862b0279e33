"""Checks an init-cluster directory the way other ecosystems will read it: Python's
`cryptography` loads every key and certificate, and OpenSSL (through `ssl`) completes a mutual
TLS handshake with strict X.509 verification (VERIFY_X509_STRICT, the default of Python 3.13's
`ssl.create_default_context()`).

usage: x509_strict.py DIR CA_FILE SERVER_CERT SERVER_KEY CLIENT_CERT CLIENT_KEY NODE_ID
(paths relative to DIR; SERVER_CERT must be node NODE_ID's). Prints "ok" or fails.
"""
import datetime
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

d, ca_file, server_cert, server_key, client_cert, client_key, node_id = sys.argv[1:]


def path(name):
    return f"{d}/{name}"


def certs(name):
    return x509.load_pem_x509_certificates(open(path(name), "rb").read())


for k in ["operator.key", "deposit.key", "admin.key", "ca.key", server_key, client_key]:
    load_pem_private_key(open(path(k), "rb").read(), password=None)

now = datetime.datetime.now(datetime.timezone.utc)


def check_validity(c, at_most_days):
    assert c.not_valid_before_utc <= now <= c.not_valid_after_utc, c
    assert now - c.not_valid_before_utc < datetime.timedelta(hours=2), c.not_valid_before_utc
    assert c.not_valid_after_utc - now <= datetime.timedelta(days=at_most_days), c


cas = certs(ca_file)
for ca in cas:
    check_validity(ca, 3651)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
ca_key_ids = {
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest for ca in cas
}

for name in [server_cert, client_cert]:
    (node,) = certs(name)
    check_validity(node, 731)
    ext = node.extensions
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki in ca_key_ids, "the authority key id names a trusted CA's subject key id"
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku

(server,) = certs(server_cert)
sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
names = sans.get_values_for_type(x509.DNSName)
names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
assert sorted(names) == sorted(["ledger.tally", f"node-{node_id}.tally"]), names


def handshake(hostname):
    """An in-memory TLS handshake; the server asks for a client certificate, as tally's peer
    port does, and both sides verify strictly."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(path(server_cert), path(server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(path(ca_file))
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = ssl.create_default_context(cafile=path(ca_file))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    client.load_cert_chain(path(client_cert), path(client_key))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ends = [
        client.wrap_bio(bios[0], bios[1], server_hostname=hostname),
        server.wrap_bio(bios[2], bios[3], server_side=True),
    ]
    done = [False, False]
    for _ in range(20):
        for i, end in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            return
    raise RuntimeError("the handshake did not finish")


handshake("ledger.tally")
handshake(f"node-{node_id}.tally")
for wrong in ["localhost", "node-99.tally"]:
    try:
        handshake(wrong)
    except ssl.SSLCertVerificationError:
        continue
    raise SystemExit(f"a node certificate was accepted for {wrong}")
print("ok")
