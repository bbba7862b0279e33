//! The one integration-test binary of tally-config.

mod docs;
mod parse;
mod validate;

use tally_config::{Config, ConfigErrors};

/// A chain id and a deposit key that are valid in shape (64 hex characters).
pub const CHAIN_ID: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
pub const DEPOSIT_KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

/// The smallest config that validates: the required sections, everything else at its default.
pub fn minimal() -> String {
    format!(
        r#"
[node]
chain_id = "{CHAIN_ID}"

[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"

[operator]
signing_key = "operator.key"
deposit_keys = ["{DEPOSIT_KEY}"]
"#
    )
}

/// The smallest threshold config that validates: [`minimal`] with this replica's key share
/// (`operator.signing_key_share`) instead of the whole key, and two peers (a single node
/// keeps a plain key).
pub fn threshold_minimal() -> String {
    let share = minimal().replace(
        "signing_key = \"operator.key\"",
        "signing_key_share = \"node1.share\"",
    );
    format!(
        r#"{share}
[[peers]]
id = 2
address = "127.0.0.1:7502"
client_address = "127.0.0.1:7402"

[[peers]]
id = 3
address = "127.0.0.1:7503"
client_address = "127.0.0.1:7403"
"#
    )
}

/// [`minimal`] with `fragment` laid over it: tables merge key by key, any other value in the
/// fragment (arrays included) replaces the base's. So a case states only what it changes.
pub fn valid_with(fragment: &str) -> String {
    valid_over(&minimal(), fragment)
}

/// [`threshold_minimal`] with `fragment` laid over it, as [`valid_with`] does.
pub fn threshold_with(fragment: &str) -> String {
    valid_over(&threshold_minimal(), fragment)
}

/// `base` with `fragment` laid over it, as [`valid_with`] describes.
pub fn valid_over(base: &str, fragment: &str) -> String {
    fn merge(base: &mut toml::Table, over: toml::Table) {
        for (key, value) in over {
            match (base.get_mut(&key), value) {
                (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
                (_, value) => {
                    base.insert(key, value);
                }
            }
        }
    }
    let mut base: toml::Table = base.parse().expect("the base is TOML");
    let over: toml::Table = fragment.parse().expect("the fragment is TOML");
    merge(&mut base, over);
    toml::to_string(&base).expect("a merged table serializes")
}

/// Parses and validates `text`, returning every error (none if it is valid).
pub fn errors(text: &str) -> ConfigErrors {
    match Config::from_toml_str(text).and_then(|config| config.validate()) {
        Ok(()) => ConfigErrors(Vec::new()),
        Err(errors) => errors,
    }
}
