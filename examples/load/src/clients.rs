//! The `clients` mode: the storm from both ends, as the demo runs it, `--runs` times: a
//! client without and with the client layer against a server without and with its layer,
//! `N` concurrent `GET /api/me` with an expired access token.

use api_client::storm::{self, ClientKind};

use crate::Error;
use crate::cli::{ClientsArgs, TargetArgs};
use crate::stats::{Figures, Summary, Unit, ms};

/// One of the four runs.
pub(crate) struct Cell {
    pub(crate) label: &'static str,
    client: ClientKind,
    server_layer: bool,
}

/// The four runs, in the order of the chart's bars.
pub(crate) const CELLS: [Cell; 4] = [
    Cell {
        label: "refresh on 401, no server layer",
        client: ClientKind::Naive,
        server_layer: false,
    },
    Cell {
        label: "refresh on 401, server layer",
        client: ClientKind::Naive,
        server_layer: true,
    },
    Cell {
        label: "client layer, no server layer",
        client: ClientKind::Layer,
        server_layer: false,
    },
    Cell {
        label: "client layer, server layer",
        client: ClientKind::Layer,
        server_layer: true,
    },
];

pub(crate) async fn clients_mode(
    target: &TargetArgs,
    runs: usize,
    args: &ClientsArgs,
) -> Result<Summary, Error> {
    if !target.targets.is_empty() {
        return Err("the clients mode starts its own servers: --target does not apply".into());
    }
    let mut summary = Summary { runs: Vec::new() };
    for run in 1..=runs {
        let mut figures = Figures::default();
        for cell in &CELLS {
            let report = storm::run(storm::Options {
                requests: args.requests,
                refresh_delay_ms: target.refresh_delay_ms,
                server_layer: cell.server_layer,
                client: cell.client,
            })
            .await?;
            let name = |figure: &str| format!("{}: {figure}", cell.label);
            figures.add(name("refreshes sent"), report.refreshes as f64, Unit::Count);
            figures.add(name("status 200"), report.ok as f64, Unit::Count);
            figures.add(
                name("reuse detections"),
                report.reuse_detected as f64,
                Unit::Count,
            );
            figures.add(
                name("logged in"),
                f64::from(u8::from(report.logged_in)),
                Unit::Count,
            );
            figures.add(name("p50"), ms(report.latency(0.50)), Unit::Millis);
            figures.add(name("p99"), ms(report.latency(0.99)), Unit::Millis);
            figures.add(name("wall"), ms(report.wall), Unit::Millis);
            eprintln!(
                "run {run}/{runs}, {}: {} refreshes sent, {} × 200, {} reuse, logged in: {}",
                cell.label, report.refreshes, report.ok, report.reuse_detected, report.logged_in
            );
        }
        summary.runs.push(figures);
    }
    Ok(summary)
}
