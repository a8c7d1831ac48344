//! The plot: per mode, database connections against the limit and each
//! service's pool, queue depths below, periods of failing application health
//! shaded, and concord's decisions marked (green admit, orange held, red
//! reject). SVG, rendered with `plotters`; the same runs give the same bytes.

use plotters::prelude::*;

use crate::run::{Mode, Run};
use concord_proto::Verdict;

/// Most points drawn per series (longer runs are bucketed, keeping each bucket's peak).
pub const POINTS_MAX: usize = 2_000;

const W: u32 = 1200;
const H: u32 = 330;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot: {0}")]
pub struct PlotError(String);

fn err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError(format!("{e:?}"))
}

/// Buckets `(x, y)` to at most [`POINTS_MAX`] points, each the bucket's maximum.
fn thin(t: &[u64], ys: &[f64]) -> Vec<(f64, f64)> {
    let n = t.len().min(ys.len());
    let per = n.div_ceil(POINTS_MAX).max(1);
    (0..n)
        .step_by(per)
        .map(|i| {
            let end = (i + per).min(n);
            let y = ys[i..end].iter().cloned().fold(f64::MIN, f64::max);
            (t[i] as f64 / 3_600_000.0, y)
        })
        .collect()
}

/// Draws the runs, one pair of charts per mode, as an SVG document.
pub fn svg(title: &str, runs: &[Run]) -> Result<String, PlotError> {
    let mut buf = String::new();
    {
        let rows = (runs.len() * 2).max(1) as u32;
        let root = SVGBackend::with_string(&mut buf, (W, H * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((rows as usize, 1));
        for (i, run) in runs.iter().enumerate() {
            draw_connections(&areas[i * 2], title, run)?;
            draw_queues(&areas[i * 2 + 1], run)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

fn hours(run: &Run) -> f64 {
    run.series
        .t_ms
        .last()
        .map(|t| *t as f64 / 3_600_000.0)
        .unwrap_or(1.0)
        .max(1.0 / 60.0)
}

fn shade<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    run: &Run,
    top: f64,
) -> Result<(), PlotError> {
    // Minutes where any service's application health was failing.
    let s = &run.series;
    let mut spans: Vec<(f64, f64)> = Vec::new();
    let mut start: Option<f64> = None;
    for (k, t) in s.t_ms.iter().enumerate() {
        let failing = s.failing.iter().any(|f| f.get(k) == Some(&1));
        let x = *t as f64 / 3_600_000.0;
        match (failing, start) {
            (true, None) => start = Some(x),
            (false, Some(a)) => {
                spans.push((a, x));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(a) = start {
        spans.push((a, hours(run)));
    }
    chart
        .draw_series(spans.into_iter().map(|(a, b)| {
            Rectangle::new(
                [(a, 0.0), (b.max(a + 1.0 / 60.0), top)],
                RGBColor(255, 215, 215).filled(),
            )
        }))
        .map_err(err)?;
    Ok(())
}

fn markers<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    run: &Run,
    top: f64,
) -> Result<(), PlotError> {
    for (k, (t, v, label)) in run.markers.iter().enumerate() {
        // Decisions close in time would print over each other: stagger the labels.
        let y = top * (0.95 - 0.07 * (k % 6) as f64);
        let x = *t as f64 / 3_600_000.0;
        let color = match v {
            Verdict::Admit => RGBColor(0, 150, 0),
            Verdict::NeedsApproval => RGBColor(230, 140, 0),
            Verdict::Reject => RGBColor(200, 0, 0),
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, top)],
                color.stroke_width(1),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{label}: {}", v.name()),
                (x, y),
                ("sans-serif", 11).into_font().color(&color),
            )))
            .map_err(err)?;
    }
    Ok(())
}

fn draw_connections<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    run: &Run,
) -> Result<(), PlotError> {
    let s = &run.series;
    let limit = s.db_max.iter().cloned().fold(0.0, f64::max);
    let peak = s.db_connections.iter().cloned().fold(0.0, f64::max);
    let top = (limit * 1.5).max(peak * 1.1).max(10.0);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{title} — {}: database connections vs limit, pools",
                mode_title(run.mode)
            ),
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..hours(run), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("hours")
        .y_desc("connections")
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    shade(&mut chart, run, top)?;
    let clamp = |v: Vec<(f64, f64)>| v.into_iter().map(|(x, y)| (x, y.min(top))).collect::<Vec<_>>();
    chart
        .draw_series(LineSeries::new(clamp(thin(&s.t_ms, &s.db_max)), RED.stroke_width(2)))
        .map_err(err)?
        .label("database limit")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .draw_series(LineSeries::new(
            clamp(thin(&s.t_ms, &s.db_connections)),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("connections held")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    let palette = [
        RGBColor(0, 140, 70),
        RGBColor(120, 60, 160),
        RGBColor(150, 110, 0),
        RGBColor(0, 120, 160),
    ];
    for (i, name) in s.services.iter().enumerate() {
        let c = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(
                clamp(thin(&s.t_ms, &s.pool_total[i])),
                c.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{name} pool x replicas"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
    }
    markers(&mut chart, run, top)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn draw_queues<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, run: &Run) -> Result<(), PlotError> {
    let s = &run.series;
    let top = s
        .queue
        .iter()
        .flat_map(|q| q.iter().cloned())
        .fold(0.0, f64::max)
        .max(10.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{}: queue depth (shaded: application health failing)",
                mode_title(run.mode)
            ),
            ("sans-serif", 14),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..hours(run), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("hours")
        .y_desc("requests queued")
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    shade(&mut chart, run, top)?;
    let palette = [
        RGBColor(0, 140, 70),
        RGBColor(120, 60, 160),
        RGBColor(150, 110, 0),
        RGBColor(0, 120, 160),
    ];
    for (i, name) in s.services.iter().enumerate() {
        let c = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(thin(&s.t_ms, &s.queue[i]), c.stroke_width(1)))
            .map_err(err)?
            .label(format!("{name} queue"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
    }
    markers(&mut chart, run, top)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn mode_title(m: Mode) -> &'static str {
    match m {
        Mode::Coordinated => "coordinated (through concord)",
        Mode::Uncoordinated => "uncoordinated (agents act directly)",
    }
}
