//! `statesync bench --plot DIR`: the load generator's sweep, drawn. The same
//! load on the hub, on the Redis baseline and on plain sockets (the floor),
//! point by point in one run: p99 against replicas and against document
//! size, as SVG.

use std::path::Path;

use plotters::prelude::*;
use serde_json::{Value, json};

/// One curve: a name and its (x, p99 ms) points.
pub(crate) struct Series {
    pub(crate) name: &'static str,
    pub(crate) points: Vec<(f64, f64)>,
}

/// The curves of one sweep: hub, Redis and the floor, from the sweep's
/// results (`{hub: {p99_ms}, redis: {p99_ms}, sockets: {p99_ms}}` each);
/// a baseline that was not run has no curve.
pub(crate) fn series_of(points: &[(f64, Value)]) -> Vec<Series> {
    let curve = |name: &'static str, key: &str| Series {
        name,
        points: points
            .iter()
            .filter_map(|(x, result)| Some((*x, result[key]["p99_ms"].as_f64()?)))
            .collect(),
    };
    [
        curve("state-sync hub", "hub"),
        curve("Redis pub/sub + GET", "redis"),
        curve("plain sockets (the floor)", "sockets"),
    ]
    .into_iter()
    .filter(|series| !series.points.is_empty())
    .collect()
}

/// One color per curve, in `series_of`'s order, each readable on white.
const COLORS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(90, 90, 90),
];

/// Draws `series` as lines over a logarithmic x axis into an SVG at `path`.
pub(crate) fn draw(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    if x_min >= x_max {
        return Err("a sweep needs at least two points".into());
    }
    // Labels at the measured points only: a log axis labels too much.
    let mut key_points: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    key_points.sort_by(f64::total_cmp);
    key_points.dedup();
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x_min * 0.9..x_max * 1.1)
                .log_scale()
                .with_key_points(key_points),
            0.0..y_max * 1.15,
        )?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x_label)
        .y_desc("p99 convergence (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(
            s.points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The sweep's results as one JSON document.
pub(crate) fn summary(by_replicas: &[(f64, Value)], by_size: &[(f64, Value)]) -> Value {
    let rows = |points: &[(f64, Value)], x: &str| -> Vec<Value> {
        points
            .iter()
            .map(|(at, r)| {
                json!({
                    x: at,
                    "hub_p99_ms": r["hub"]["p99_ms"],
                    "redis_p99_ms": r["redis"]["p99_ms"],
                    "sockets_p99_ms": r["sockets"]["p99_ms"],
                    "hub_over_redis": r["hub_over_redis"],
                    "hub_over_sockets": r["hub_over_sockets"],
                })
            })
            .collect()
    };
    json!({
        "p99_by_replicas": rows(by_replicas, "replicas"),
        "p99_by_document_bytes": rows(by_size, "payload_bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_is_drawn_as_an_svg_with_a_curve_per_system() {
        let dir = tempfile::tempdir().unwrap();
        let point = |hub: f64, redis: f64, sockets: f64| json!({"hub": {"p99_ms": hub}, "redis": {"p99_ms": redis}, "sockets": {"p99_ms": sockets}});
        let points = vec![
            (100.0, point(3.0, 9.0, 1.0)),
            (1000.0, point(14.0, 90.0, 8.0)),
        ];
        let path = dir.path().join("p99.svg");
        draw(&path, "p99", "replicas", &series_of(&points)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("state-sync hub") && svg.contains("Redis pub/sub + GET"));
        assert!(svg.contains("plain sockets (the floor)"));
        assert!(draw(&path, "p99", "replicas", &series_of(&points[..1])).is_err());
    }

    #[test]
    fn a_baseline_that_was_not_run_has_no_curve() {
        let points = vec![(
            100.0,
            json!({"hub": {"p99_ms": 3.0}, "redis": {"p99_ms": 9.0}}),
        )];
        let names: Vec<_> = series_of(&points).iter().map(|s| s.name).collect();
        assert_eq!(names, ["state-sync hub", "Redis pub/sub + GET"]);
    }
}
