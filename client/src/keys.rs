//! Key files and hex: Ed25519 private keys as PKCS#8 PEM files, public keys and hashes as 64
//! lowercase hex characters.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
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

/// Reads a PKCS#8 PEM Ed25519 private key.
pub fn load_key(path: impl AsRef<Path>) -> Result<SigningKey> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // The decoder's message never includes key material.
    SigningKey::from_pkcs8_pem(&text).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        message: format!("not a PKCS#8 PEM Ed25519 private key ({e})"),
    })
}

/// Writes `key` as PKCS#8 PEM to a new file, readable by its owner only (mode 0600 on unix).
/// Refuses to overwrite an existing file: losing a key loses its account.
pub fn write_key(path: impl AsRef<Path>, key: &SigningKey) -> Result<()> {
    let path = path.as_ref();
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| Error::Key {
        path: path.to_path_buf(),
        message: format!("cannot encode the key ({e})"),
    })?;
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

/// Parses an Ed25519 public key from 64 hex characters, and checks that it is a point on the
/// curve: a mistyped key that is not a key at all is caught here rather than after money moved.
pub fn parse_public_key(text: &str) -> Result<PublicKey> {
    let key = parse_hash(text, "public key")?;
    VerifyingKey::from_bytes(&key).map_err(|_| Error::Invalid {
        what: "public key",
        reason: "not a valid Ed25519 public key".into(),
    })?;
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
    fn load_key_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
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
        for bad in ["", "00", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
    }
}
