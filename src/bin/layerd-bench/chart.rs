//! The sweep chart: calls/s and p99 latency against tensor size, log-log, one
//! line per server and kind; written as SVG and PNG.

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;

use crate::report::Summary;

type Series = BTreeMap<String, Vec<(f64, f64, f64)>>;

/// Writes `prefix.svg` and `prefix.png`.
pub fn write(runs: &[Summary], prefix: &Path) -> Result<(), String> {
    let mut series: Series = BTreeMap::new();
    for r in runs {
        series
            .entry(format!("{} {}", r.label, r.kind))
            .or_default()
            .push((
                r.elements.max(1) as f64,
                r.calls_per_s.max(1e-3),
                r.latency_us.p99.max(1) as f64,
            ));
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    register_font()?;
    let svg = prefix.with_extension("svg");
    draw(
        SVGBackend::new(&svg, (1200, 500)).into_drawing_area(),
        &series,
    )
    .map_err(|e| format!("{}: {e}", svg.display()))?;
    let png = prefix.with_extension("png");
    draw(
        BitMapBackend::new(&png, (1200, 500)).into_drawing_area(),
        &series,
    )
    .map_err(|e| format!("{}: {e}", png.display()))?;
    Ok(())
}

/// Laying out text (and drawing it in the PNG) needs a TrueType font.
fn register_font() -> Result<(), String> {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    let bytes = CANDIDATES
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .ok_or("no TrueType font for the PNG chart: install fonts-dejavu-core")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "the font could not be read".to_string())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    series: &Series,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, series, "calls/s", |p| p.1)?;
    panel(&right, series, "p99 latency (us)", |p| p.2)?;
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    series: &Series,
    what: &str,
    value: impl Fn(&(f64, f64, f64)) -> f64,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let points = series.values().flatten();
    let (x_min, x_max) = points.clone().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_min, y_max) = points.fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(value(p)), hi.max(value(p)))
    });
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{what} vs tensor size"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25).log_scale(),
            (y_min * 0.8..y_max * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("elements per tensor")
        .y_desc(what)
        .x_label_formatter(&|v| si(*v))
        .y_label_formatter(&|v| si(*v))
        .draw()?;
    for (index, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, value(p))),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            pts.iter()
                .map(|p| Circle::new((p.0, value(p)), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn si(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.0}M", v / 1e6),
        v if v >= 1e3 => format!("{:.0}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}
