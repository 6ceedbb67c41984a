//! Figures of one run, and their median and range over runs.

use std::time::Duration;

use server::harness::Counters;
use tower_refresh_coalesce::Outcome;

use crate::fire::{Fired, Tally};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Count,
    Millis,
    PerSec,
    Percent,
}

pub(crate) fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Count if value.fract() == 0.0 => format!("{value:.0}"),
        Unit::Count => format!("{value:.1}"),
        Unit::Millis if value < 10.0 => format!("{value:.2} ms"),
        Unit::Millis => format!("{value:.1} ms"),
        Unit::PerSec => format!("{value:.0} req/s"),
        Unit::Percent => format!("{value:.1} %"),
    }
}

pub(crate) fn millis(d: Duration) -> String {
    format_value(d.as_secs_f64() * 1e3, Unit::Millis)
}

/// The headline numbers of one run, by name.
#[derive(Debug, Default)]
pub(crate) struct Figures(Vec<(String, f64, Unit)>);

impl Figures {
    pub(crate) fn add(&mut self, name: impl Into<String>, value: f64, unit: Unit) {
        self.0.push((name.into(), value, unit));
    }

    pub(crate) fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, ..)| n == name).map(|(_, v, _)| *v)
    }

    /// Throughput, latency percentiles and answers by status.
    pub(crate) fn load(&mut self, prefix: &str, fired: &Fired) {
        let total = fired.total();
        self.add(
            format!("{prefix}throughput"),
            fired.throughput(),
            Unit::PerSec,
        );
        self.latency(prefix, &total);
        for (status, n) in &total.statuses {
            self.add(format!("{prefix}status {status}"), *n as f64, Unit::Count);
        }
    }

    pub(crate) fn latency(&mut self, prefix: &str, tally: &Tally) {
        for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
            self.add(
                format!("{prefix}{name}"),
                ms(tally.quantile(q)),
                Unit::Millis,
            );
        }
        self.add(format!("{prefix}max"), ms(tally.max()), Unit::Millis);
    }

    pub(crate) fn counters(&mut self, prefix: &str, delta: &Counters) {
        self.add(
            format!("{prefix}rotations"),
            delta.rotations as f64,
            Unit::Count,
        );
        self.add(
            format!("{prefix}reuse detections"),
            delta.reuse_detected as f64,
            Unit::Count,
        );
        for (outcome, n) in Outcome::ALL.iter().zip(delta.outcomes) {
            if n > 0 {
                self.add(
                    format!("{prefix}layer {}", outcome.as_str()),
                    n as f64,
                    Unit::Count,
                );
            }
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and range of each figure over the runs.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) runs: Vec<Figures>,
}

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) unit: Unit,
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Summary {
    /// Every figure in order of first appearance; a figure missing from a run (a status
    /// that did not occur) counts as 0 there.
    pub(crate) fn rows(&self) -> Vec<Row> {
        let mut names: Vec<(&str, Unit)> = Vec::new();
        for (name, _, unit) in self.runs.iter().flat_map(|figures| &figures.0) {
            if !names.iter().any(|(n, _)| n == name) {
                names.push((name, *unit));
            }
        }
        names
            .into_iter()
            .map(|(name, unit)| {
                let values: Vec<f64> = self
                    .runs
                    .iter()
                    .map(|figures| figures.get(name).unwrap_or(0.0))
                    .collect();
                let (min, max) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                Row {
                    name: name.to_owned(),
                    unit,
                    median: median(values),
                    min,
                    max,
                }
            })
            .collect()
    }

    pub(crate) fn median(&self, name: &str) -> f64 {
        median(
            self.runs
                .iter()
                .map(|figures| figures.get(name).unwrap_or(0.0))
                .collect(),
        )
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let runs = self.runs.len();
        if runs > 1 {
            writeln!(f, "summary over {runs} runs: median [min – max]")?;
        } else {
            writeln!(f, "summary of 1 run:")?;
        }
        let rows = self.rows();
        let width = rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(0);
        for row in rows {
            write!(
                f,
                "  {:<width$}  {:>14}",
                row.name,
                format_value(row.median, row.unit)
            )?;
            if runs > 1 {
                write!(
                    f,
                    "  [{} – {}]",
                    format_value(row.min, row.unit),
                    format_value(row.max, row.unit)
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
