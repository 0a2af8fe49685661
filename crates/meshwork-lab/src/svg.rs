//! Minimal, dependency-free SVG charts (lines and bars) for the scenarios' plots.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Dashed lines for bounds, solid for measurements.
    pub dashed: bool,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const PW: f64 = W - LEFT - RIGHT;
const PH: f64 = H - TOP - BOTTOM;

/// The document's start, the title, the plot frame, the y axis from 0 to `ymax` (five ticks)
/// and the axis labels.
fn frame(o: &mut String, title: &str, x_label: &str, y_label: &str, ymax: f64) {
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + PW / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let y = TOP + PH - f * PH;
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + PW,
            LEFT - 6.0,
            y + 4.0,
            trim(f * ymax)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{PW}" height="{PH}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + PW / 2.0,
        H - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + PH / 2.0,
        esc(y_label)
    );
}

/// One legend entry, `k`-th from the top: a line (`bar == false`) or a swatch.
fn legend(o: &mut String, k: usize, name: &str, color: &str, dash: &str, bar: bool) {
    let ly = TOP + 10.0 + k as f64 * 20.0;
    let lx = LEFT + PW + 12.0;
    if bar {
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{:.1}" width="24" height="10" fill="{color}"/>"#,
            ly - 5.0
        );
    } else {
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
        lx + 30.0,
        ly + 4.0,
        esc(name)
    );
}

/// A line chart with axes from 0, five ticks each, markers on measured points and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymax) = (0f64, 0f64);
    for &(x, y) in all {
        if x.is_finite() {
            xmax = xmax.max(x);
        }
        if y.is_finite() {
            ymax = ymax.max(y);
        }
    }
    let (xmax, ymax) = (nice_max(xmax), nice_max(ymax));
    let sx = |x: f64| LEFT + x / xmax * PW;
    let sy = |y: f64| TOP + PH - y / ymax * PH;
    let mut o = String::new();
    frame(&mut o, title, x_label, y_label, ymax);
    for i in 0..=5 {
        let x = sx(i as f64 / 5.0 * xmax);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + PH,
            TOP + PH + 16.0,
            trim(i as f64 / 5.0 * xmax)
        );
    }
    for (k, s) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        if !s.dashed {
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{c}"/>"#);
            }
        }
        legend(&mut o, k, &s.name, c, dash, false);
    }
    o.push_str("</svg>\n");
    o
}

/// Grouped bars: one group per category along x, one bar per series in each group (a value
/// that is not finite draws no bar), y from 0.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max),
    );
    let mut o = String::new();
    frame(&mut o, title, "", y_label, ymax);
    let group_w = PW / categories.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (i, cat) in categories.iter().enumerate() {
        let gx = LEFT + i as f64 * group_w;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w / 2.0,
            TOP + PH + 16.0,
            esc(cat)
        );
        for (k, (_, values)) in series.iter().enumerate() {
            let Some(v) = values.get(i).copied().filter(|v| v.is_finite()) else {
                continue;
            };
            let bh = v.max(0.0) / ymax * PH;
            let _ = writeln!(
                o,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}</title></rect>"#,
                gx + group_w * 0.1 + k as f64 * bar_w,
                TOP + PH - bh,
                bar_w * 0.9,
                COLORS[k % COLORS.len()],
                trim(v)
            );
        }
    }
    for (k, (name, _)) in series.iter().enumerate() {
        legend(&mut o, k, name, COLORS[k % COLORS.len()], "", true);
    }
    o.push_str("</svg>\n");
    o
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_well_formed_svg() {
        let svg = line_chart(
            "t <&>",
            "x",
            "y",
            &[
                Series {
                    name: "a".into(),
                    points: vec![(1.0, 2.0), (2.0, 4.0)],
                    dashed: false,
                },
                Series {
                    name: "b".into(),
                    points: vec![(1.0, f64::NAN), (2.0, 1.0)],
                    dashed: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn a_bar_chart_draws_one_bar_per_finite_value() {
        let svg = bar_chart(
            "bars",
            "%",
            &["a".into(), "b".into()],
            &[
                ("before".into(), vec![100.0, 99.0]),
                ("after".into(), vec![0.0, f64::NAN]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Three bars and two legend swatches.
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2 + 1);
        assert!(!svg.contains("NaN"));
    }
}
