//! `/metrics` as OpenMetrics text, parsed strictly, and the counters a storm is judged by.

use std::collections::BTreeMap;
use std::fmt;

use tower_refresh_coalesce::Outcome;

use super::Error;

/// The samples of an OpenMetrics exposition, keyed by `name{label="value",...}` exactly as
/// written.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    samples: BTreeMap<String, f64>,
}

/// Why a text is not the OpenMetrics the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsError {
    why: &'static str,
    line: String,
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed metrics ({}): {:?}", self.why, self.line)
    }
}

impl std::error::Error for MetricsError {}

impl Metrics {
    /// Parses `text`, refusing any line that is not `# HELP`, `# TYPE`, `# UNIT`, a sample
    /// `name{labels} value` of the family last declared by `# TYPE` (a counter's value
    /// whole and non-negative, no timestamp, no series twice), or the final `# EOF`; and a
    /// text without samples.
    pub fn parse(text: &str) -> Result<Self, MetricsError> {
        let fail = |why: &'static str, line: &str| MetricsError {
            why,
            line: line.to_owned(),
        };
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or_else(|| fail("no final `# EOF`", text))?;
        let mut samples = BTreeMap::new();
        let mut family: Option<(&str, &str)> = None;
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let (keyword, rest) = rest.split_once(' ').ok_or_else(|| fail("comment", line))?;
                let (name, text) = rest
                    .split_once(' ')
                    .ok_or_else(|| fail("descriptor", line))?;
                if metric_name_len(name) != Some(name.len()) {
                    return Err(fail("metric family name", line));
                }
                match keyword {
                    "HELP" | "UNIT" => {}
                    "TYPE" => {
                        const TYPES: [&str; 8] = [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "stateset",
                            "info",
                            "summary",
                            "unknown",
                        ];
                        if !TYPES.contains(&text) {
                            return Err(fail("metric type", line));
                        }
                        family = Some((name, text));
                    }
                    _ => return Err(fail("unknown comment", line)),
                }
                continue;
            }
            let name_len = metric_name_len(line).ok_or_else(|| fail("metric name", line))?;
            let name = &line[..name_len];
            let mut rest = &line[name_len..];
            if let Some(labels) = rest.strip_prefix('{') {
                let len = label_set_len(labels).ok_or_else(|| fail("label set", line))?;
                rest = &labels[len..];
            }
            let series = &line[..line.len() - rest.len()];
            let value = rest
                .strip_prefix(' ')
                .ok_or_else(|| fail("no value", line))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                number if number.bytes().all(|b| b"0123456789+-.eE".contains(&b)) => {
                    number.parse().map_err(|_| fail("value", line))?
                }
                _ => return Err(fail("value (or an unexpected timestamp)", line)),
            };
            let (family_name, family_type) =
                family.ok_or_else(|| fail("sample before any # TYPE", line))?;
            let belongs = match family_type {
                "counter" => name == format!("{family_name}_total"),
                "gauge" | "unknown" => name == family_name,
                _ => name.starts_with(family_name),
            };
            if !belongs {
                return Err(fail("sample outside its # TYPE family", line));
            }
            if family_type == "counter" && !(value >= 0.0 && value.fract() == 0.0) {
                return Err(fail(
                    "counter value must be a whole, non-negative number here",
                    line,
                ));
            }
            if samples.insert(series.to_owned(), value).is_some() {
                return Err(fail("duplicate series", line));
            }
        }
        if samples.is_empty() {
            return Err(fail("no samples", text));
        }
        Ok(Self { samples })
    }

    /// The value of `series` (`name` or `name{label="value"}`, exactly as written).
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// Every sample.
    pub fn samples(&self) -> &BTreeMap<String, f64> {
        &self.samples
    }

    /// The series of the layer's requests with `outcome`:
    /// `refresh_coalesce_requests_total{outcome="leader"}`.
    pub fn outcome_series(outcome: Outcome) -> String {
        format!(
            "refresh_coalesce_requests_total{{outcome=\"{}\"}}",
            outcome.as_str()
        )
    }
}

/// Length of the metric name `[a-zA-Z_:][a-zA-Z0-9_:]*` at the start of `text`.
fn metric_name_len(text: &str) -> Option<usize> {
    let first = text.bytes().next()?;
    if !(first.is_ascii_alphabetic() || first == b'_' || first == b':') {
        return None;
    }
    Some(
        text.bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
            .unwrap_or(text.len()),
    )
}

/// Length of `name="value",...}` (after the `{`), with `\\`, `\"` and `\n` escapes.
fn label_set_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    loop {
        let name = &text[i..];
        let first = name.bytes().next()?;
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        i += name
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))?;
        if bytes.get(i..i + 2)? != b"=\"" {
            return None;
        }
        i += 2;
        loop {
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => match bytes.get(i + 1)? {
                    b'\\' | b'"' | b'n' => i += 2,
                    _ => return None,
                },
                b'\n' => return None,
                _ => i += 1,
            }
        }
        i += 1;
        match *bytes.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The counters a refresh storm is judged by, from one server's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// `refresh_rotations_total`: rotations the refresh handler committed.
    pub rotations: u64,
    /// `refresh_reuse_detected_total`: reuses the handler detected, each revoking a family.
    pub reuse_detected: u64,
    /// `refresh_coalesce_requests_total{outcome}` in the order of [`Outcome::ALL`]; 0 where
    /// absent (a server without the layer).
    pub outcomes: [u64; Outcome::ALL.len()],
}

impl Counters {
    /// Reads the counters; the handler's two are required.
    pub fn from_metrics(metrics: &Metrics) -> Result<Self, Error> {
        let required = |series: &str| {
            metrics
                .get(series)
                .map(|value| value as u64)
                .ok_or_else(|| format!("no sample `{series}` on /metrics"))
        };
        let outcomes = Outcome::ALL.map(|outcome| {
            metrics
                .get(&Metrics::outcome_series(outcome))
                .map_or(0, |value| value as u64)
        });
        Ok(Self {
            rotations: required("refresh_rotations_total")?,
            reuse_detected: required("refresh_reuse_detected_total")?,
            outcomes,
        })
    }

    /// The layer's count of requests with `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.outcomes[i])
    }

    /// The counters of several instances added up.
    pub fn sum(all: &[Counters]) -> Counters {
        all.iter().fold(Counters::default(), |mut sum, c| {
            sum.rotations += c.rotations;
            sum.reuse_detected += c.reuse_detected;
            for (total, n) in sum.outcomes.iter_mut().zip(c.outcomes) {
                *total += n;
            }
            sum
        })
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Counters) -> Counters {
        let mut outcomes = self.outcomes;
        for (n, old) in outcomes.iter_mut().zip(before.outcomes) {
            *n = n.saturating_sub(old);
        }
        Counters {
            rotations: self.rotations.saturating_sub(before.rotations),
            reuse_detected: self.reuse_detected.saturating_sub(before.reuse_detected),
            outcomes,
        }
    }

    /// The non-zero layer outcomes: `leader +1, joined +600`; `none` if there are none.
    pub fn outcomes_line(&self) -> String {
        let parts: Vec<String> = Outcome::ALL
            .iter()
            .zip(self.outcomes)
            .filter(|(_, n)| *n > 0)
            .map(|(outcome, n)| format!("{} +{n}", outcome.as_str()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}
