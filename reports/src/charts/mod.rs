//! Charts: a small declarative model (`Figure`) and one renderer that draws it twice, to a
//! PNG file and to an SVG string (kept for inlining into the HTML report).
//!
//! Figure builders (`run`, `sweep`) turn results into figures and do all the data work
//! (downsampling, ranges, ticks); this module only draws. Keeping the two apart lets the data
//! side be unit-tested without pixels, and makes every chart share the same fonts, sizes and
//! colours.
//!
//! Determinism: drawing order is the order of the model's vectors (plotters' `Histogram`
//! iterates a `HashMap`, so it is avoided), ticks are computed here rather than by plotters,
//! so the same figure always gives the same SVG bytes.

pub(crate) mod run;
pub(crate) mod sweep;

use crate::error::ReportError;
use crate::files;
use crate::format;
use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The chart font, embedded so rendering never depends on the machine's fonts (plotters'
/// `ab_glyph` backend has no system font lookup). Licence: `assets/LICENSE-DejaVu.txt`.
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

pub(crate) const SIZE: (u32, u32) = (1000, 600);
// Even sizes only: plotters 0.3.7's ab_glyph renderer truncates `size / 2 + glyph top` to
// whole pixels, which at odd sizes lifts short glyphs (a decimal point) a pixel above the
// baseline. With an even size the sum is already whole.
const TITLE_PX: u32 = 24;
const AXIS_DESC_PX: u32 = 18;
const TICK_PX: u32 = 16;
const LEGEND_PX: u32 = 16;
const NOTE_PX: u32 = 20;
const RIGHT_MARGIN: i32 = 28;
const X_AREA: i32 = 56;
/// Rough advance of one tick-label character at `TICK_PX`, used to size label areas.
const TICK_CHAR_PX: u32 = 9;

/// Tableau 10: distinguishable, colour-blind-friendlier than plotters' primaries.
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];
pub(crate) const GREY: RGBColor = RGBColor(0x70, 0x70, 0x70);
pub(crate) const LIGHT_GREY: RGBColor = RGBColor(0xD9, 0xD9, 0xD9);

/// Registers the embedded font once per process.
fn ensure_font() -> Result<(), ReportError> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ok = *READY
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font)
    }
}

/// One chart, ready to draw.
pub(crate) struct Figure {
    /// File stem: `<name>.png`, `<name>.svg`.
    pub name: &'static str,
    /// Heading above the chart in the reports.
    pub heading: String,
    /// One or two sentences under the chart in the reports: what it shows and how to read it.
    pub caption: String,
    pub size: (u32, u32),
    pub body: Body,
}

pub(crate) enum Body {
    Lines(LineChart),
    /// Charts stacked vertically, sharing the figure's height evenly.
    Panels(Vec<LineChart>),
    Bars(BarChart),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scale {
    Linear,
    Log,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum TickText {
    Plain,
    /// The value is a fraction, labelled as a percentage.
    Percent,
}

#[derive(Clone, Debug)]
pub(crate) struct Axis {
    pub label: String,
    pub min: f64,
    pub max: f64,
    pub scale: Scale,
    pub text: TickText,
    /// Labelled ticks to use instead of computed ones (e.g. the adapter counts swept).
    pub ticks: Option<Vec<f64>>,
}

impl Axis {
    pub fn linear(label: impl Into<String>, min: f64, max: f64) -> Axis {
        let (min, max) = sane_range(min, max, false);
        Axis {
            label: label.into(),
            min,
            max,
            scale: Scale::Linear,
            text: TickText::Plain,
            ticks: None,
        }
    }

    pub fn log(label: impl Into<String>, min: f64, max: f64) -> Axis {
        let (min, max) = sane_range(min, max, true);
        Axis {
            label: label.into(),
            min,
            max,
            scale: Scale::Log,
            text: TickText::Plain,
            ticks: None,
        }
    }

    pub fn percent(mut self) -> Axis {
        self.text = TickText::Percent;
        self
    }

    fn tick_text(&self, v: f64) -> String {
        match self.text {
            TickText::Plain => format::tick(v),
            TickText::Percent => format!("{}%", format::tick(v * 100.0)),
        }
    }

    /// Labels these values only (kept when inside the range); grid lines stay computed.
    pub fn with_ticks(mut self, ticks: Vec<f64>) -> Axis {
        self.ticks = Some(ticks);
        self
    }

    /// (labelled ticks, unlabelled grid lines)
    fn ticks(&self) -> (Vec<f64>, Vec<f64>) {
        let (bold, light) = match self.scale {
            Scale::Linear => linear_ticks(self.min, self.max),
            Scale::Log => log_ticks(self.min, self.max),
        };
        match &self.ticks {
            Some(ticks) => {
                let inside: Vec<f64> = ticks
                    .iter()
                    .copied()
                    .filter(|t| *t >= self.min && *t <= self.max)
                    .collect();
                let mut grid = light;
                grid.extend(bold);
                (inside, grid)
            }
            None => (bold, light),
        }
    }
}

/// A range plotters can draw: finite, non-empty, and positive for log axes.
fn sane_range(min: f64, max: f64, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = if min.is_finite() && max.is_finite() {
        (min.min(max), min.max(max))
    } else {
        (0.0, 1.0)
    };
    if log {
        if hi <= 0.0 {
            return (0.1, 10.0);
        }
        if lo <= 0.0 {
            lo = hi / 1000.0;
        }
        if hi / lo < 1.0001 {
            return (lo / 2.0, hi * 2.0);
        }
    } else if hi - lo < 1e-12 {
        if lo == 0.0 {
            hi = 1.0;
        } else {
            let pad = lo.abs() * 0.5;
            lo -= pad;
            hi += pad;
        }
    }
    (lo, hi)
}

/// Ticks at 1, 2, 2.5 or 5 × 10^k, about eight of them, with half-step grid lines between.
pub(crate) fn linear_ticks(min: f64, max: f64) -> (Vec<f64>, Vec<f64>) {
    let raw = (max - min) / 8.0;
    if !(raw.is_finite() && raw > 0.0) {
        return (vec![min], Vec::new());
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (min / step).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    let bold: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
    let light = (first - 1..=last)
        .map(|k| (k as f64 + 0.5) * step)
        .filter(|v| *v > min && *v < max)
        .collect();
    (bold, light)
}

/// Log ticks: 1-2-5 per decade over short spans, powers of ten over longer ones, with grid
/// lines at the other integers × 10^k.
pub(crate) fn log_ticks(min: f64, max: f64) -> (Vec<f64>, Vec<f64>) {
    let lo = min.log10().floor() as i32;
    let hi = max.log10().ceil() as i32;
    let decades = (hi - lo).max(1);
    let span = (max / min).log10();
    let in_range = |v: f64| v >= min * (1.0 - 1e-9) && v <= max * (1.0 + 1e-9);
    let mut bold = Vec::new();
    let mut light = Vec::new();
    let every = if decades > 8 { (decades + 7) / 8 } else { 1 };
    for e in lo..=hi {
        let base = 10f64.powi(e);
        for m in 1..=9 {
            let v = base * m as f64;
            if !in_range(v) {
                continue;
            }
            let labelled = match m {
                1 => (e - lo) % every == 0,
                // 1-2-5 labels stay ~0.3 decades apart: readable up to ~3.5 decades.
                2 | 5 => span <= 3.5,
                _ => false,
            };
            if labelled {
                bold.push(v);
            } else if decades <= 8 {
                light.push(v);
            }
        }
    }
    if bold.len() < 2 {
        // A span inside one decade: fall back to linear ticks on the log axis.
        let (b, _) = linear_ticks(min, max);
        bold = b.into_iter().filter(|v| *v > 0.0).collect();
    }
    (bold, light)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Marker {
    Circle,
    Cross,
    Triangle,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SeriesKind {
    Line,
    Dashed,
    /// Filled from the line down to y = 0. Later areas paint over earlier ones, so a stacked
    /// chart lists its cumulative totals largest first.
    Area,
    Markers(Marker),
    LineMarkers(Marker),
}

#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub label: Option<String>,
    pub color: RGBColor,
    pub kind: SeriesKind,
    pub points: Vec<(f64, f64)>,
    /// Markers drawn this many pixels above their point (to lift them off an axis).
    pub lift_px: i32,
    pub marker_px: i32,
    /// Line width in pixels. Dense, jagged series use 1: plotters turns wider lines into
    /// polygons per segment, and its bitmap rasteriser smears near-vertical ones into spikes.
    pub width: u32,
}

impl Series {
    pub fn new(
        label: Option<String>,
        color: RGBColor,
        kind: SeriesKind,
        points: Vec<(f64, f64)>,
    ) -> Series {
        Series {
            label,
            color,
            kind,
            points,
            lift_px: 0,
            marker_px: 5,
            width: 2,
        }
    }
}

/// A text label drawn just above a data point.
#[derive(Clone, Debug)]
pub(crate) struct Annotation {
    pub at: (f64, f64),
    pub text: String,
    /// Pixels between the point and the bottom of the text.
    pub lift_px: i32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LegendAt {
    /// The first free corner or edge middle, or outside the plot when none is free (see
    /// `place_legend`).
    Auto,
    UpperLeft,
    UpperRight,
    LowerRight,
    LowerLeft,
    UpperMiddle,
    LowerMiddle,
    MiddleRight,
    MiddleLeft,
}

pub(crate) struct LineChart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    pub annotations: Vec<Annotation>,
    pub legend: LegendAt,
    /// Shown in the middle of the plot, e.g. when there is nothing to draw.
    pub note: Option<String>,
}

pub(crate) struct Bar {
    pub label: String,
    pub value: f64,
    /// Drawn right of the bar.
    pub text: String,
}

pub(crate) struct BarChart {
    pub title: String,
    pub x_label: String,
    /// Top to bottom.
    pub bars: Vec<Bar>,
    pub color: RGBColor,
    pub note: Option<String>,
}

/// What rendering one figure produced.
pub(crate) struct Rendered {
    pub name: &'static str,
    pub heading: String,
    pub caption: String,
    pub png: PathBuf,
    pub svg: PathBuf,
    /// The SVG document, for inlining.
    pub svg_text: String,
}

/// Draws `figure` to `<dir>/<name>.svg` and `<dir>/<name>.png`.
pub(crate) fn render(dir: &Path, figure: &Figure) -> Result<Rendered, ReportError> {
    ensure_font()?;
    let svg = dir.join(format!("{}.svg", figure.name));
    let png = dir.join(format!("{}.png", figure.name));
    let chart_error =
        |path: &Path, source: Box<dyn std::error::Error + Send + Sync>| ReportError::Chart {
            chart: figure.name,
            path: path.to_path_buf(),
            source,
        };

    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, figure.size).into_drawing_area();
        draw_figure(&root, figure)
            .and_then(|()| root.present())
            .map_err(|e| chart_error(&svg, Box::new(e)))?;
    }
    files::write_bytes(&svg, svg_text.as_bytes())?;

    {
        let root = BitMapBackend::new(&png, figure.size).into_drawing_area();
        draw_figure(&root, figure)
            .and_then(|()| root.present())
            .map_err(|e| chart_error(&png, Box::new(e)))?;
    }
    Ok(Rendered {
        name: figure.name,
        heading: figure.heading.clone(),
        caption: figure.caption.clone(),
        png,
        svg,
        svg_text,
    })
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figure: &Figure,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    match &figure.body {
        Body::Lines(chart) => draw_lines(root, chart),
        Body::Panels(charts) => {
            let areas = root.split_evenly((charts.len().max(1), 1));
            for (area, chart) in areas.iter().zip(charts) {
                draw_lines(area, chart)?;
            }
            Ok(())
        }
        Body::Bars(bars) => draw_bars(root, bars),
    }
}

/// Width of the y label area: the widest tick label plus room for the rotated axis title.
fn y_label_area(labels: &[String]) -> u32 {
    let widest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as u32;
    widest * TICK_CHAR_PX + 48
}

/// An axis whose ticks are the ones computed here. Plotters' own `WithKeyPoints` would do,
/// but in 0.3.7 it loses the value formatter of `f64` axes, so `configure_mesh` rejects it.
#[derive(Clone)]
struct Ticked<R: Ranged<ValueType = f64>> {
    inner: R,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl<R: Ranged<ValueType = f64>> Ticked<R> {
    fn new(inner: R, axis: &Axis) -> Self {
        let (bold, light) = axis.ticks();
        Ticked { inner, bold, light }
    }
}

impl<R: Ranged<ValueType = f64>> Ranged for Ticked<R> {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }

    fn axis_pixel_range(&self, limit: (i32, i32)) -> Range<i32> {
        self.inner.axis_pixel_range(limit)
    }
}

type LinearAxis = Ticked<RangedCoordf64>;

fn linear_coord(axis: &Axis) -> LinearAxis {
    Ticked::new(RangedCoordf64::from(axis.min..axis.max), axis)
}

fn draw_lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &LineChart,
) -> DrawResult<DB> {
    let y = linear_coord(&chart.y);
    match chart.x.scale {
        Scale::Linear => draw_lines_in(area, chart, linear_coord(&chart.x), y),
        Scale::Log => {
            let log: LogCoord<f64> = (chart.x.min..chart.x.max).log_scale().into();
            draw_lines_in(area, chart, Ticked::new(log, &chart.x), y)
        }
    }
}

fn draw_lines_in<DB, X>(
    area: &DrawingArea<DB, Shift>,
    chart: &LineChart,
    x_range: X,
    y_range: LinearAxis,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64, FormatOption = DefaultFormatting>,
{
    let y_labels: Vec<String> = y_range.bold.iter().map(|v| chart.y.tick_text(*v)).collect();
    let y_area = y_label_area(&y_labels);
    let has_legend = chart.series.iter().any(|s| s.label.is_some());
    let placement = match chart.legend {
        _ if !has_legend => Placement::Inside(LegendAt::UpperRight),
        LegendAt::Auto => {
            // The plot rectangle ChartBuilder will produce: margins, caption, label areas.
            let (w, h) = area.dim_in_pixel();
            let top = 12 + TITLE_PX as i32 + 12;
            let plot = (
                12 + y_area as i32,
                top,
                w as i32 - RIGHT_MARGIN,
                h as i32 - 12 - X_AREA,
            );
            place_legend(chart, plot, legend_size(area, chart))
        }
        fixed => Placement::Inside(fixed),
    };
    let right = match placement {
        Placement::OutsideRight(width) => RIGHT_MARGIN + width,
        Placement::Inside(_) => RIGHT_MARGIN,
    };
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, (FAMILY, TITLE_PX))
        .margin(12)
        .margin_right(right)
        .x_label_area_size(X_AREA)
        .y_label_area_size(y_area)
        .build_cartesian_2d(x_range, y_range)?;
    let x_text = |v: &f64| chart.x.tick_text(*v);
    let y_text = |v: &f64| chart.y.tick_text(*v);
    ctx.configure_mesh()
        .x_desc(chart.x.label.as_str())
        .y_desc(chart.y.label.as_str())
        .x_label_formatter(&x_text)
        .y_label_formatter(&y_text)
        .label_style((FAMILY, TICK_PX))
        .axis_desc_style((FAMILY, AXIS_DESC_PX))
        .bold_line_style(RGBColor(0xCC, 0xCC, 0xCC).stroke_width(1))
        .light_line_style(RGBColor(0xEE, 0xEE, 0xEE).stroke_width(1))
        .axis_style(GREY.stroke_width(1))
        .draw()?;

    for series in &chart.series {
        draw_series(&mut ctx, series)?;
    }
    let label_style = TextStyle::from((FAMILY, TICK_PX).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    ctx.draw_series(chart.annotations.iter().map(|a| {
        EmptyElement::at(a.at) + Text::new(a.text.clone(), (0, -a.lift_px), label_style.clone())
    }))?;
    if has_legend {
        // The plot rectangle in `area`'s own coordinates.
        let (xs, ys) = ctx.plotting_area().get_pixel_range();
        let (bx, by) = area.get_base_pixel();
        let (x0, y0, x1, y1) = (xs.start - bx, ys.start - by, xs.end - bx, ys.end - by);
        let (w, h) = legend_size(area, chart);
        let at = match placement {
            Placement::OutsideRight(_) => (x1 + 12, y0),
            Placement::Inside(at) => legend_origin(at, (x0, y0, x1, y1), (w, h), 14),
        };
        draw_legend(area, chart, at)?;
    }
    if let Some(note) = &chart.note {
        draw_note(&ctx.plotting_area().strip_coord_spec(), note)?;
    }
    Ok(())
}

/// Where the legend goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Placement {
    Inside(LegendAt),
    /// Right of the plot, in a margin this wide: used when every corner would hide data.
    OutsideRight(i32),
}

/// Top-left corner of a `size` legend placed `at` inside the `plot` rectangle.
fn legend_origin(
    at: LegendAt,
    (x0, y0, x1, y1): (i32, i32, i32, i32),
    (w, h): (i32, i32),
    margin: i32,
) -> (i32, i32) {
    let left = x0 + margin;
    let centre_x = (x0 + x1 - w) / 2;
    let right = x1 - margin - w;
    let top = y0 + margin;
    let middle = (y0 + y1 - h) / 2;
    let bottom = y1 - margin - h;
    match at {
        LegendAt::Auto | LegendAt::UpperRight => (right, top),
        LegendAt::UpperLeft => (left, top),
        LegendAt::LowerRight => (right, bottom),
        LegendAt::LowerLeft => (left, bottom),
        LegendAt::UpperMiddle => (centre_x, top),
        LegendAt::LowerMiddle => (centre_x, bottom),
        LegendAt::MiddleRight => (right, middle),
        LegendAt::MiddleLeft => (left, middle),
    }
}

/// Position of `v` along an axis, 0 at `min` and 1 at `max`, log-aware.
fn fraction(axis: &Axis, v: f64) -> f64 {
    match axis.scale {
        Scale::Linear => (v - axis.min) / (axis.max - axis.min),
        Scale::Log => (v / axis.min).ln() / (axis.max / axis.min).ln(),
    }
}

/// Picks the corner whose legend box would hide the fewest data samples (points, points
/// every few pixels along lines, everything under an area's edge), preferring upper right,
/// then upper left, lower right, lower left; when every corner hides data, puts the legend
/// outside. Works on the plot rectangle `plot` = (x0, y0, x1, y1) estimated before the
/// chart is built, because an outside legend needs the margin reserved at build time.
fn place_legend(chart: &LineChart, plot: (i32, i32, i32, i32), size: (i32, i32)) -> Placement {
    let (w, h) = size;
    let margin = 14;
    let (px0, py0, px1, py1) = plot;
    let corners = [
        LegendAt::UpperRight,
        LegendAt::UpperLeft,
        LegendAt::LowerRight,
        LegendAt::LowerLeft,
        LegendAt::UpperMiddle,
        LegendAt::LowerMiddle,
        LegendAt::MiddleRight,
        LegendAt::MiddleLeft,
    ];
    let boxes = corners.map(|at| {
        let (x0, y0) = legend_origin(at, (px0, py0, px1, py1), (w, h), margin);
        (x0 - 4, y0 - 4, x0 + w + 4, y0 + h + 4)
    });
    let to_px = |(x, y): (f64, f64)| {
        let fx = fraction(&chart.x, x);
        let fy = fraction(&chart.y, y);
        (
            px0 as f64 + fx * (px1 - px0) as f64,
            py1 as f64 - fy * (py1 - py0) as f64,
        )
    };
    let mut hidden = [0usize; 8];
    let mut count = |(x, y): (f64, f64), filled_below: bool| {
        for (i, b) in boxes.iter().enumerate() {
            // Pixel y grows downwards: an area fills from its edge down to the axis.
            let inside_y = if filled_below {
                y <= b.3 as f64
            } else {
                y >= b.1 as f64 && y <= b.3 as f64
            };
            if x >= b.0 as f64 && x <= b.2 as f64 && inside_y {
                hidden[i] += 1;
            }
        }
    };
    for s in &chart.series {
        let filled = s.kind == SeriesKind::Area;
        let px: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|p| to_px(*p))
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        for p in &px {
            count((p.0, p.1 - s.lift_px as f64), filled);
        }
        if !matches!(s.kind, SeriesKind::Markers(_)) {
            for seg in px.windows(2) {
                // A sample every ~6 pixels, so long sparse segments count too.
                let len = (seg[1].0 - seg[0].0).abs().max((seg[1].1 - seg[0].1).abs());
                let steps = ((len / 6.0) as usize).clamp(1, 400);
                for k in 1..steps {
                    let t = k as f64 / steps as f64;
                    count(
                        (
                            seg[0].0 + (seg[1].0 - seg[0].0) * t,
                            seg[0].1 + (seg[1].1 - seg[0].1) * t,
                        ),
                        filled,
                    );
                }
            }
        }
    }
    for a in &chart.annotations {
        let (x, y) = to_px(a.at);
        count((x, y - a.lift_px as f64 - 8.0), false);
    }
    match (0..corners.len()).find(|i| hidden[*i] == 0) {
        Some(i) => Placement::Inside(corners[i]),
        None => Placement::OutsideRight(w + 24),
    }
}

fn draw_note<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, note: &str) -> DrawResult<DB> {
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FAMILY, NOTE_PX).into_font())
        .color(&GREY)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(
        note.to_string(),
        (w as i32 / 2, h as i32 / 2),
        style,
    ))
}

type Ctx<'a, DB, X> = ChartContext<'a, DB, Cartesian2d<X, LinearAxis>>;

fn draw_series<DB, X>(ctx: &mut Ctx<'_, DB, X>, s: &Series) -> DrawResult<DB>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64, FormatOption = DefaultFormatting>,
{
    let color = s.color;
    let points = s.points.iter().copied();
    let line = color.stroke_width(s.width);
    match s.kind {
        SeriesKind::Line => {
            ctx.draw_series(LineSeries::new(points, line))?;
        }
        SeriesKind::Dashed => {
            ctx.draw_series(DashedLineSeries::new(points, 9, 6, line))?;
        }
        SeriesKind::Area => {
            ctx.draw_series(
                AreaSeries::new(points, 0.0, color.filled()).border_style(color.stroke_width(1)),
            )?;
        }
        SeriesKind::Markers(marker) => {
            draw_markers(ctx, s, marker)?;
        }
        SeriesKind::LineMarkers(marker) => {
            ctx.draw_series(LineSeries::new(points, line))?;
            draw_markers(ctx, s, marker)?;
        }
    }
    Ok(())
}

fn draw_markers<DB, X>(ctx: &mut Ctx<'_, DB, X>, s: &Series, marker: Marker) -> DrawResult<DB>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64, FormatOption = DefaultFormatting>,
{
    let points = s.points.iter().copied();
    let offset = (0, -s.lift_px);
    match marker {
        Marker::Circle => ctx
            .draw_series(points.map(|p| {
                EmptyElement::at(p) + Circle::new(offset, s.marker_px, s.color.filled())
            }))?,
        Marker::Cross => ctx.draw_series(points.map(|p| {
            EmptyElement::at(p) + Cross::new(offset, s.marker_px + 1, s.color.stroke_width(3))
        }))?,
        Marker::Triangle => ctx.draw_series(points.map(|p| {
            EmptyElement::at(p) + TriangleMarker::new(offset, s.marker_px + 2, s.color.filled())
        }))?,
    };
    Ok(())
}

const LEGEND_ROW: i32 = LEGEND_PX as i32 + 8;
const LEGEND_PAD: i32 = 10;
const LEGEND_SAMPLE: i32 = 28;

/// Legend size in pixels, from the measured label widths.
fn legend_size<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &LineChart) -> (i32, i32) {
    let font = TextStyle::from((FAMILY, LEGEND_PX).into_font());
    let mut widest = 0;
    let mut rows = 0;
    for label in chart.series.iter().filter_map(|s| s.label.as_ref()) {
        rows += 1;
        // A font error here resurfaces when the text is drawn; estimate generously meanwhile.
        let w = area
            .estimate_text_size(label, &font)
            .map(|(w, _)| w as i32)
            .unwrap_or(label.chars().count() as i32 * 10);
        widest = widest.max(w);
    }
    (
        LEGEND_PAD * 3 + LEGEND_SAMPLE + widest,
        rows * LEGEND_ROW + LEGEND_PAD * 2 - 8,
    )
}

/// Draws the legend with its top-left corner at `(x, y)` of `area`. Drawn here rather than by
/// plotters so that it can sit outside the plot, and so every series kind gets a faithful
/// sample (dashes, markers on lines, filled areas).
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &LineChart,
    (x, y): (i32, i32),
) -> DrawResult<DB> {
    let (w, h) = legend_size(area, chart);
    area.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        WHITE.mix(0.92).filled(),
    ))?;
    area.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        RGBColor(0xAA, 0xAA, 0xAA).stroke_width(1),
    ))?;
    let text_style = TextStyle::from((FAMILY, LEGEND_PX).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let labelled = chart
        .series
        .iter()
        .filter_map(|s| s.label.as_ref().map(|l| (s, l)));
    for (row, (s, label)) in labelled.enumerate() {
        let cy = y + LEGEND_PAD + row as i32 * LEGEND_ROW + LEGEND_ROW / 2 - 4;
        let (x0, x1) = (x + LEGEND_PAD, x + LEGEND_PAD + LEGEND_SAMPLE);
        // Samples are short and horizontal: draw them bold so thin series stay visible.
        let line = s.color.stroke_width(s.width.max(3));
        match s.kind {
            SeriesKind::Line => area.draw(&PathElement::new(vec![(x0, cy), (x1, cy)], line))?,
            SeriesKind::Dashed => {
                area.draw(&PathElement::new(vec![(x0, cy), (x0 + 10, cy)], line))?;
                area.draw(&PathElement::new(vec![(x0 + 17, cy), (x1, cy)], line))?;
            }
            SeriesKind::Area => area.draw(&Rectangle::new(
                [(x0, cy - 7), (x1, cy + 7)],
                s.color.filled(),
            ))?,
            SeriesKind::Markers(m) | SeriesKind::LineMarkers(m) => {
                if matches!(s.kind, SeriesKind::LineMarkers(_)) {
                    area.draw(&PathElement::new(vec![(x0, cy), (x1, cy)], line))?;
                }
                let c = ((x0 + x1) / 2, cy);
                match m {
                    Marker::Circle => area.draw(&Circle::new(c, s.marker_px, s.color.filled()))?,
                    Marker::Cross => {
                        area.draw(&Cross::new(c, s.marker_px + 1, s.color.stroke_width(3)))?
                    }
                    Marker::Triangle => {
                        area.draw(&TriangleMarker::new(c, s.marker_px + 2, s.color.filled()))?
                    }
                }
            }
        }
        area.draw(&Text::new(
            label.clone(),
            (x1 + LEGEND_PAD, cy),
            text_style.clone(),
        ))?;
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &BarChart,
) -> DrawResult<DB> {
    let n = chart.bars.len();
    let max = chart.bars.iter().map(|b| b.value).fold(0.0f64, f64::max);
    // Headroom right of the longest bar for its text label.
    let x_axis = Axis::linear(
        chart.x_label.clone(),
        0.0,
        if max > 0.0 { max * 1.3 } else { 1.0 },
    );
    let rows = n.max(1);
    let y_range = Ticked {
        inner: RangedCoordf64::from(-0.5..rows as f64 - 0.5),
        bold: (0..n).map(|i| i as f64).collect(),
        light: Vec::new(),
    };
    let x_range = linear_coord(&x_axis);
    let widest = chart
        .bars
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(1) as u32;
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, (FAMILY, TITLE_PX))
        .margin(12)
        .margin_right(28)
        .x_label_area_size(56)
        .y_label_area_size(widest * TICK_CHAR_PX + 24)
        .build_cartesian_2d(x_range, y_range)?;
    // Row i from the top sits at y = n - 1 - i.
    let row_label = |y: &f64| {
        let row = y.round();
        if row < 0.0 || row >= n as f64 {
            return String::new();
        }
        chart.bars[n - 1 - row as usize].label.clone()
    };
    let x_text = |v: &f64| x_axis.tick_text(*v);
    ctx.configure_mesh()
        .disable_y_mesh()
        .x_desc(chart.x_label.as_str())
        .x_label_formatter(&x_text)
        .y_label_formatter(&row_label)
        .label_style((FAMILY, TICK_PX))
        .axis_desc_style((FAMILY, AXIS_DESC_PX))
        .bold_line_style(RGBColor(0xCC, 0xCC, 0xCC).stroke_width(1))
        .light_line_style(RGBColor(0xEE, 0xEE, 0xEE).stroke_width(1))
        .axis_style(GREY.stroke_width(1))
        .draw()?;
    let fill = chart.color.filled();
    ctx.draw_series(chart.bars.iter().enumerate().map(|(i, b)| {
        let y = (n - 1 - i) as f64;
        Rectangle::new([(0.0, y - 0.36), (b.value.max(0.0), y + 0.36)], fill)
    }))?;
    let text_style = TextStyle::from((FAMILY, TICK_PX).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    ctx.draw_series(chart.bars.iter().enumerate().map(|(i, b)| {
        let y = (n - 1 - i) as f64;
        EmptyElement::at((b.value.max(0.0), y))
            + Text::new(b.text.clone(), (6, 0), text_style.clone())
    }))?;
    if let Some(note) = &chart.note {
        draw_note(&ctx.plotting_area().strip_coord_spec(), note)?;
    }
    Ok(())
}

/// Colour `i` of the palette, cycling.
pub(crate) fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_are_round() {
        let (bold, _) = linear_ticks(0.0, 100.0);
        assert_eq!(bold, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let (bold, _) = linear_ticks(0.0, 1.0);
        let text: Vec<String> = bold.iter().map(|v| format::tick(*v)).collect();
        assert_eq!(text, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
    }

    #[test]
    fn log_ticks_cover_decades() {
        // Three decades: 1-2-5 labels.
        let (bold, light) = log_ticks(0.01, 10.0);
        assert_eq!(
            bold,
            vec![0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
        );
        assert!(light.contains(&0.03) && light.contains(&9.0));
        // Five decades: powers of ten only.
        let (bold, light) = log_ticks(0.001, 100.0);
        assert_eq!(bold, vec![0.001, 0.01, 0.1, 1.0, 10.0, 100.0]);
        assert!(light.contains(&0.02) && light.contains(&50.0));
        let (bold, _) = log_ticks(0.1, 10.0);
        assert_eq!(bold, vec![0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]);
        let (bold, _) = log_ticks(2.0, 8.0);
        assert!(bold.len() >= 2);
    }

    #[test]
    fn degenerate_ranges_are_widened() {
        assert_eq!(sane_range(3.0, 3.0, false), (1.5, 4.5));
        assert_eq!(sane_range(0.0, 0.0, false), (0.0, 1.0));
        assert_eq!(sane_range(0.0, 10.0, true), (0.01, 10.0));
        assert_eq!(sane_range(f64::NAN, 1.0, false), (0.0, 1.0));
    }
}
