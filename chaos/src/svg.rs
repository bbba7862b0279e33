//! A hand-written SVG of a live run: confirmations per second (top) and the p99 latency of
//! first-try confirmations per second (bottom), with every fault drawn as a shaded span from
//! its start to its heal.

use std::fmt::Write as _;

use crate::report::{FaultEvent, Report};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PANEL: f64 = 200.0;
const TOP: f64 = 70.0;
const GAP: f64 = 50.0;

/// The colour of a fault family.
fn colour(kind: &str) -> &'static str {
    if kind.starts_with("kill") {
        "#d62728"
    } else if kind.starts_with("pause") {
        "#ff7f0e"
    } else if kind.starts_with("restart") {
        "#9467bd"
    } else if kind.starts_with("partition") {
        "#1f77b4"
    } else if kind.starts_with("cut-client") {
        "#2ca02c"
    } else if kind.starts_with("archive") {
        "#8c564b"
    } else {
        "#000000"
    }
}

/// A short label for a fault on the plot.
fn label(kind: &str) -> String {
    kind.replace("partition-", "part-")
        .replace("asymmetric-", "asym-")
        .replace("leader", "L")
        .replace("backup", "B")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round upper bound for an axis.
fn nice_max(v: u64) -> u64 {
    let v = v.max(1);
    let mut step = 1u64;
    while step * 10 < v {
        step *= 10;
    }
    v.div_ceil(step) * step
}

pub fn render(report: &Report) -> String {
    let seconds = report.throughput.len().max(1) as f64;
    let plot_w = WIDTH - LEFT - RIGHT;
    let height = TOP + 2.0 * PANEL + GAP + 60.0;
    let x = |second: f64| LEFT + plot_w * second / seconds;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let title = format!(
        "tally-chaos live, seed {}, {} replicas, {} clients: {} confirmed, {} faults, {}",
        report.seed,
        report.nodes,
        report.clients,
        report.ops.confirmed,
        report.fault_log.len(),
        if report.ok {
            "all invariants hold".to_string()
        } else {
            format!("FAILED: {}", report.failed_invariants().join(", "))
        }
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    let panels = [
        (TOP, "confirmations / s"),
        (TOP + PANEL + GAP, "p99 latency (ms)"),
    ];
    // Fault spans under the data, across both panels.
    for (i, f) in report.fault_log.iter().enumerate() {
        fault_span(&mut s, f, i, &x);
    }
    let max_tp = nice_max(
        report
            .throughput
            .iter()
            .map(|t| t.confirmed)
            .max()
            .unwrap_or(1),
    );
    let max_lat = nice_max(
        report
            .throughput
            .iter()
            .map(|t| t.p99_latency_ms)
            .max()
            .unwrap_or(1),
    );
    for (panel, (top, name)) in panels.iter().enumerate() {
        let max = if panel == 0 { max_tp } else { max_lat };
        let bottom = top + PANEL;
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#888"/>"##
        );
        for tick in 0..=4 {
            let v = max * tick / 4;
            let y = bottom - PANEL * tick as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{name}</text>"#,
            top + PANEL / 2.0,
            top + PANEL / 2.0
        );
        let mut points = String::new();
        for t in &report.throughput {
            let v = if panel == 0 {
                t.confirmed
            } else {
                t.p99_latency_ms
            };
            let y = bottom - PANEL * (v.min(max) as f64) / max as f64;
            if panel == 0 {
                let w = (plot_w / seconds - 1.0).max(0.5);
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="#4c72b0"/>"##,
                    x(t.second as f64),
                    bottom - y
                );
            } else {
                let _ = write!(points, "{:.1},{y:.1} ", x(t.second as f64 + 0.5));
            }
        }
        if panel == 1 {
            let _ = writeln!(
                s,
                r##"<polyline points="{points}" fill="none" stroke="#c44e52" stroke-width="1.5"/>"##
            );
        }
    }
    // Time axis under the bottom panel.
    let axis_y = TOP + 2.0 * PANEL + GAP;
    let step = ((seconds / 12.0).ceil() as u64).max(1);
    let mut t = 0u64;
    while (t as f64) <= seconds {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
            x(t as f64),
            axis_y + 16.0
        );
        t += step;
    }
    // Legend.
    let legend = [
        ("kill", "#d62728"),
        ("pause", "#ff7f0e"),
        ("restart", "#9467bd"),
        ("partition", "#1f77b4"),
        ("cut-client", "#2ca02c"),
        ("injected bug", "#000000"),
    ];
    for (i, (name, c)) in legend.iter().enumerate() {
        let lx = LEFT + i as f64 * 120.0;
        let ly = axis_y + 36.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{c}" fill-opacity="0.35"/><text x="{}" y="{ly}">{name}</text>"#,
            ly - 10.0,
            lx + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fault_span(s: &mut String, f: &FaultEvent, i: usize, x: &impl Fn(f64) -> f64) {
    let start = x(f.at_ms as f64 / 1000.0);
    let end = x(f.healed_at_ms.max(f.at_ms + 100) as f64 / 1000.0);
    let c = colour(&f.kind);
    let bottom = TOP + 2.0 * PANEL + GAP;
    let _ = writeln!(
        s,
        r#"<rect x="{start:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{c}" fill-opacity="0.15"><title>{}</title></rect>"#,
        (end - start).max(1.0),
        bottom - TOP,
        escape(&format!(
            "{} at {} ms, healed at {} ms, nodes {:?}: {}",
            f.kind, f.at_ms, f.healed_at_ms, f.targets, f.detail
        ))
    );
    let _ = writeln!(
        s,
        r#"<line x1="{start:.1}" y1="{TOP}" x2="{start:.1}" y2="{bottom}" stroke="{c}" stroke-width="1"/>"#
    );
    // Labels alternate between three rows so that neighbours do not overlap.
    let ly = TOP - 6.0 - 12.0 * (i % 3) as f64;
    let _ = writeln!(
        s,
        r#"<text x="{start:.1}" y="{ly}" fill="{c}" font-size="9">{}</text>"#,
        escape(&label(&f.kind))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_bounds_are_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(7), 7);
        assert_eq!(nice_max(87), 90);
        assert_eq!(nice_max(1234), 2000);
    }
}
