//! The engine's inputs about interfaces: what the kernel says of each one,
//! and what probes and the current path measure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use crate::config::Kind;

/// One interface as the kernel reports it. The driver passes the whole table
/// to [`crate::Engine::on_table`] whenever it changes; user attributes are
/// added by the engine from [`crate::PolicyConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name (`wlan0`), as the user and `baton switch` name it.
    pub name: String,
    /// Link kind.
    pub kind: Kind,
    /// Administratively and operationally up.
    pub up: bool,
    /// Has an address that can reach beyond the link.
    pub has_address: bool,
    /// Lowest metric of a default route through it (lower is preferred);
    /// `None` without a default route. The preference when the user sets
    /// none.
    pub route_metric: Option<u32>,
}

impl Interface {
    /// An interface that is up, addressed, and has a default route of
    /// metric `route_metric`.
    pub fn usable(name: impl Into<String>, kind: Kind, route_metric: Option<u32>) -> Self {
        Self {
            name: name.into(),
            kind,
            up: true,
            has_address: true,
            route_metric,
        }
    }
}

/// One measurement, reported with [`crate::Engine::on_measurement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// A probe to the gateway, sent bound to this interface, was answered
    /// after this round trip.
    Rtt(Duration),
    /// A probe got no answer within the driver's probe timeout.
    Lost,
    /// The path on this interface has held unacknowledged data without
    /// progress for this long; `Duration::ZERO` once data moves again. The
    /// engine extends a non-zero stall with the time that passes, so the
    /// driver need not repeat it.
    Stall(Duration),
    /// Bytes per second delivered over the last interval during which the
    /// application had data waiting (idle intervals are not reported).
    Throughput(u64),
}

/// Probe results over the configured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Probes sent in the window (answered or lost).
    pub samples: u32,
    /// Mean round trip of the answered probes.
    #[serde(rename = "rtt_ms", serialize_with = "millis")]
    pub rtt: Option<Duration>,
    /// Fraction of probes lost.
    pub loss: Option<f64>,
    /// Mean absolute difference between consecutive round trips.
    #[serde(rename = "jitter_ms", serialize_with = "millis")]
    pub jitter: Option<Duration>,
}

fn millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    d.map(|d| d.as_secs_f64() * 1e3).serialize(s)
}

/// Most probes kept per interface, whatever the window: bounds memory when a
/// driver probes faster than the configuration assumes.
const MAX_SAMPLES: usize = 256;

/// The recent probe results of one interface.
#[derive(Debug, Clone, Default)]
pub(crate) struct Window {
    samples: VecDeque<(Instant, Option<Duration>)>,
}

impl Window {
    pub(crate) fn push(&mut self, at: Instant, rtt: Option<Duration>, span: Duration) {
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| at.saturating_duration_since(t) >= span)
        {
            self.samples.pop_front();
        }
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, rtt));
    }

    /// Probes taken at or after `t`.
    pub(crate) fn count_since(&self, t: Instant) -> u32 {
        self.samples.iter().filter(|&&(at, _)| at >= t).count() as u32
    }

    pub(crate) fn stats(&self, now: Instant, span: Duration) -> Stats {
        let recent = self
            .samples
            .iter()
            .filter(|&&(t, _)| now.saturating_duration_since(t) < span);
        let (mut samples, mut lost, mut sum, mut answered) = (0u32, 0u32, 0.0f64, 0u32);
        let (mut prev, mut jitter_sum, mut jitter_n) = (None::<f64>, 0.0f64, 0u32);
        for &(_, rtt) in recent {
            samples += 1;
            match rtt {
                None => lost += 1,
                Some(d) => {
                    let v = d.as_secs_f64();
                    sum += v;
                    answered += 1;
                    if let Some(p) = prev {
                        jitter_sum += (v - p).abs();
                        jitter_n += 1;
                    }
                    prev = Some(v);
                }
            }
        }
        let secs = |v: f64| Duration::try_from_secs_f64(v).ok();
        Stats {
            samples,
            rtt: (answered > 0)
                .then(|| secs(sum / f64::from(answered)))
                .flatten(),
            loss: (samples > 0).then(|| f64::from(lost) / f64::from(samples)),
            jitter: (jitter_n > 0)
                .then(|| secs(jitter_sum / f64::from(jitter_n)))
                .flatten(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_averages_and_forgets() {
        let t0 = Instant::now();
        let span = Duration::from_secs(10);
        let mut w = Window::default();
        let ms = Duration::from_millis;
        w.push(t0, Some(ms(100)), span);
        w.push(t0 + ms(1000), Some(ms(120)), span);
        w.push(t0 + ms(2000), None, span);
        w.push(t0 + ms(3000), Some(ms(80)), span);
        let s = w.stats(t0 + ms(3000), span);
        assert_eq!(s.samples, 4);
        assert_eq!(s.rtt, Some(ms(100)));
        assert_eq!(s.loss, Some(0.25));
        // |120-100| and |80-120| across the lost probe.
        assert_eq!(s.jitter, Some(ms(30)));
        // The first sample leaves the window ten seconds after it was taken.
        let s = w.stats(t0 + ms(10_000), span);
        assert_eq!((s.samples, s.rtt), (3, Some(ms(100))));
        assert_eq!(
            w.stats(t0 + ms(20_000), span),
            Stats {
                samples: 0,
                rtt: None,
                loss: None,
                jitter: None
            }
        );
    }

    #[test]
    fn window_is_bounded() {
        let t0 = Instant::now();
        let mut w = Window::default();
        for i in 0..1000 {
            w.push(t0, Some(Duration::from_millis(i)), Duration::from_secs(10));
        }
        assert_eq!(
            w.stats(t0, Duration::from_secs(10)).samples,
            MAX_SAMPLES as u32
        );
    }
}
