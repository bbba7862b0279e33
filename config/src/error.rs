//! Config errors: each names the offending key, its value and the problem.

use std::fmt;

/// One problem with a config: the key it concerns, the value found there and what is wrong.
///
/// Displays as `key = value: problem`, e.g.
/// `raft.election_ticks = 2: must be greater than raft.heartbeat_ticks (2)`. When there is no
/// value to show (a missing key, an unknown key) it displays as `key: problem`, and when not even
/// a key is known (TOML syntax errors) as just the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", lead(.key, .value))]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `raft.election_ticks`, `peers[1].id` or
    /// `operator.deposit_keys[0]`. A whole section is named alone (`tls`). Empty for TOML syntax
    /// errors, which the problem then locates by line and column.
    pub key: String,
    /// The offending value as it would be written in TOML (strings quoted), or empty when there
    /// is none to show.
    pub value: String,
    /// What is wrong, phrased to follow `key = value: `.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            problem: problem.into(),
        }
    }
}

/// The part of a [`ConfigError`]'s message before the problem.
fn lead(key: &str, value: &str) -> String {
    match (key.is_empty(), value.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{key}: "),
        (false, false) => format!("{key} = {value}: "),
    }
}

/// Every problem found in a config, in the order they were found. Never empty when returned as
/// an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The dotted keys of the errors, in order; handy in tests and logs.
    pub fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|error| error.key.as_str()).collect()
    }
}

/// One error per line, so an operator sees every problem at once.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

// Handwritten: thiserror's derive cannot render a list, and there is no single source to chain.
impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}
