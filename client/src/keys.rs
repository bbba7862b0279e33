//! Key files and hex: Ed25519 private keys as PKCS#8 PEM files, public keys and hashes as 64
//! lowercase hex characters.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use tally_wire::{Hash, PublicKey};

use crate::{Error, Result};

/// A new random key from the operating system's generator.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

/// The 32-byte public key of `key`.
pub fn public_key(key: &SigningKey) -> PublicKey {
    key.verifying_key().to_bytes()
}

/// Reads a PKCS#8 PEM Ed25519 private key (version 1, or version 2 with the public key, as
/// earlier releases wrote). Refuses a file that group or others may access
/// ([`check_private_file`]).
pub fn load_key(path: impl AsRef<Path>) -> Result<SigningKey> {
    let path = path.as_ref();
    check_private_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // The decoder's message never includes key material.
    SigningKey::from_pkcs8_pem(&text).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        message: format!("not a PKCS#8 PEM Ed25519 private key ({e})"),
    })
}

/// Refuses a private key file that its group or others may read or write (unix mode bits
/// `0o077`): the error names the file and the fix. Elsewhere than unix it checks nothing.
pub fn check_private_file(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Key {
                path: path.to_path_buf(),
                message: format!(
                    "group or others may access this private key (mode {:04o}); make it \
                     private with `chmod 600 {}`",
                    mode & 0o7777,
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// `key` as a PKCS#8 PEM document, version 1 (RFC 5208: the private key alone). Version 2
/// (RFC 5958, with the public key), which ed25519-dalek writes by default, is refused by
/// Python's `cryptography` (48); OpenSSL, Go and rustls read version 1.
pub fn key_pem(key: &SigningKey) -> String {
    let v1 = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let pem = v1
        .to_pkcs8_pem(LineEnding::LF)
        .expect("a 32-byte Ed25519 key always encodes");
    pem.to_string()
}

/// Writes `key` as PKCS#8 PEM ([`key_pem`]) to a new file, readable by its owner only (mode
/// 0600 on unix). Refuses to overwrite an existing file: losing a key loses its account.
pub fn write_key(path: impl AsRef<Path>, key: &SigningKey) -> Result<()> {
    let path = path.as_ref();
    let pem = key_pem(key);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Lowercase hex of any bytes (keys, hashes, signatures).
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Parses 64 hex characters into 32 bytes. `what` names the value in the error.
pub fn parse_hash(text: &str, what: &'static str) -> Result<Hash> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(Error::Invalid {
            what,
            reason: format!("expected 64 hex characters, got {}", text.len()),
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|e| Error::Invalid {
        what,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Parses an Ed25519 public key from 64 hex characters, and checks that it is a key that can
/// sign (a canonical curve point not of small order; the rule servers apply to a recipient,
/// PROTOCOL.md §4.1): a mistyped key that is not a key at all is caught here rather than
/// refused by the server, or worse.
pub fn parse_public_key(text: &str) -> Result<PublicKey> {
    let key = parse_hash(text, "public key")?;
    if !tally_core::validate::is_account_key(&key) {
        return Err(Error::Invalid {
            what: "public key",
            reason: "not an Ed25519 public key that can sign (no curve point, a non-canonical \
                     encoding, or a point of small order)"
                .into(),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let key = generate_key();
        write_key(&path, &key).unwrap();
        assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let other = generate_key();
        let err = write_key(&path, &other).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        // The original key is untouched.
        assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
    }

    #[test]
    fn keys_are_pkcs8_version_1_and_version_2_still_loads() {
        use ed25519_dalek::pkcs8::spki::der::pem;
        let key = generate_key();
        let text = key_pem(&key);
        let (label, der) = pem::decode_vec(text.as_bytes()).unwrap();
        assert_eq!(label, "PRIVATE KEY");
        // RFC 8410 §7: SEQUENCE { INTEGER 0 (v1), AlgorithmIdentifier { 1.3.101.112 },
        // OCTET STRING { OCTET STRING (32) } }, and nothing after the private key.
        let prefix = hex::decode("302e020100300506032b657004220420").unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(der[..16], prefix[..]);
        assert_eq!(der[16..], key.to_bytes());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.key");
        let v2 = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        std::fs::write(&path, v2.as_bytes()).unwrap();
        set_mode(&path, 0o600);
        assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(not(unix))]
    fn set_mode(_: &Path, _: u32) {}

    #[cfg(unix)]
    #[test]
    fn key_files_others_may_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let key = generate_key();
        write_key(&path, &key).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644, 0o700 | 0o007] {
            set_mode(&path, mode);
            let err = load_key(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
        for mode in [0o600, 0o400] {
            set_mode(&path, mode);
            assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
        }
    }

    #[test]
    fn load_key_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        set_mode(&path, 0o600);
        assert!(matches!(load_key(&path), Err(Error::Key { .. })));
        assert!(matches!(
            load_key(dir.path().join("missing.key")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn hex_parsing() {
        let key = public_key(&generate_key());
        assert_eq!(parse_public_key(&to_hex(&key)).unwrap(), key);
        assert_eq!(parse_public_key(&to_hex(&key).to_uppercase()).unwrap(), key);
        let small_order = "01".to_string() + &"00".repeat(31); // the identity
        let no_point = "02".to_string() + &"00".repeat(31);
        for bad in [
            "",
            "00",
            &"zz".repeat(32),
            &"ab".repeat(33),
            &small_order,
            &no_point,
            &"00".repeat(32),
        ] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
    }
}
