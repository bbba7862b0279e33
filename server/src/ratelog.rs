//! Rate-limited log lines, for every line a remote party can trigger (a refused connection, a
//! failed handshake, an unauthenticated peer): at most one line per interval per call site, and
//! that line says how many were left out before it. A flood of such events costs a few atomic
//! operations each, not a line each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// One call site's budget. Declare it `static` next to the line it guards.
pub struct RateLog {
    interval_ms: u64,
    /// Milliseconds since [`process_start`] before which no line is written.
    next_ms: AtomicU64,
    /// Events since the last line written.
    suppressed: AtomicU64,
}

/// The default spacing of lines from one call site.
pub const RATE_LOG_INTERVAL_MS: u64 = 10_000;

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl RateLog {
    pub const fn new(interval_ms: u64) -> RateLog {
        RateLog {
            interval_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Counts one event; `Some(left_out)` when a line may be written now, with the number of
    /// events left out since the last line.
    pub fn allow(&self) -> Option<u64> {
        let now = process_start().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// Writes a `tracing` event at `$level` through the [`RateLog`] `$site`, adding the field
/// `left_out` (events not logged since the last line).
#[macro_export]
macro_rules! rate_log {
    ($site:expr, $level:ident, $($rest:tt)+) => {
        if let Some(left_out) = $site.allow() {
            tracing::$level!(left_out, $($rest)+);
        }
    };
}

/// rustls logs (through the `log` crate, which `tracing` picks up) a WARN for every ClientHello
/// that names an IP address as SNI, and similar lines anyone can trigger once per connection.
/// Unless the operator's filter names rustls itself, only its errors pass.
pub fn quiet_rustls(filter: EnvFilter, text: &str) -> EnvFilter {
    if text.contains("rustls") {
        return filter;
    }
    filter.add_directive("rustls=error".parse().expect("a valid directive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_quiet_unless_asked_for() {
        let quiet = quiet_rustls(EnvFilter::new("info"), "info").to_string();
        assert!(quiet.contains("rustls=error"), "{quiet}");
        let asked = "info,rustls=debug";
        let kept = quiet_rustls(EnvFilter::new(asked), asked).to_string();
        assert!(!kept.contains("rustls=error"), "{kept}");
    }

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let site = RateLog::new(60_000);
        assert_eq!(site.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(site.allow(), None);
        }
        assert_eq!(site.suppressed.load(Ordering::Relaxed), 1000);
        // Once the interval passed, the next line reports what was left out.
        site.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(site.allow(), Some(1000));
        assert_eq!(site.allow(), None);
    }
}
