//! `coremq-perf plot`: a latency-percentile chart from run reports.
//!
//! Reads one or more JSON reports (as written by `coremq-perf run --json`)
//! and draws two panels side by side, publish latency (send → ack) and
//! end-to-end latency (send → consumer), each with one line per report over
//! the percentiles p50, p90 (when a report has it), p99, p99.9, p99.99 and
//! max, equally spaced (one "nine" per step), on a logarithmic latency axis.
//! A report's line is labelled with its `driver` field (the peer drivers set
//! it), or the file name without `.json` when it has none; reports that
//! would share a label get the file name added. `--label` sets labels
//! explicitly, in the order of the reports.
//!
//! The output format follows the extension: `.svg` (text is left to the
//! viewer's fonts) or `.png` (rendered here, with the Hack font embedded in
//! the binary, so no system font or library is needed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use clap::Args;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde::Deserialize;

/// Size of the whole picture in pixels (two panels side by side).
pub const PLOT_SIZE: (u32, u32) = (1400, 560);
/// Font family every text of the chart uses (registered from the embedded font).
const FONT: &str = "sans-serif";
/// One colour per report, in order (repeats after the last).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no reports to plot")]
    NoReports,
    #[error("{labels} labels for {reports} reports (give one --label per report, or none)")]
    LabelCount { labels: usize, reports: usize },
    #[error("cannot read report {path}: {source}")]
    ReadReport {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not JSON, or JSON without the latency percentiles of a run report.
    #[error("bad report {path}: {source}")]
    BadReport {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot tell the format of {path}: the output must end in .svg or .png")]
    UnknownFormat { path: PathBuf },
    #[error("cannot draw the plot: {0}")]
    Draw(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PlotError {
    /// Whether the error is the user's to fix (bad input or arguments).
    pub fn is_usage(&self) -> bool {
        !matches!(self, PlotError::Draw(_) | PlotError::Write { .. })
    }
}

/// `coremq-perf plot` arguments.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Output file: .svg or .png
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Title above both panels [default: the first report's workload name]
    #[arg(long, value_name = "TEXT")]
    pub title: Option<String>,
    /// Label of a report's line, once per report in order [default: its driver, or the file name]
    #[arg(long, value_name = "TEXT")]
    pub label: Vec<String>,
    /// Run reports (`coremq-perf run --json`)
    #[arg(value_name = "REPORT.json", required = true)]
    pub reports: Vec<PathBuf>,
}

/// Latency percentiles of one histogram in µs; `p90` is optional (older
/// reports lack it), `count` 0 means nothing was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    #[serde(default)]
    pub p90: Option<f64>,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    #[serde(default)]
    pub count: Option<u64>,
}

impl Percentiles {
    /// Whether there is anything to draw.
    fn has_samples(&self) -> bool {
        match self.count {
            Some(n) => n > 0,
            None => self.max > 0.0,
        }
    }

    /// The value in column `c`, if the report has it.
    fn value(&self, c: Column) -> Option<f64> {
        match c {
            Column::P50 => Some(self.p50),
            Column::P90 => self.p90,
            Column::P99 => Some(self.p99),
            Column::P999 => Some(self.p999),
            Column::P9999 => Some(self.p9999),
            Column::Max => Some(self.max),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct WorkloadName {
    #[serde(default)]
    name: Option<String>,
}

/// The part of a run report the plot needs.
#[derive(Debug, Clone, Deserialize)]
pub struct PlotReport {
    /// Which system was measured (set by the peer drivers).
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    workload: Option<WorkloadName>,
    pub publish_latency_us: Percentiles,
    pub e2e_latency_us: Percentiles,
}

impl PlotReport {
    /// Parses a report from JSON text; `path` is only for the error.
    pub fn parse(text: &str, path: &Path) -> Result<PlotReport, PlotError> {
        serde_json::from_str(text).map_err(|source| PlotError::BadReport {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a report file.
    pub fn load(path: &Path) -> Result<PlotReport, PlotError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlotError::ReadReport {
            path: path.to_path_buf(),
            source,
        })?;
        PlotReport::parse(&text, path)
    }

    fn workload_name(&self) -> Option<&str> {
        self.workload.as_ref()?.name.as_deref()
    }
}

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub report: PlotReport,
}

/// The percentile columns of the x axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    P50,
    P90,
    P99,
    P999,
    P9999,
    Max,
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Column::P50 => "p50",
            Column::P90 => "p90",
            Column::P99 => "p99",
            Column::P999 => "p99.9",
            Column::P9999 => "p99.99",
            Column::Max => "max",
        }
    }
}

/// The columns to draw: p90 only if some report has it.
fn columns(series: &[Series]) -> Vec<Column> {
    let any_p90 = series.iter().any(|s| {
        s.report.publish_latency_us.p90.is_some() || s.report.e2e_latency_us.p90.is_some()
    });
    let mut cols = vec![Column::P50];
    if any_p90 {
        cols.push(Column::P90);
    }
    cols.extend([Column::P99, Column::P999, Column::P9999, Column::Max]);
    cols
}

/// The file name without its directory and `.json`.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Labels for the reports: explicit ones, or each report's driver (else its
/// file name), with the file name added where two would be the same.
pub fn labels(
    reports: &[(PathBuf, PlotReport)],
    explicit: &[String],
) -> Result<Vec<String>, PlotError> {
    if !explicit.is_empty() {
        if explicit.len() != reports.len() {
            return Err(PlotError::LabelCount {
                labels: explicit.len(),
                reports: reports.len(),
            });
        }
        return Ok(explicit.to_vec());
    }
    let base: Vec<String> = reports
        .iter()
        .map(|(path, r)| r.driver.clone().unwrap_or_else(|| file_stem(path)))
        .collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for b in &base {
        *seen.entry(b.as_str()).or_default() += 1;
    }
    Ok(base
        .iter()
        .zip(reports)
        .map(|(b, (path, _))| {
            let stem = file_stem(path);
            if seen[b.as_str()] > 1 && *b != stem {
                format!("{b} ({stem})")
            } else {
                b.clone()
            }
        })
        .collect())
}

/// A latency in µs as the axis shows it.
fn format_us(us: f64) -> String {
    let (v, unit) = if us >= 1e6 {
        (us / 1e6, "s")
    } else if us >= 1e3 {
        (us / 1e3, "ms")
    } else {
        (us, "µs")
    };
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Registers the embedded font once; every backend measures text with it.
fn register_font() -> Result<(), PlotError> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw("the embedded font does not load".into()))
    }
}

/// The lowest and highest value to show (log axis: positive, with margin).
fn y_range(series: &[Series], cols: &[Column]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi: f64 = 0.0;
    for s in series {
        for p in [&s.report.publish_latency_us, &s.report.e2e_latency_us] {
            if !p.has_samples() {
                continue;
            }
            for v in cols.iter().filter_map(|&c| p.value(c)) {
                let v = v.max(1.0);
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    (lo / 2.0, (hi * 2.0).max(lo * 10.0))
}

type DrawResult = Result<(), PlotError>;

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// Draws one panel: `pick` chooses publish or end-to-end from each report.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    series: &[Series],
    cols: &[Column],
    y: (f64, f64),
    pick: fn(&PlotReport) -> &Percentiles,
) -> DrawResult {
    let n = cols.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // Integer ranges include their end: n columns are 0..=n-1.
        .build_cartesian_2d((0..n - 1).into_segmented(), (y.0..y.1).log_scale())
        .map_err(draw_err)?;
    let col_name = |v: &SegmentValue<usize>| match v {
        SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
            cols.get(*i).map_or(String::new(), |c| c.name().to_string())
        }
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&col_name)
        .y_label_formatter(&|v| format_us(*v))
        .x_desc("percentile")
        .y_desc("latency")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    let mut drawn = 0;
    for (i, s) in series.iter().enumerate() {
        let p = pick(&s.report);
        if !p.has_samples() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(SegmentValue<usize>, f64)> = cols
            .iter()
            .enumerate()
            .filter_map(|(x, &c)| p.value(c).map(|v| (SegmentValue::CenterOf(x), v.max(1.0))))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|pt| Circle::new(pt, 3, color.filled())),
            )
            .map_err(draw_err)?;
        drawn += 1;
    }
    if drawn > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 14))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Draws the whole picture on `root`.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
) -> DrawResult {
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root.titled(title, (FONT, 22)).map_err(draw_err)?;
    let cols = columns(series);
    let y = y_range(series, &cols);
    let panels = root.split_evenly((1, 2));
    draw_panel(
        &panels[0],
        "publish latency (send → ack)",
        series,
        &cols,
        y,
        |r| &r.publish_latency_us,
    )?;
    draw_panel(
        &panels[1],
        "end-to-end latency (send → consume)",
        series,
        &cols,
        y,
        |r| &r.e2e_latency_us,
    )?;
    root.present().map_err(draw_err)
}

/// Renders the chart as SVG text.
pub fn render_svg(title: &str, series: &[Series]) -> Result<String, PlotError> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
        draw(root, title, series)?;
    }
    Ok(svg)
}

/// Renders the chart as a PNG file at `path`.
pub fn render_png(path: &Path, title: &str, series: &[Series]) -> Result<(), PlotError> {
    register_font()?;
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    draw(root, title, series)
}

enum Format {
    Svg,
    Png,
}

fn format_of(path: &Path) -> Result<Format, PlotError> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => Err(PlotError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// `coremq-perf plot`: reads the reports, draws, writes `args.out`.
pub fn run(args: &PlotArgs) -> Result<(), PlotError> {
    if args.reports.is_empty() {
        return Err(PlotError::NoReports);
    }
    let format = format_of(&args.out)?;
    let mut loaded = Vec::new();
    for path in &args.reports {
        loaded.push((path.clone(), PlotReport::load(path)?));
    }
    let labels = labels(&loaded, &args.label)?;
    let title = args
        .title
        .clone()
        .or_else(|| loaded[0].1.workload_name().map(str::to_string))
        .unwrap_or_else(|| "latency percentiles".to_string());
    let series: Vec<Series> = labels
        .into_iter()
        .zip(loaded)
        .map(|(label, (_, report))| Series { label, report })
        .collect();
    match format {
        Format::Svg => {
            let svg = render_svg(&title, &series)?;
            std::fs::write(&args.out, svg).map_err(|source| PlotError::Write {
                path: args.out.clone(),
                source,
            })
        }
        Format::Png => render_png(&args.out, &title, &series),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How the SVG draws a report's line (and its legend entry).
    const SERIES_STROKE: &str = "stroke-width=\"2\"";

    fn report(driver: Option<&str>, scale: f64, consumed: u64) -> String {
        let lat = |s: f64, n: u64| {
            serde_json::json!({
                "p50": 12.0 * s, "p99": 80.0 * s, "p999": 400.0 * s,
                "p9999": 2000.0 * s, "max": 3000.0 * s, "mean": 20.0 * s, "count": n
            })
        };
        let mut v = serde_json::json!({
            "publish_msgs_per_s": 1000.0,
            "publish_latency_us": lat(scale, 100),
            "e2e_latency_us": lat(scale * 2.0, consumed),
            "workload": {"name": "1 topic / 2 queues"},
        });
        if let Some(d) = driver {
            v["driver"] = serde_json::json!(d);
        }
        v.to_string()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn args(out: PathBuf, reports: Vec<PathBuf>) -> PlotArgs {
        PlotArgs {
            out,
            title: None,
            label: Vec::new(),
            reports,
        }
    }

    #[test]
    fn two_reports_make_an_svg_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "coremq.json", &report(None, 1.0, 100));
        let b = write(dir.path(), "peer.json", &report(Some("nats"), 5.0, 100));
        let out = dir.path().join("plot.svg");
        run(&args(out.clone(), vec![a, b])).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in [
            "coremq",
            "nats",
            "p99.99",
            "max",
            "publish latency",
            "end-to-end latency",
            "1 topic / 2 queues",
        ] {
            assert!(svg.contains(text), "svg lacks {text:?}");
        }
        // One line per report and panel, and its legend entry.
        assert_eq!(svg.matches(SERIES_STROKE).count(), 2 * 2 * 2);
    }

    #[test]
    fn png_output_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.json", &report(Some("coremq"), 1.0, 100));
        let out = dir.path().join("plot.png");
        run(&args(out.clone(), vec![a])).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 1000);
    }

    #[test]
    fn bad_input_gives_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plot.svg");
        let bad = write(dir.path(), "bad.json", "{ not json");
        let e = run(&args(out.clone(), vec![bad])).unwrap_err();
        assert!(matches!(e, PlotError::BadReport { .. }), "{e}");
        assert!(e.is_usage());
        let no_latency = write(dir.path(), "partial.json", r#"{"publish_msgs_per_s": 1}"#);
        let e = run(&args(out.clone(), vec![no_latency])).unwrap_err();
        assert!(matches!(e, PlotError::BadReport { .. }), "{e}");
        assert!(e.to_string().contains("publish_latency_us"), "{e}");
        let e = run(&args(out.clone(), vec![dir.path().join("missing.json")])).unwrap_err();
        assert!(matches!(e, PlotError::ReadReport { .. }), "{e}");
        let good = write(dir.path(), "good.json", &report(None, 1.0, 1));
        let e = run(&args(dir.path().join("plot.jpg"), vec![good.clone()])).unwrap_err();
        assert!(matches!(e, PlotError::UnknownFormat { .. }), "{e}");
        let mut a = args(out.clone(), vec![good]);
        a.label = vec!["x".into(), "y".into()];
        assert!(matches!(
            run(&a).unwrap_err(),
            PlotError::LabelCount { labels: 2, .. }
        ));
        assert!(matches!(
            run(&args(out.clone(), vec![])).unwrap_err(),
            PlotError::NoReports
        ));
        assert!(!out.exists());
    }

    #[test]
    fn labels_come_from_driver_or_file_and_stay_distinct() {
        let r = |d: Option<&str>| PlotReport::parse(&report(d, 1.0, 1), Path::new("x")).unwrap();
        let reports = vec![
            (PathBuf::from("/r/async.json"), r(Some("coremq"))),
            (PathBuf::from("/r/sync.json"), r(Some("coremq"))),
            (PathBuf::from("/r/nats.json"), r(Some("nats"))),
            (PathBuf::from("/r/other.json"), r(None)),
        ];
        assert_eq!(
            labels(&reports, &[]).unwrap(),
            ["coremq (async)", "coremq (sync)", "nats", "other"]
        );
        let explicit: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(labels(&reports, &explicit).unwrap(), explicit);
    }

    #[test]
    fn empty_histograms_are_left_out_and_p90_adds_a_column() {
        let mut no_consumers = PlotReport::parse(&report(None, 1.0, 0), Path::new("x")).unwrap();
        let s = vec![Series {
            label: "solo".into(),
            report: no_consumers.clone(),
        }];
        assert_eq!(columns(&s).len(), 5);
        let svg = render_svg("t", &s).unwrap();
        // Publish only: one line and its legend entry.
        assert_eq!(svg.matches(SERIES_STROKE).count(), 2);
        no_consumers.publish_latency_us.p90 = Some(50.0);
        let s = vec![Series {
            label: "solo".into(),
            report: no_consumers,
        }];
        assert_eq!(columns(&s).len(), 6);
        assert!(render_svg("t", &s).unwrap().contains("p90"));
    }

    #[test]
    fn axis_labels_have_units() {
        assert_eq!(format_us(5.0), "5 µs");
        assert_eq!(format_us(2.5), "2.5 µs");
        assert_eq!(format_us(1500.0), "1.5 ms");
        assert_eq!(format_us(20_000.0), "20 ms");
        assert_eq!(format_us(3e6), "3 s");
        let (lo, hi) = y_range(&[], &[Column::P50]);
        assert!(lo > 0.0 && hi > lo);
    }
}
