//! The storm chart: the storm without and with the layer, side by side, drawn as SVG with
//! `plotters`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Error;
use crate::cli::StormShape;
use crate::cluster::plural;
use crate::stats::{Summary, Unit};
use crate::storm::{WITH_LAYER, WITHOUT_LAYER};

const RED: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const BLUE: RGBColor = RGBColor(0x1f, 0x6f, 0xb2);
const INK: RGBColor = RGBColor(0x11, 0x11, 0x11);
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);
const FONT: &str = "Helvetica, Arial, sans-serif";
const WIDTH: u32 = 960;
const HEIGHT: u32 = 460;
/// The header (title, caption, legend) above the panels, and the footer below them.
const HEADER: u32 = 110;
const FOOTER: u32 = 50;
/// Room under each panel's bars for its label and note.
const LABELS: u32 = 60;

/// One measure of the chart: its label, a note under it, and the figure it shows.
struct Panel {
    label: &'static str,
    note: &'static str,
    figure: String,
    unit: Unit,
}

/// A bar chart of the storm without and with the layer (medians over the runs): one panel
/// per measure, each on its own scale. `path` is named in the footer's command.
pub(crate) fn storm_svg(
    summary: &Summary,
    shape: &StormShape,
    delay_ms: u64,
    path: &Path,
) -> Result<String, Error> {
    let invalid_grant = format!(
        "status {} invalid_grant",
        server::INVALID_GRANT_STATUS.as_u16()
    );
    let panel = |label, note, figure: &str, unit| Panel {
        label,
        note,
        figure: figure.to_owned(),
        unit,
    };
    let panels = [
        panel(
            "answered 200",
            "with a token pair",
            "status 200",
            Unit::Count,
        ),
        panel(
            "invalid_grant",
            "refused as reuse",
            &invalid_grant,
            Unit::Count,
        ),
        panel("rotations", "refreshes committed", "rotations", Unit::Count),
        panel(
            "reuse detections",
            "family revoked: logged out",
            "reuse detections",
            Unit::Count,
        ),
        panel("p99 latency", "per request", "p99", Unit::Millis),
    ];
    let runs = summary.runs.len();
    let title = format!(
        "Refresh storm: {} concurrent refreshes of one token",
        thousands(shape.requests)
    );
    let caption = format!(
        "reference server (axum + SQLite) in process, one HTTP/1.1 connection per request, \
         simulated upstream {delay_ms} ms; median of {runs} run{}",
        plural(runs)
    );
    let footer = format!(
        "Each panel has its own scale. cargo run --release -p load -- storm --requests {} \
         --refresh-delay-ms {delay_ms} --runs {runs} --svg {}",
        shape.requests,
        path.display()
    );

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, rest) = root.split_vertically(HEADER);
        let (plots, bottom) = rest.split_vertically(HEIGHT - HEADER - FOOTER);
        draw_header(&header, &title, &caption)?;
        let columns = plots.margin(0, 0, 20, 20).split_evenly((1, panels.len()));
        for (area, panel) in columns.iter().zip(&panels) {
            let values = [(WITHOUT_LAYER, RED), (WITH_LAYER, BLUE)].map(|(variant, color)| {
                (
                    summary.median(&format!("{variant}: {}", panel.figure)),
                    color,
                )
            });
            draw_panel(area, panel, &values)?;
        }
        let center = i32::try_from(WIDTH / 2)?;
        bottom.draw(&Text::new(
            footer,
            (center, 28),
            text(12, false, GREY).pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
        root.present()?;
    }
    Ok(svg)
}

/// The title, the caption and the legend.
fn draw_header(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    caption: &str,
) -> Result<(), Error> {
    draw_header_with(
        area,
        title,
        caption,
        &[
            ("without the layer", RED),
            ("with RefreshCoalesceLayer", BLUE),
        ],
    )
}

/// The title, the caption and a legend of `entries`, spread over the width.
fn draw_header_with(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    caption: &str,
    entries: &[(&str, RGBColor)],
) -> Result<(), Error> {
    let center = i32::try_from(WIDTH / 2)?;
    let centered = Pos::new(HPos::Center, VPos::Bottom);
    area.draw(&Text::new(
        title.to_owned(),
        (center, 34),
        text(21, true, INK).pos(centered),
    ))?;
    area.draw(&Text::new(
        caption.to_owned(),
        (center, 58),
        text(14, false, GREY).pos(centered),
    ))?;
    let step = i32::try_from(WIDTH)? / i32::try_from(entries.len() + 1)?;
    let first = if entries.len() > 2 { 40 } else { 300 };
    let step = if entries.len() > 2 {
        (i32::try_from(WIDTH)? - 80) / i32::try_from(entries.len())?
    } else {
        step.min(200)
    };
    for (i, &(label, color)) in entries.iter().enumerate() {
        let x = first + step * i32::try_from(i)?;
        area.draw(&Rectangle::new([(x, 78), (x + 16, 94)], color.filled()))?;
        let size = if entries.len() > 2 { 13 } else { 15 };
        area.draw(&Text::new(
            label,
            (x + 22, 91),
            text(size, false, INK).pos(Pos::new(HPos::Left, VPos::Bottom)),
        ))?;
    }
    Ok(())
}

/// One bar per value, in its color, on the panel's own scale, with their values, then the
/// panel's label and note.
fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    values: &[(f64, RGBColor)],
) -> Result<(), Error> {
    let max = values.iter().map(|(v, _)| *v).fold(0.0, f64::max);
    let bars_count = values.len() as f64;
    // Room above the tallest bar for its value; a zero still shows as a sliver, so that
    // "0" sits on something.
    let top = if max > 0.0 { max * 1.15 } else { 1.0 };
    let sliver = top / 100.0;
    let (bars, labels) = area.split_vertically(area.dim_in_pixel().1 - LABELS);
    let mut chart = ChartBuilder::on(&bars)
        .margin_left(20)
        .margin_right(20)
        .build_cartesian_2d(0.0..bars_count, 0.0..top)?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 0.0), (bars_count, 0.0)],
        RGBColor(0x33, 0x33, 0x33),
    )))?;
    let size = if values.len() > 2 { 12 } else { 15 };
    for (j, &(value, color)) in values.iter().enumerate() {
        let x = j as f64;
        let height = value.max(sliver);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.07, 0.0), (x + 0.93, height)],
            color.filled(),
        )))?;
        let shown = match panel.unit {
            Unit::Millis => format!("{value:.0} ms"),
            _ => thousands(value.round() as usize),
        };
        let (px, py) = chart.backend_coord(&(x + 0.5, height));
        bars.draw(&Text::new(
            shown,
            (
                px - bars.get_base_pixel().0,
                py - bars.get_base_pixel().1 - 7,
            ),
            text(size, true, INK).pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
    }
    let center = i32::try_from(labels.dim_in_pixel().0 / 2)?;
    labels.draw(&Text::new(
        panel.label,
        (center, 26),
        text(16, false, INK).pos(Pos::new(HPos::Center, VPos::Bottom)),
    ))?;
    labels.draw(&Text::new(
        panel.note,
        (center, 45),
        text(12, false, GREY).pos(Pos::new(HPos::Center, VPos::Bottom)),
    ))?;
    Ok(())
}

/// The four runs of the storm from both ends (see the `clients` mode): one panel per
/// measure, a bar per run, medians over the runs.
pub(crate) fn clients_svg(
    summary: &Summary,
    requests: usize,
    delay_ms: u64,
    path: &Path,
) -> Result<String, Error> {
    let panel = |label, note, figure: &str, unit| Panel {
        label,
        note,
        figure: figure.to_owned(),
        unit,
    };
    let panels = [
        panel(
            "refreshes sent",
            "reaching the token server",
            "refreshes sent",
            Unit::Count,
        ),
        panel("answered 200", "of the requests", "status 200", Unit::Count),
        panel(
            "reuse detections",
            "family revoked: logged out",
            "reuse detections",
            Unit::Count,
        ),
        panel("p99 latency", "per request", "p99", Unit::Millis),
    ];
    let colors = [
        RED,
        RGBColor(0xe6, 0x7e, 0x22),
        RGBColor(0x7f, 0xb3, 0xd5),
        BLUE,
    ];
    let runs = summary.runs.len();
    let title = format!(
        "Refresh storm from both ends: {} requests in flight when the access token expires",
        thousands(requests)
    );
    let caption = format!(
        "GET /api/me, one HTTP/1.1 connection each, reference server in process, refresh \
         upstream {delay_ms} ms; median of {runs} run{}",
        plural(runs)
    );
    let footer = format!(
        "Each panel has its own scale. cargo run --release -p load -- clients --requests \
         {requests} --refresh-delay-ms {delay_ms} --runs {runs} --svg {}",
        path.display()
    );
    let legend: Vec<(&str, RGBColor)> = crate::clients::CELLS
        .iter()
        .zip(colors)
        .map(|(cell, color)| (cell.label, color))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, rest) = root.split_vertically(HEADER);
        let (plots, bottom) = rest.split_vertically(HEIGHT - HEADER - FOOTER);
        draw_header_with(&header, &title, &caption, &legend)?;
        let columns = plots.margin(0, 0, 20, 20).split_evenly((1, panels.len()));
        for (area, panel) in columns.iter().zip(&panels) {
            let values: Vec<(f64, RGBColor)> = crate::clients::CELLS
                .iter()
                .zip(colors)
                .map(|(cell, color)| {
                    (
                        summary.median(&format!("{}: {}", cell.label, panel.figure)),
                        color,
                    )
                })
                .collect();
            draw_panel(area, panel, &values)?;
        }
        let center = i32::try_from(WIDTH / 2)?;
        bottom.draw(&Text::new(
            footer,
            (center, 28),
            text(12, false, GREY).pos(Pos::new(HPos::Center, VPos::Bottom)),
        ))?;
        root.present()?;
    }
    Ok(svg)
}

/// Text of `size` pixels in the chart's font.
fn text(size: u32, bold: bool, color: RGBColor) -> TextStyle<'static> {
    let font = (FONT, f64::from(size)).into_font();
    let font = if bold {
        font.style(FontStyle::Bold)
    } else {
        font
    };
    font.color(&color)
}

/// 1000 -> "1,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `contents` to `path`, creating its directory.
pub(crate) fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    parent
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, contents))
        .map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}
