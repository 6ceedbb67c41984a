//! The `trace` mode: one storm in process, recorded by a tracing subscriber and drawn as a
//! waterfall of its spans. The leader's request runs the flight (a child span); callers
//! who join link to the flight; callers after it link to its replay window, a span linked
//! to the flight. The links are checked before the picture is drawn.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use server::harness::{self, call};
use tracing::{
    Instrument, Subscriber,
    span::{Attributes, Id},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

use crate::Error;
use crate::cli::TraceArgs;

const FLIGHT: &str = "refresh_coalesce_flight";
const REPLAY: &str = "refresh_coalesce_replay";

/// One recorded span.
#[derive(Debug, Clone)]
struct Recorded {
    name: String,
    caller: Option<u64>,
    parent: Option<u64>,
    opened: Instant,
    closed: Option<Instant>,
    /// The spans it follows from.
    follows: Vec<u64>,
}

/// Records the spans of the storm: the callers' `request` spans and the layer's own.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<u64, Recorded>>>);

impl<S> Layer<S> for Recorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let name = attrs.metadata().name();
        if ![FLIGHT, REPLAY, "request"].contains(&name) {
            return;
        }
        let mut caller = None;
        attrs.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                if field.name() == "caller" {
                    caller = format!("{value:?}").parse().ok();
                }
            },
        );
        let parent = if attrs.is_root() {
            None
        } else {
            attrs
                .parent()
                .cloned()
                .or_else(|| ctx.current_span().id().cloned())
        };
        self.0.lock().unwrap().insert(
            id.into_u64(),
            Recorded {
                name: name.to_owned(),
                caller,
                parent: parent.map(|p| p.into_u64()),
                opened: Instant::now(),
                closed: None,
                follows: Vec::new(),
            },
        );
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, _ctx: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().get_mut(&span.into_u64()) {
            span.follows.push(follows.into_u64());
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            span.closed = Some(Instant::now());
        }
    }
}

/// One row of the waterfall.
struct Row {
    label: String,
    from_ms: f64,
    /// `None`: still open when the picture was drawn (the replay window).
    to_ms: Option<f64>,
    color: RGBColor,
    /// The row this one links to (a joined caller to the flight, a replayed one to the
    /// replay window).
    link: Option<usize>,
}

const LEADER: RGBColor = RGBColor(0x1f, 0x6f, 0xb2);
const JOINED: RGBColor = RGBColor(0x7f, 0xb2, 0xe5);
const FLIGHT_COLOR: RGBColor = RGBColor(0x11, 0x11, 0x11);
const REPLAY_COLOR: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);
const REPLAYED: RGBColor = RGBColor(0x2e, 0x8b, 0x57);
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);
const FONT: &str = "Helvetica, Arial, sans-serif";

pub(crate) async fn trace_mode(args: &TraceArgs, refresh_delay_ms: u64) -> Result<(), Error> {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(recorder.clone()))
        .map_err(|e| format!("installing the trace recorder: {e}"))?;
    let app = tokio::task::spawn_blocking(move || {
        server::app(server::Config {
            refresh_delay_ms,
            ..harness::config()
        })
    })
    .await??;
    let router = app.router.clone();
    let layer = app
        .state
        .coalesce()
        .ok_or("the server runs without its layer")?;
    let login = Request::post("/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"username":"demo","password":"demo"}"#))?;
    let token = call(&router, login)
        .await
        .refresh_token()
        .ok_or("the demo login failed")?;

    let started = Instant::now();
    let refresh = |caller: u64| {
        let (router, token) = (router.clone(), token.clone());
        tokio::spawn(
            async move {
                let request = Request::post(server::REFRESH_PATH)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(Body::empty())
                    .expect("request");
                call(&router, request).await.status
            }
            .instrument(tracing::info_span!("request", caller)),
        )
    };
    // The leader, then callers who join while its refresh runs, then late retries.
    let mut calls = vec![refresh(1)];
    while layer.stats().leader == 0 {
        tokio::task::yield_now().await;
    }
    // Joined callers arrive over the first half of the refresh.
    let spread = Duration::from_millis(refresh_delay_ms) / (2 * args.joined as u32 + 2);
    for caller in 0..args.joined {
        tokio::time::sleep(spread).await;
        calls.push(refresh(2 + caller as u64));
    }
    for call in calls.drain(..) {
        let status = call.await?;
        if status != StatusCode::OK {
            return Err(format!("a caller of the flight got {status}").into());
        }
    }
    for caller in 0..args.replayed {
        tokio::time::sleep(Duration::from_millis(refresh_delay_ms) / 10).await;
        let status = refresh(2 + (args.joined + caller) as u64).await?;
        if status != StatusCode::OK {
            return Err(format!("a late retry got {status}").into());
        }
    }
    let stats = layer.stats();
    if (stats.leader, stats.joined) != (1, args.joined as u64) {
        return Err(format!(
            "{} leaders and {} joined callers: the refresh was too short for the storm (raise --refresh-delay-ms)",
            stats.leader, stats.joined
        )
        .into());
    }
    println!(
        "leader {}, joined {}, replayed {}, rotations {}",
        stats.leader,
        stats.joined,
        stats.replayed,
        app.state.metrics().rotations_total()
    );

    let spans = recorder.0.lock().unwrap().clone();
    let rows = rows(&spans, started, args)?;
    let svg = draw(&rows, args, refresh_delay_ms, &args.svg)?;
    crate::chart::write_file(&args.svg, &svg)?;
    println!("wrote {}", args.svg.display());
    Ok(())
}

/// The rows of the picture, after checking the links: the flight is the leader's child,
/// every joined caller follows the flight, every late one the replay window.
fn rows(
    spans: &HashMap<u64, Recorded>,
    started: Instant,
    args: &TraceArgs,
) -> Result<Vec<Row>, Error> {
    let ms = |at: Instant| at.saturating_duration_since(started).as_secs_f64() * 1000.0;
    let find = |name: &str| {
        spans
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(id, s)| (*id, s))
            .collect::<Vec<_>>()
    };
    let [(flight_id, flight)] = find(FLIGHT)[..] else {
        return Err("expected exactly one flight span".into());
    };
    let [(replay_id, replay)] = find(REPLAY)[..] else {
        return Err("expected exactly one replay span".into());
    };
    let mut requests = find("request");
    requests.sort_by_key(|(_, s)| s.caller);
    let leader = requests
        .iter()
        .find(|(_, s)| s.caller == Some(1))
        .ok_or("no leader request")?;
    if flight.parent != Some(leader.0) || replay.follows != [flight_id] {
        return Err("the flight is not the leader's child, or the replay not linked to it".into());
    }
    let bar = |label: String, span: &Recorded, color, link| Row {
        label,
        from_ms: ms(span.opened),
        to_ms: span.closed.map(ms),
        color,
        link,
    };
    let mut rows = vec![
        bar("caller 1: leader".into(), leader.1, LEADER, None),
        bar("flight (inner call)".into(), flight, FLIGHT_COLOR, None),
    ];
    for (_, span) in requests.iter().skip(1) {
        let caller = span.caller.unwrap_or_default();
        let row = if span.follows == [flight_id] {
            bar(format!("caller {caller}: joined"), span, JOINED, Some(1))
        } else if span.follows == [replay_id] {
            if !rows.iter().any(|r| r.label.starts_with("replay window")) {
                rows.push(bar(
                    "replay window (TTL)".into(),
                    replay,
                    REPLAY_COLOR,
                    None,
                ));
            }
            let window = rows.len() - 1;
            let window = rows[..=window]
                .iter()
                .rposition(|r| r.label.starts_with("replay window"))
                .unwrap_or(window);
            bar(
                format!("caller {caller}: replayed"),
                span,
                REPLAYED,
                Some(window),
            )
        } else {
            return Err(format!("caller {caller} links to {:?}", span.follows).into());
        };
        rows.push(row);
    }
    if rows.len() != 3 + args.joined + args.replayed {
        return Err(format!(
            "{} rows for {} callers",
            rows.len(),
            1 + args.joined + args.replayed
        )
        .into());
    }
    Ok(rows)
}

fn draw(rows: &[Row], args: &TraceArgs, delay_ms: u64, path: &Path) -> Result<String, Error> {
    let end_ms = rows.iter().filter_map(|r| r.to_ms).fold(0.0_f64, f64::max) * 1.08;
    let (width, height) = (960u32, 120 + 26 * rows.len() as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = TextStyle::from((FONT, 20).into_font()).color(&BLACK);
        root.draw_text(
            &format!(
                "One storm, one trace: {} callers, 1 inner call ({delay_ms} ms)",
                1 + args.joined + args.replayed
            ),
            &title,
            (20, 14),
        )?;
        let note = TextStyle::from((FONT, 13).into_font()).color(&GREY);
        root.draw_text(
            "Spans from the tracing subscriber; grey lines: span links (follows_from) to the flight or its replay window",
            &note,
            (20, 42),
        )?;
        let area = root.margin(70, 40, 20, 20);
        let mut chart = ChartBuilder::on(&area)
            .y_label_area_size(170)
            .x_label_area_size(30)
            .build_cartesian_2d(0.0..end_ms, (rows.len() as f64)..0.0)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("ms since the first request")
            .x_label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()?;
        let label = TextStyle::from((FONT, 13).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (i, row) in rows.iter().enumerate() {
            let y = i as f64 + 0.5;
            let to = row.to_ms.unwrap_or(end_ms);
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (row.from_ms, y - 0.32),
                    (to.max(row.from_ms + end_ms * 0.003), y + 0.32),
                ],
                row.color.filled(),
            )))?;
            let (x, _) = chart.backend_coord(&(0.0, y));
            let (_, py) = chart.backend_coord(&(0.0, y));
            root.draw_text(&row.label, &label, (x - 8, py))?;
            if let Some(target) = row.link {
                let ty = target as f64 + 0.5;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(row.from_ms, y - 0.32), (row.from_ms, ty + 0.32)],
                    GREY.stroke_width(1),
                )))?;
            }
        }
        root.draw_text(
            &format!("cargo run --release -p load -- trace --joined {} --replayed {} --refresh-delay-ms {delay_ms} --svg {}", args.joined, args.replayed, path.display()),
            &note,
            (20, height as i32 - 22),
        )?;
        root.present()?;
    }
    Ok(svg)
}
