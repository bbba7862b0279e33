//! The archive's location: one parser for `archive.url`, `tally-server --archive` and
//! `tally audit --archive`, so that every tool reads a URL the same way.

use std::path::{Path, PathBuf};

/// Where an archive lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveUrl {
    /// An S3 bucket and a key prefix inside it (without leading or trailing `/`; may be empty).
    S3 { bucket: String, prefix: String },
    /// A local directory (absolute once the config's paths are resolved).
    File(PathBuf),
}

impl ArchiveUrl {
    /// Parses `s3://bucket[/prefix]`, `file:///absolute/path` or a plain path.
    pub fn parse(text: &str) -> Result<ArchiveUrl, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(format!(
                    "bucket {bucket:?} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == "." || part == "..") {
                return Err("the prefix must not contain '.' or '..' segments".into());
            }
            return Ok(ArchiveUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err("a file:// URL needs an absolute path (file:///path)".into());
            }
            return Ok(ArchiveUrl::File(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unsupported scheme {scheme:?}: use s3://bucket/prefix, file:///path or a path"
            ));
        }
        Ok(ArchiveUrl::File(PathBuf::from(text)))
    }

    /// A plain relative path taken relative to `base` (the config file's directory).
    pub fn resolved(self, base: &Path) -> ArchiveUrl {
        match self {
            ArchiveUrl::File(p) if p.is_relative() => ArchiveUrl::File(base.join(p)),
            other => other,
        }
    }
}

impl std::fmt::Display for ArchiveUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            ArchiveUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            ArchiveUrl::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<ArchiveUrl, &str>) {
        let got = ArchiveUrl::parse(text);
        match expected {
            Ok(url) => assert_eq!(got, Ok(url), "{text}"),
            Err(part) => {
                let e = got.expect_err(text);
                assert!(e.contains(part), "{text}: {e}");
            }
        }
    }

    #[test]
    fn parses_every_form() {
        let s3 = |b: &str, p: &str| {
            Ok(ArchiveUrl::S3 {
                bucket: b.into(),
                prefix: p.into(),
            })
        };
        check("s3://ledger", s3("ledger", ""));
        check("s3://ledger/a/b/", s3("ledger", "a/b"));
        check(
            "file:///var/tally",
            Ok(ArchiveUrl::File("/var/tally".into())),
        );
        check("archive", Ok(ArchiveUrl::File("archive".into())));
        check("", Err("empty"));
        check("s3://Ab", Err("valid S3 bucket"));
        check("s3://ledger/../x", Err("'..'"));
        check("file://relative", Err("absolute"));
        check("gs://x/y", Err("unsupported scheme"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let url = ArchiveUrl::parse("archive")
            .unwrap()
            .resolved(Path::new("/etc/tally"));
        assert_eq!(url, ArchiveUrl::File("/etc/tally/archive".into()));
        assert_eq!(url.to_string(), "file:///etc/tally/archive");
        let s3 = ArchiveUrl::parse("s3://b-1/p").unwrap();
        assert_eq!(s3.clone().resolved(Path::new("/x")), s3);
    }
}
