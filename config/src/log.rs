//! `log.level`: a `tracing` filter, checked without depending on `tracing` (this crate does no
//! IO and stays small). The server hands the same string to `tracing-subscriber`.

/// The level names `tracing` knows, lowercase.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a filter such as `info` or `tally_core=debug,info`: comma-separated directives, each
/// a level or `TARGET=LEVEL` (`TARGET[SPAN{FIELD=VALUE}]=LEVEL` too), every level one of
/// [`LEVELS`] in any case. `tracing` would take a bare word that is not a level as a target
/// at level `trace` (so `infoo` would silently log everything of a target that does not
/// exist); here it is an error, and `TARGET=trace` says that on purpose.
pub(crate) fn check_log_level(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    for directive in filter.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err("has an empty directive (two commas, or a trailing comma)".to_owned());
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if target.is_some_and(str::is_empty) {
            return Err(format!("directive `{directive}` has no target before `=`"));
        }
        if !LEVELS.iter().any(|known| known.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "unknown level `{level}` in `{directive}`: use one of {}, or TARGET=LEVEL",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_log_level;

    #[test]
    fn filters() {
        for good in [
            "info",
            "WARN",
            " debug ",
            "tally_core=debug,info",
            "tally_server::net=trace, warn",
            "off",
            "tally[conn{peer=1}]=debug",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good:?}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("infoo", "unknown level `infoo`"),
            ("tally_core", "unknown level `tally_core`"),
            ("tally_core=verbose", "unknown level `verbose`"),
            ("info,", "empty directive"),
            ("=info", "no target"),
        ] {
            let problem = check_log_level(bad).unwrap_err();
            assert!(problem.contains(says), "{bad:?}: {problem}");
        }
    }
}
