//! The operator CA and node certificates (rcgen), made so that other TLS stacks accept them:
//! OpenSSL's strict X.509 checks (Python 3.13's default `ssl` context), Go, rustls.
//!
//! What a node certificate carries (PROTOCOL.md §13.1): subject alternative names
//! `node-<id>.tally` (peers check it against the node id a replica claims) and
//! [`SERVER_NAME`] (every replica's name for clients), plus `localhost` and `127.0.0.1` only
//! when the operator asks ([`CertOptions::localhost`]) and any extra names it gives; key usage
//! digitalSignature, extended key usage serverAuth and clientAuth (peers use it both ways);
//! no basicConstraints (so not a CA); subject and authority key identifiers; validity from an hour
//! ago (clock skew) to [`CertOptions::valid_days`] ahead. The CA: CA:true with path length 0,
//! keyCertSign and cRLSign, a subject key identifier, ten years.
//!
//! The CA's private key is kept (`ca.key`, mode 0600) so that node certificates can be renewed
//! from the same CA ([`Ca::load`]) without touching any trust store.
//!
//! Caveats: [`Ca::load`] rebuilds the issuer from the CA certificate's subject, which must be
//! the single common name tally writes; a CA made by other tools is refused, not guessed at.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The name every node certificate carries for clients; profiles connect with it.
pub const SERVER_NAME: &str = "ledger.tally";

/// How long a CA is valid.
const CA_VALID_DAYS: u64 = 3650;

/// Certificates start to be valid this long before they are made: clocks differ.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Upper bound of `valid_days` (about 10 years; a node certificate outliving its CA is
/// pointless).
pub const NODE_VALID_DAYS_MAX: u32 = 3650;

/// The DNS name a node's certificate carries for peers: how replicas tell each other apart.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.tally")
}

/// What a node certificate is valid for, beyond its two fixed names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertOptions {
    /// Also valid for `localhost` and `127.0.0.1` (a development setup that connects to them
    /// by those names). Off by default: a certificate for `localhost` vouches for every
    /// loopback service of every machine that trusts the CA.
    pub localhost: bool,
    /// Days from now until it expires; 1..=[`NODE_VALID_DAYS_MAX`].
    pub valid_days: u32,
    /// More DNS names or IP addresses (the operator's real host names).
    pub extra_names: Vec<String>,
}

impl Default for CertOptions {
    fn default() -> CertOptions {
        CertOptions {
            localhost: false,
            valid_days: 730,
            extra_names: Vec::new(),
        }
    }
}

impl CertOptions {
    /// The subject alternative names of node `id`'s certificate.
    pub fn names(&self, id: u64) -> Vec<String> {
        let mut names = vec![node_name(id), SERVER_NAME.to_string()];
        if self.localhost {
            names.push("localhost".to_string());
            names.push("127.0.0.1".to_string());
        }
        for name in &self.extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// Valid from [`BACKDATE`] ago until `ahead` from now, to the second.
fn set_validity(params: &mut CertificateParams, ahead: Duration) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970");
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = Duration::from_secs(now.as_secs());
    params.not_before = epoch + (now - BACKDATE);
    params.not_after = epoch + (now + ahead);
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// A certificate authority that issues node certificates.
pub struct Ca {
    pub cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new CA named `name` (its subject's common name), valid for ten years.
    pub fn generate(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(name)?;
        set_validity(&mut params, days(CA_VALID_DAYS));
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert,
            key,
        })
    }

    /// The CA written earlier by [`Ca::generate`]: its certificate and private key. Issued
    /// certificates chain to that very certificate (same subject, same key).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca> {
        let cert_pem = std::fs::read_to_string(cert_path)
            .with_context(|| format!("reading the CA certificate {}", cert_path.display()))?;
        tally_client::check_private_file(key_path)?;
        let key_pem = std::fs::read_to_string(key_path)
            .with_context(|| format!("reading the CA key {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
        let der = first_certificate(&cert_pem)
            .with_context(|| format!("{}: not a PEM certificate", cert_path.display()))?;
        let name = subject_common_name(&der).with_context(|| {
            format!(
                "{}: not a CA certificate tally wrote (its subject must be one common name)",
                cert_path.display()
            )
        })?;
        // A stand-in with the same subject and key: what an issued certificate names (issuer,
        // authority key identifier) and what signs it. Its own bytes are never used.
        let cert = ca_params(&name)?.self_signed(&key)?;
        let ca = Ca {
            cert_pem,
            cert,
            key,
        };
        if cert_public_key(&der)? != ca.key.public_key_raw() {
            bail!(
                "{} and {} do not belong together (different public keys)",
                cert_path.display(),
                key_path.display()
            );
        }
        Ok(ca)
    }

    /// The CA's private key, PEM (PKCS#8 v1).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues node `id`'s certificate (see the module documentation). Returns (cert PEM, key
    /// PEM); the key is ECDSA P-256, PKCS#8 v1.
    pub fn issue(&self, id: u64, options: &CertOptions) -> Result<(String, String)> {
        if !(1..=NODE_VALID_DAYS_MAX).contains(&options.valid_days) {
            bail!(
                "a node certificate must be valid for 1 to {NODE_VALID_DAYS_MAX} days (got {})",
                options.valid_days
            );
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(options.names(id))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tally node {id}"));
        // No basicConstraints: rcgen's `ExplicitNoCa` encodes cA FALSE, the DEFAULT, which DER
        // forbids and Python's `cryptography` refuses. Without the extension a certificate is
        // not a CA (RFC 5280 §4.2.1.9), and rcgen then writes no subject key identifier, so
        // it is added here.
        params.is_ca = IsCa::NoCa;
        params
            .custom_extensions
            .push(subject_key_identifier(key.public_key_raw()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, days(u64::from(options.valid_days)));
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The subjectKeyIdentifier extension: the first 20 bytes of SHA-256 over the public key
/// (RFC 7093 §2, method 1).
fn subject_key_identifier(public_key: &[u8]) -> CustomExtension {
    const SKI_OID: &[u64] = &[2, 5, 29, 14];
    let id = &tally_core::crypto::sha256(&[public_key])[..20];
    let mut der = vec![0x04, id.len() as u8];
    der.extend_from_slice(id);
    CustomExtension::from_oid_content(SKI_OID, der)
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Checks `names` for `--san`: each a DNS name or an IP address rcgen accepts.
pub fn check_names(names: &[String]) -> Result<()> {
    for name in names {
        let ok = name.parse::<std::net::IpAddr>().is_ok()
            || rcgen::Ia5String::try_from(name.as_str()).is_ok_and(|_| !name.is_empty());
        if !ok || name.contains(char::is_whitespace) {
            bail!("--san {name:?}: not a DNS name or IP address");
        }
    }
    Ok(())
}

fn first_certificate(pem: &str) -> Result<Vec<u8>> {
    let mut reader = pem.as_bytes();
    let cert = rustls_pemfile::certs(&mut reader)
        .next()
        .ok_or_else(|| anyhow!("no certificate in the file"))??;
    Ok(cert.as_ref().to_vec())
}

/// One DER element: (tag, contents, the rest after it).
fn der_next(input: &[u8]) -> Result<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input
        .split_first()
        .ok_or_else(|| anyhow!("DER: truncated"))?;
    let (&first, rest) = rest
        .split_first()
        .ok_or_else(|| anyhow!("DER: truncated"))?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            bail!("DER: bad length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        bail!("DER: truncated");
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// The fields of a certificate's `tbsCertificate`, from the serial number on (the version,
/// `[0]`, skipped).
fn tbs_fields(der: &[u8]) -> Result<Vec<(u8, &[u8])>> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = der_next(der)?;
    let (tbs_tag, mut tbs, _) = der_next(cert)?;
    if tag != SEQUENCE || tbs_tag != SEQUENCE {
        bail!("not an X.509 certificate");
    }
    let mut fields = Vec::new();
    while !tbs.is_empty() {
        let (tag, value, rest) = der_next(tbs)?;
        if tag != 0xa0 {
            fields.push((tag, value));
        }
        tbs = rest;
    }
    if fields.len() < 6 {
        bail!("not an X.509 certificate");
    }
    Ok(fields)
}

/// The subject's common name, if the subject is exactly one UTF8String common name (what rcgen
/// writes for [`Ca::generate`]).
fn subject_common_name(der: &[u8]) -> Result<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let fields = tbs_fields(der)?;
    // serial, signature algorithm, issuer, validity, subject, subject public key info, ...
    let subject = fields[4].1;
    let (set_tag, rdn, rest) = der_next(subject)?;
    let (seq_tag, attribute, _) = der_next(rdn)?;
    let (oid_tag, oid, value) = der_next(attribute)?;
    let (value_tag, name, _) = der_next(value)?;
    if set_tag != 0x31 || seq_tag != 0x30 || oid_tag != 0x06 || !rest.is_empty() {
        bail!("the subject is not a single attribute");
    }
    if oid != CN_OID || value_tag != 0x0c {
        bail!("the subject is not a UTF8String common name");
    }
    Ok(String::from_utf8(name.to_vec())?)
}

/// The raw public key (the BIT STRING's contents without the unused-bits byte).
fn cert_public_key(der: &[u8]) -> Result<Vec<u8>> {
    let fields = tbs_fields(der)?;
    let (_, _, rest) = der_next(fields[5].1)?;
    let (tag, bits, _) = der_next(rest)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        bail!("unexpected subject public key encoding");
    }
    Ok(bits[1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{init_cluster_with, new_ca, renew_node_cert};

    #[test]
    fn the_ca_reloads_from_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("tally operator CA").unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        crate::bootstrap::write_new(&cert, &ca.cert_pem, false).unwrap();
        crate::bootstrap::write_new(&key, &ca.key_pem(), true).unwrap();
        let der = first_certificate(&ca.cert_pem).unwrap();
        assert_eq!(subject_common_name(&der).unwrap(), "tally operator CA");
        assert_eq!(cert_public_key(&der).unwrap(), ca.key.public_key_raw());
        let loaded = Ca::load(&cert, &key).unwrap();
        assert_eq!(loaded.key.public_key_raw(), ca.key.public_key_raw());

        // Another CA's key does not go with this certificate.
        let other = dir.path().join("other.key");
        let other_ca = Ca::generate("tally operator CA").unwrap();
        crate::bootstrap::write_new(&other, &other_ca.key_pem(), true).unwrap();
        let err = Ca::load(&cert, &other).err().unwrap().to_string();
        assert!(err.contains("do not belong together"), "{err}");
        // A node certificate is no CA tally wrote (its subject is not the CA's kind).
        let (node, _) = ca.issue(1, &CertOptions::default()).unwrap();
        let node_der = first_certificate(&node).unwrap();
        assert_eq!(subject_common_name(&node_der).unwrap(), "tally node 1");
        assert!(subject_common_name(&node_der[..40]).is_err());
    }

    #[test]
    fn names_and_validity_bounds() {
        let default = CertOptions::default();
        assert_eq!(default.names(3), ["node-3.tally", "ledger.tally"]);
        let dev = CertOptions {
            localhost: true,
            extra_names: vec!["ledger.tally".into(), "db.example".into()],
            ..CertOptions::default()
        };
        assert_eq!(
            dev.names(1),
            [
                "node-1.tally",
                "ledger.tally",
                "localhost",
                "127.0.0.1",
                "db.example"
            ]
        );
        let ca = Ca::generate("x").unwrap();
        for valid_days in [0, NODE_VALID_DAYS_MAX + 1] {
            let options = CertOptions {
                valid_days,
                ..CertOptions::default()
            };
            assert!(ca.issue(1, &options).is_err(), "{valid_days}");
        }
        assert!(check_names(&["a.example".into(), "10.1.2.3".into(), "::1".into()]).is_ok());
        for bad in ["", "a b", "é.example"] {
            assert!(check_names(&[bad.into()]).is_err(), "{bad:?}");
        }
    }

    /// Runs `server/tests/python/x509_strict.py` (Python's `cryptography` and OpenSSL's strict
    /// X.509 verification). Skipped with a note when python3 or `cryptography` is missing,
    /// unless `TALLY_REQUIRE_PYTHON=1` (`.ci/run` sets it and installs both).
    fn python_strict(dir: &Path, args: &[&str]) -> bool {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/x509_strict.py");
        let probe = std::process::Command::new("python3")
            .args(["-c", "import cryptography"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            assert!(
                std::env::var("TALLY_REQUIRE_PYTHON").as_deref() != Ok("1"),
                "python3 with the cryptography package is required \
                 (python3 -m pip install cryptography)"
            );
            eprintln!("skipped: no python3 with the cryptography package");
            return false;
        }
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout == b"ok\n",
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    #[test]
    fn other_ecosystems_accept_certificates_keys_added_nodes_renewals_and_rotations() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster_with(2, &dir, 7400, &CertOptions::default()).unwrap();
        let pair = |stem: &str| [format!("{stem}.pem"), format!("{stem}.key")];
        let [n1, k1] = pair("node1");
        let [n2, k2] = pair("node2");
        if !python_strict(&dir, &["ca.pem", &n1, &k1, &n2, &k2, "1"]) {
            return;
        }
        // A replica added later is issued from the same CA and meets the others.
        crate::bootstrap::add_node(&dir, 3, 7400, &CertOptions::default()).unwrap();
        python_strict(&dir, &["ca.pem", "node3.pem", "node3.key", &n1, &k1, "3"]);
        python_strict(&dir, &["ca.pem", &n2, &k2, "node3.pem", "node3.key", "2"]);
        // A renewal from the same CA is trusted by the unchanged ca.pem.
        renew_node_cert(&dir, 2, "ca", &CertOptions::default()).unwrap();
        python_strict(
            &dir,
            &["ca.pem", "node2.pem.new", "node2.key.new", &n1, &k1, "2"],
        );
        // A rotation: certificates of the old and the new CA meet, both trusted by the bundle.
        new_ca(&dir, "ca2").unwrap();
        renew_node_cert(&dir, 1, "ca2", &CertOptions::default()).unwrap();
        python_strict(
            &dir,
            &[
                "ca2-bundle.pem",
                "node1.pem.new",
                "node1.key.new",
                "node2.pem.new",
                "node2.key.new",
                "1",
            ],
        );
    }

    #[cfg(unix)]
    #[test]
    fn data_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        crate::bootstrap::create_private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        // An existing directory keeps the mode its operator gave it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        crate::bootstrap::create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750);
    }

    #[test]
    fn renewal_refuses_what_it_must() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("op");
        init_cluster_with(1, &dir, 7400, &CertOptions::default()).unwrap();
        let options = CertOptions::default();
        renew_node_cert(&dir, 1, "ca", &options).unwrap();
        let again = renew_node_cert(&dir, 1, "ca", &options).unwrap_err();
        assert!(format!("{again:#}").contains("node1.pem.new"), "{again:#}");
        let missing = renew_node_cert(&dir, 2, "nope", &options).unwrap_err();
        assert!(missing.to_string().contains("nope.key"), "{missing}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.join("ca.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            let open = format!(
                "{:#}",
                renew_node_cert(&dir, 3, "ca", &options).unwrap_err()
            );
            assert!(open.contains("chmod 600"), "{open}");
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "init-cluster's directory is private");
        }
        assert!(new_ca(&dir, "ca").is_err());
        assert!(new_ca(&dir, "../x").is_err());
    }
}
