//! The client profile (`profile.toml`): which ledger, which operator, how to reach and trust it.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tally_wire::{Hash, PublicKey};

use crate::keys::{load_key, parse_hash, parse_public_key};
use crate::{Error, Result};

/// What a client needs to talk to one ledger. The server writes it; the CLI, bench and chaos
/// read it.
///
/// ```toml
/// chain_id = "<64 hex>"
/// operator_public_key = "<64 hex>"
/// ca_cert = "/abs/path/ca.pem"           # PEM CA certificate the client trusts
/// server_name = "ledger.tally"           # TLS server name to verify (default "localhost")
/// deposit_key = "/abs/path/deposit.key"  # optional: PKCS#8 PEM Ed25519 key that signs deposits
/// admin_key = "admin.key"                # optional: the key that signs membership commands
///
/// [[replicas]]
/// id = 1
/// address = "127.0.0.1:7400"
/// ```
///
/// PROTOCOL.md §5.3 documents every key. [`Profile::load`] resolves relative paths against the profile's own directory and checks the
/// hex fields, so a loaded profile's [`Profile::chain_id_bytes`] and
/// [`Profile::operator_key`] cannot fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The ledger's chain id, 64 hex characters; requests are signed for it.
    pub chain_id: String,
    /// The operator's Ed25519 public key, 64 hex characters: what confirmations are checked with.
    pub operator_public_key: String,
    /// PEM file of the CA certificate that issued the replicas' certificates; nothing else is
    /// trusted.
    pub ca_cert: PathBuf,
    /// The name the replicas' certificates must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The key that signs deposits, if this profile may deposit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposit_key: Option<PathBuf>,
    /// The key that signs admin requests (`tally cluster …`, PROTOCOL.md §3 `0x07 Admin`), if
    /// this profile may run them: PKCS#8 PEM, mode 0600, its public key listed in the
    /// servers' `[cluster] admin_keys`. Relative to the profile's directory, like `deposit_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_key: Option<PathBuf>,
    /// Cosignatures of `witnesses` a header's checkpoint needs before the client trusts it
    /// (PROTOCOL.md §11.2); 0 (the default): none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub witness_quorum: u32,
    /// The witnesses whose cosignatures count toward `witness_quorum`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<ProfileWitness>,
    /// Client addresses of the replicas, in the order they are tried.
    #[serde(default)]
    pub replicas: Vec<ReplicaAddress>,
}

/// One witness a profile trusts: the name in its cosignature lines and its Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileWitness {
    pub name: String,
    /// 64 hex.
    pub public_key: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One replica's client (TLS) address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaAddress {
    pub id: u64,
    /// `host:port`.
    pub address: String,
}

fn default_server_name() -> String {
    "localhost".to_string()
}

impl Profile {
    /// Reads and checks a profile. Relative `ca_cert`, `deposit_key` and `admin_key` paths are
    /// taken relative to the directory that holds the profile.
    pub fn load(path: impl AsRef<Path>) -> Result<Profile> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Profile::from_toml_str(&text, &base).map_err(|message| Error::Profile {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses a profile; relative paths are resolved against `base`.
    fn from_toml_str(text: &str, base: &Path) -> std::result::Result<Profile, String> {
        let mut profile: Profile = toml::from_str(text).map_err(|e| e.to_string())?;
        parse_hash(&profile.chain_id, "chain_id").map_err(|e| e.to_string())?;
        parse_public_key(&profile.operator_public_key)
            .map_err(|e| format!("operator_public_key: {e}"))?;
        for w in &profile.witnesses {
            parse_public_key(&w.public_key)
                .map_err(|e| format!("witness {:?}: public_key: {e}", w.name))?;
        }
        if profile.witness_quorum as usize > profile.witnesses.len() {
            return Err(format!(
                "witness_quorum {} is more than the {} witnesses listed",
                profile.witness_quorum,
                profile.witnesses.len()
            ));
        }
        for replica in &profile.replicas {
            if replica.address.trim().is_empty() {
                return Err(format!("replica {} has an empty address", replica.id));
            }
        }
        resolve(base, &mut profile.ca_cert);
        for key in [profile.deposit_key.as_mut(), profile.admin_key.as_mut()]
            .into_iter()
            .flatten()
        {
            resolve(base, key);
        }
        Ok(profile)
    }

    /// The profile as TOML, as [`Profile::load`] reads it.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid {
            what: "profile",
            reason: e.to_string(),
        })
    }

    pub fn chain_id_bytes(&self) -> Result<Hash> {
        parse_hash(&self.chain_id, "chain_id")
    }

    pub fn operator_key(&self) -> Result<PublicKey> {
        parse_public_key(&self.operator_public_key)
    }

    /// Loads the deposit key named by the profile.
    pub fn load_deposit_key(&self) -> Result<SigningKey> {
        match &self.deposit_key {
            Some(path) => load_key(path),
            None => Err(Error::Invalid {
                what: "profile",
                reason: "it names no deposit_key, so it cannot sign deposits".into(),
            }),
        }
    }

    /// Loads the admin key named by the profile.
    pub fn load_admin_key(&self) -> Result<SigningKey> {
        match &self.admin_key {
            Some(path) => load_key(path),
            None => Err(Error::Invalid {
                what: "profile",
                reason: "it names no admin_key, so it cannot sign admin requests (add \
                         admin_key = \"FILE\" naming the admin's private key; its public key \
                         must be in the servers' [cluster] admin_keys)"
                    .into(),
            }),
        }
    }
}

fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate_key, public_key, to_hex};

    fn sample() -> Profile {
        Profile {
            chain_id: to_hex(&[7; 32]),
            operator_public_key: to_hex(&public_key(&generate_key())),
            ca_cert: PathBuf::from("/abs/ca.pem"),
            server_name: "localhost".into(),
            deposit_key: Some(PathBuf::from("/abs/deposit.key")),
            admin_key: Some(PathBuf::from("/abs/admin.key")),
            witness_quorum: 0,
            witnesses: Vec::new(),
            replicas: vec![
                ReplicaAddress {
                    id: 1,
                    address: "127.0.0.1:7400".into(),
                },
                ReplicaAddress {
                    id: 2,
                    address: "127.0.0.1:7401".into(),
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.toml");
        let profile = sample();
        std::fs::write(&path, profile.to_toml_string().unwrap()).unwrap();
        let loaded = Profile::load(&path).unwrap();
        assert_eq!(loaded, profile);
        assert_eq!(loaded.chain_id_bytes().unwrap(), [7; 32]);

        let no_deposit = Profile {
            deposit_key: None,
            admin_key: None,
            ..profile
        };
        let text = no_deposit.to_toml_string().unwrap();
        assert!(!text.contains("deposit_key"), "{text}");
        assert!(!text.contains("admin_key"), "{text}");
        std::fs::write(&path, text).unwrap();
        assert_eq!(Profile::load(&path).unwrap(), no_deposit);
    }

    #[test]
    fn relative_paths_resolve_against_the_profile_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.toml");
        let text = format!(
            "chain_id = \"{}\"\noperator_public_key = \"{}\"\nca_cert = \"ca.pem\"\n\
             deposit_key = \"keys/deposit.key\"\nadmin_key = \"admin.key\"\n\n[[replicas]]\nid = 1\naddress = \"127.0.0.1:7400\"\n",
            to_hex(&[1; 32]),
            to_hex(&public_key(&generate_key())),
        );
        std::fs::write(&path, text).unwrap();
        let loaded = Profile::load(&path).unwrap();
        assert_eq!(loaded.ca_cert, dir.path().join("ca.pem"));
        assert_eq!(
            loaded.deposit_key.as_deref(),
            Some(dir.path().join("keys/deposit.key").as_path())
        );
        assert_eq!(
            loaded.admin_key.as_deref(),
            Some(dir.path().join("admin.key").as_path())
        );
        assert_eq!(loaded.server_name, "localhost", "the default server name");
    }

    #[test]
    fn the_admin_key_loads_or_its_absence_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key();
        crate::keys::write_key(&dir.path().join("admin.key"), &key).unwrap();
        let text = format!(
            "chain_id = \"{}\"\noperator_public_key = \"{}\"\nca_cert = \"ca.pem\"\n\
             admin_key = \"admin.key\"\n",
            to_hex(&[1; 32]),
            to_hex(&public_key(&generate_key())),
        );
        let path = dir.path().join("profile.toml");
        std::fs::write(&path, text).unwrap();
        let loaded = Profile::load(&path).unwrap();
        assert_eq!(
            public_key(&loaded.load_admin_key().unwrap()),
            public_key(&key)
        );
        let without = Profile {
            admin_key: None,
            ..loaded
        };
        let err = without.load_admin_key().unwrap_err().to_string();
        assert!(err.contains("admin_key"), "{err}");
        assert!(without.load_deposit_key().is_err());
    }

    #[test]
    fn invalid_profiles_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.toml");
        let check = |text: String, expected: &str| {
            std::fs::write(&path, text).unwrap();
            let err = Profile::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        };
        let key = to_hex(&public_key(&generate_key()));
        check(
            format!("chain_id = \"00\"\noperator_public_key = \"{key}\"\nca_cert = \"c\"\n"),
            "chain_id",
        );
        check(
            format!(
                "chain_id = \"{}\"\noperator_public_key = \"xyz\"\nca_cert = \"c\"\n",
                to_hex(&[0; 32])
            ),
            "operator_public_key",
        );
        check(
            format!(
                "chain_id = \"{}\"\noperator_public_key = \"{key}\"\nca_cert = \"c\"\ncolour = 1\n",
                to_hex(&[0; 32])
            ),
            "colour",
        );
    }
}
