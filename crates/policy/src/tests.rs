//! Scenario tests on synthetic timelines, and a property test over random
//! input sequences.
//!
//! [`Sim`] is the driver a runtime would be, with a virtual clock: it calls
//! `handle_timeout` when `poll_timeout` says, answers every probe at once
//! from a per-interface model of round trip over time, and completes each
//! switch after a fixed delay.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Round trip of a link at `t` seconds into the timeline; `None` = probe
/// lost.
type Model = Box<dyn Fn(f64) -> Option<Duration>>;

struct Sim {
    engine: Engine,
    t0: Instant,
    now: Instant,
    table: Vec<Interface>,
    links: BTreeMap<String, Model>,
    /// Every decision, with the second it was made at.
    log: Vec<(f64, Decision)>,
    /// Every probe sent, with the second.
    probes: Vec<(f64, String)>,
    switch_delay: Duration,
    finishing: Option<(Instant, String)>,
    /// Switches to these interfaces fail.
    failing: Vec<String>,
}

impl Sim {
    fn new(config: PolicyConfig, table: Vec<Interface>) -> Self {
        let t0 = Instant::now();
        Self {
            engine: Engine::new(config),
            t0,
            now: t0,
            table,
            links: BTreeMap::new(),
            log: Vec::new(),
            probes: Vec::new(),
            switch_delay: ms(200),
            finishing: None,
            failing: Vec::new(),
        }
    }

    fn link(mut self, name: &str, model: impl Fn(f64) -> Option<Duration> + 'static) -> Self {
        self.links.insert(name.to_owned(), Box::new(model));
        self
    }

    /// Hands the engine its first table (links must be set up first, since
    /// the start-up decision comes at once).
    fn start(mut self) -> Self {
        let table = self.table.clone();
        self.engine.on_table(&table, self.now);
        self.drain();
        self
    }

    fn secs(&self) -> f64 {
        self.now.saturating_duration_since(self.t0).as_secs_f64()
    }

    fn drain(&mut self) {
        while let Some(d) = self.engine.poll() {
            self.check_target(&d);
            if let Decision::Switch { to, .. } = &d {
                self.engine.on_switch_started(to, self.now);
                self.finishing = Some((self.now + self.switch_delay, to.clone()));
            }
            self.log.push((self.secs(), d));
        }
        while let Some(p) = self.engine.poll_probe() {
            let t = self.secs();
            let sample = self
                .links
                .get(&p)
                .and_then(|f| f(t))
                .map_or(Sample::Lost, Sample::Rtt);
            self.engine.on_measurement(&p, sample, self.now);
            self.probes.push((t, p));
        }
    }

    /// What must hold of every decision, in every test: a switch or a
    /// proposal names an interface that is in the table, up, addressed, not
    /// `never_use`, and not the current one.
    fn check_target(&self, d: &Decision) {
        let (Decision::Switch { to, .. } | Decision::Propose { to, .. }) = d else {
            return;
        };
        let iface = self.table.iter().find(|i| &i.name == to);
        assert!(
            iface.is_some_and(|i| i.up && i.has_address),
            "{d:?} at {}s: absent or down in {:?}",
            self.secs(),
            self.table
        );
        let kind = iface.map_or(Kind::Other, |i| i.kind);
        assert!(
            !self.engine.config().attributes(to, kind).never_use,
            "{d:?}: never_use"
        );
        if matches!(
            d,
            Decision::Switch { addr: None, .. } | Decision::Propose { addr: None, .. }
        ) {
            assert_ne!(
                self.engine.current(),
                Some(to.as_str()),
                "{d:?}: the current interface"
            );
        }
    }

    /// Runs the timeline up to `secs` seconds.
    fn run_until(&mut self, secs: f64) {
        let end = self.t0 + Duration::from_secs_f64(secs);
        loop {
            let fin = self.finishing.as_ref().map(|f| f.0);
            let next = [self.engine.poll_timeout(), fin]
                .into_iter()
                .flatten()
                .min();
            let Some(t) = next.filter(|&t| t <= end) else {
                break;
            };
            self.now = self.now.max(t);
            if fin.is_some_and(|f| f <= t) {
                let (_, to) = self.finishing.take().unwrap();
                if self.failing.contains(&to) {
                    self.engine.on_switch_failed(&to, self.now);
                } else {
                    self.engine.on_switch_finished(&to, self.now);
                }
            } else {
                self.engine.handle_timeout(self.now);
            }
            self.drain();
        }
        self.now = self.now.max(end);
    }

    fn set_table(&mut self, table: Vec<Interface>) {
        self.table = table;
        self.engine.on_table(&self.table, self.now);
        self.drain();
    }

    fn set_up(&mut self, name: &str, up: bool) {
        let mut table = self.table.clone();
        for i in table.iter_mut().filter(|i| i.name == name) {
            i.up = up;
        }
        self.set_table(table);
    }

    /// Switch decisions: (second, to, reason, urgent).
    fn switches(&self) -> Vec<(f64, String, Reason, bool)> {
        self.log
            .iter()
            .filter_map(|(t, d)| match d {
                Decision::Switch {
                    to, reason, urgent, ..
                } => Some((*t, to.clone(), reason.clone(), *urgent)),
                _ => None,
            })
            .collect()
    }

    fn count(&self, pred: impl Fn(&Decision) -> bool) -> usize {
        self.log.iter().filter(|(_, d)| pred(d)).count()
    }

    fn since(&self, t: f64) -> Vec<&Decision> {
        self.log
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, d)| d)
            .collect()
    }
}

fn steady(v: u64) -> impl Fn(f64) -> Option<Duration> {
    move |_| Some(ms(v))
}

/// `before` until second `at`, then `after`.
fn step(before: u64, at: f64, after: u64) -> impl Fn(f64) -> Option<Duration> {
    move |t| Some(ms(if t < at { before } else { after }))
}

/// A round trip good (50 ms) until second 60, past the default warning of 300 ms (400 ms)
/// until second 120, past the default critical 1 s (1500 ms) after.
fn worsening() -> impl Fn(f64) -> Option<Duration> {
    |t| {
        Some(ms(if t < 60.0 {
            50
        } else if t < 120.0 {
            400
        } else {
            1500
        }))
    }
}

/// Deterministic noise in [-1, 1] for second `t` (splitmix64 of the
/// millisecond and the seed): the same timeline on every run.
fn noise(t: f64, seed: u64) -> f64 {
    let mut z = ((t * 1000.0) as u64) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

fn wifi(name: &str, metric: u32) -> Interface {
    Interface::usable(name, Kind::Wifi, Some(metric))
}

fn cell(name: &str, metric: u32) -> Interface {
    Interface::usable(name, Kind::Cellular, Some(metric))
}

fn eth(name: &str, metric: u32) -> Interface {
    Interface::usable(name, Kind::Ethernet, Some(metric))
}

fn down(mut i: Interface) -> Interface {
    i.up = false;
    i
}

fn rule(f: impl FnOnce(&mut InterfaceRule)) -> InterfaceRule {
    let mut r = InterfaceRule::default();
    f(&mut r);
    r
}

// ---- thresholds ----

#[test]
fn warning_starts_search_critical_switches() {
    // The alternative is itself past the warning threshold: a warning alone
    // must only start the search; the critical threshold moves the path.
    let mut sim = Sim::new(
        PolicyConfig::default(),
        vec![wifi("wlan0", 600), cell("wwan0", 700)],
    )
    .link("wlan0", worsening())
    .link("wwan0", steady(350))
    .start();
    sim.run_until(59.0);
    assert_eq!(sim.switches().len(), 1, "start-up only");
    assert_eq!(sim.engine.current(), Some("wlan0"));
    assert_eq!(sim.count(|d| matches!(d, Decision::StartSearch { .. })), 0);
    let probes_before = sim
        .probes
        .iter()
        .filter(|(t, p)| *t > 40.0 && p == "wwan0")
        .count();

    sim.run_until(119.0);
    let starts: Vec<_> = sim
        .log
        .iter()
        .filter(|(_, d)| matches!(d, Decision::StartSearch { .. }))
        .collect();
    assert_eq!(starts.len(), 1, "{:?}", sim.log);
    let (at, d) = starts[0];
    // The 10s window's mean crosses 300ms about 7s after the change.
    assert!((60.0..70.0).contains(at), "{at}");
    assert!(
        matches!(d, Decision::StartSearch { reason: Reason::Warning(Trigger::Rtt { limit, .. }) } if *limit == ms(300)),
        "{d:?}"
    );
    assert_eq!(
        sim.switches().len(),
        1,
        "a warning alone does not switch to a worse-or-equal link"
    );
    // While degraded, the alternatives are probed at every check, not every
    // search.
    let probes_after = sim
        .probes
        .iter()
        .filter(|(t, p)| *t > 100.0 && p == "wwan0")
        .count();
    assert!(
        probes_after >= 3 * probes_before,
        "{probes_before} then {probes_after}"
    );

    sim.run_until(140.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{sw:?}");
    let (at, to, reason, urgent) = &sw[1];
    assert!((120.0..130.0).contains(at), "{at}");
    assert_eq!(to, "wwan0");
    assert!(urgent);
    assert!(
        matches!(reason, Reason::Critical(Trigger::Rtt { limit, .. }) if *limit == ms(1000)),
        "{reason:?}"
    );
    assert_eq!(sim.engine.current(), Some("wwan0"));
}

#[test]
fn warning_moves_to_a_good_alternative_in_auto_mode() {
    // A metered fallback: never an improvement while wlan0 is good, so only
    // the warning can move the path.
    let mut config = PolicyConfig::default();
    config
        .kinds
        .insert(Kind::Cellular, rule(|r| r.metered = Some(true)));
    let mut sim = Sim::new(config, vec![wifi("wlan0", 600), cell("wwan0", 700)])
        .link("wlan0", step(50, 60.0, 400))
        .link("wwan0", steady(80))
        .start();
    sim.run_until(100.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{sw:?}");
    let (at, to, reason, urgent) = &sw[1];
    assert!((60.0..70.0).contains(at), "{at}");
    assert_eq!(to, "wwan0");
    assert!(!urgent, "a warning is not urgent");
    assert!(matches!(reason, Reason::Warning(_)), "{:?}", sim.log);
}

#[test]
fn a_growing_stall_reaches_critical_without_new_reports() {
    let mut sim = Sim::new(
        PolicyConfig::default(),
        vec![eth("eth0", 100), wifi("wlan0", 600)],
    )
    .link("eth0", steady(5))
    .link("wlan0", steady(30))
    .start();
    sim.run_until(10.0);
    // Reported once: the engine extends it with the time that passes.
    sim.engine
        .on_measurement("eth0", Sample::Stall(ms(300)), sim.now);
    sim.run_until(15.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{:?}", sim.log);
    let (at, to, reason, urgent) = &sw[1];
    // Warning at 1s of stall; the good wlan0 is not taken then because of the
    // dwell time since start-up; critical at 2s switches regardless.
    assert!((11.5..12.5).contains(at), "{at}");
    assert_eq!((to.as_str(), *urgent), ("wlan0", true));
    assert!(
        matches!(reason, Reason::Critical(Trigger::Stall { limit, .. }) if *limit == ms(2000)),
        "{reason:?}"
    );
    assert!(
        sim.count(|d| matches!(
            d,
            Decision::StartSearch {
                reason: Reason::Warning(Trigger::Stall { .. })
            }
        )) == 1
    );
}

#[test]
fn each_gateway_address_has_its_own_measurements() {
    const A: &str = "192.0.2.1:7700";
    const B: &str = "198.51.100.1:7700";
    let mut sim = Sim::new(PolicyConfig::default(), vec![eth("eth0", 100)])
        .link("eth0", |t| (t < 10.0).then_some(ms(5)))
        .start();
    sim.run_until(13.0);
    let before = sim.engine.interfaces(sim.now)[0].clone();
    assert!(before.stats.loss.is_some_and(|l| l > 0.0), "{before:?}");
    // The probes go to a named address from now on: what was measured
    // before, towards no address known, says nothing of it.
    sim.engine.on_targets(Some(A), &[], sim.now);
    let after = sim.engine.interfaces(sim.now)[0].clone();
    assert_eq!(
        (after.stats.samples, after.health),
        (0, Health::Unknown),
        "{after:?}"
    );
    sim.run_until(16.0);
    let on_a = sim.engine.interfaces(sim.now)[0].stats.samples;
    assert!(on_a > 0);
    // The session moves to B: A's measurements are kept as another path's.
    sim.engine.on_targets(Some(B), &[A.to_owned()], sim.now);
    assert_eq!(sim.engine.interfaces(sim.now)[0].stats.samples, 0);
    let paths = sim.engine.paths(sim.now);
    let a = paths
        .iter()
        .find(|p| p.gateway_addr.as_deref() == Some(A))
        .expect("A is a candidate");
    assert_eq!((a.stats.samples, a.current), (on_a, false), "{paths:?}");
    sim.engine.on_targets(Some(A), &[B.to_owned()], sim.now);
    assert_eq!(
        sim.engine.interfaces(sim.now)[0].stats.samples,
        on_a,
        "back on A, its measurements with it"
    );
}

#[test]
fn losing_probes_reaches_critical() {
    // eth0 loses every probe from 40 s on; wlan0 stays good.
    let run = |config| {
        let mut sim = Sim::new(config, vec![eth("eth0", 100), wifi("wlan0", 600)])
            .link("eth0", |t| (t < 40.0).then_some(ms(5)))
            .link("wlan0", steady(30))
            .start();
        sim.run_until(50.0);
        sim
    };
    let sim = run(PolicyConfig::default());
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{sw:?}");
    let (at, to, reason, urgent) = &sw[1];
    // One lost probe out of twenty is the 5% warning and, wlan0 being good
    // and the dwell over, already a (planned) switch.
    assert!((40.0..41.0).contains(at), "{at}");
    assert_eq!(to, "wlan0");
    assert!(
        matches!(reason, Reason::Warning(Trigger::Loss { .. })),
        "{reason:?}"
    );
    assert!(!urgent);

    // With the warning off, loss goes on until critical (4 of 20 probes).
    let mut config = PolicyConfig::default();
    config.warning.loss = None;
    let (at, _, reason, urgent) = run(config).switches()[1].clone();
    assert!((41.0..42.5).contains(&at), "{at}");
    assert!(
        matches!(reason, Reason::Critical(Trigger::Loss { loss, .. }) if loss >= 0.2),
        "{reason:?}"
    );
    assert!(urgent);
}

#[test]
fn low_throughput_counts_only_when_configured() {
    let run = |limit: Option<u64>| {
        let mut config = PolicyConfig::default();
        config.warning.throughput = limit;
        let mut sim = Sim::new(config, vec![eth("eth0", 100), wifi("wlan0", 600)])
            .link("eth0", steady(5))
            .link("wlan0", steady(500))
            .start();
        sim.run_until(10.0);
        sim.engine
            .on_measurement("eth0", Sample::Throughput(50_000), sim.now);
        sim.run_until(11.0);
        sim.log
            .into_iter()
            .filter(|(_, d)| matches!(d, Decision::StartSearch { .. }))
            .map(|(_, d)| d)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(None), []);
    let starts = run(Some(100_000));
    assert!(
        matches!(
            starts[..],
            [Decision::StartSearch {
                reason: Reason::Warning(Trigger::Throughput {
                    rate: 50_000,
                    limit: 100_000
                })
            }]
        ),
        "{starts:?}"
    );
}

// ---- hysteresis and dwell against flapping ----

/// Switches over 10 minutes (start-up excluded) for a Wi-Fi link whose
/// round trip oscillates around the 300ms warning threshold (300 ± 30ms,
/// period 40s, ±10ms noise) next to a steady metered LTE link.
fn threshold_flaps(hysteresis: f64, min_dwell: Duration) -> usize {
    let mut config = PolicyConfig {
        hysteresis,
        min_dwell,
        ..PolicyConfig::default()
    };
    config
        .kinds
        .insert(Kind::Cellular, rule(|r| r.metered = Some(true)));
    let mut sim = Sim::new(config, vec![wifi("wlan0", 600), cell("wwan0", 700)])
        .link("wlan0", |t| {
            Some(Duration::from_secs_f64(
                (300.0 + 30.0 * (2.0 * std::f64::consts::PI * t / 40.0).sin() + 10.0 * noise(t, 1))
                    / 1e3,
            ))
        })
        .link("wwan0", |t| {
            Some(Duration::from_secs_f64((80.0 + 10.0 * noise(t, 2)) / 1e3))
        })
        .start();
    sim.run_until(600.0);
    sim.switches().len() - 1
}

/// Switches over 10 minutes (start-up excluded) between two unmetered links
/// of comparable quality: Ethernet at 40ms and Wi-Fi at 40 ± 20ms (period
/// 60s), whose scores (with the preference points of its lower rank) cross
/// again and again.
fn score_flaps(hysteresis: f64, min_gain: f64, min_dwell: Duration) -> usize {
    let config = PolicyConfig {
        hysteresis,
        min_gain,
        min_dwell,
        ..PolicyConfig::default()
    };
    let mut sim = Sim::new(config, vec![eth("eth0", 100), wifi("wlan0", 600)])
        .link("eth0", |t| {
            Some(Duration::from_secs_f64((40.0 + 2.0 * noise(t, 3)) / 1e3))
        })
        .link("wlan0", |t| {
            Some(Duration::from_secs_f64(
                (40.0 + 20.0 * (2.0 * std::f64::consts::PI * t / 60.0).sin() + 2.0 * noise(t, 4))
                    / 1e3,
            ))
        })
        .start();
    sim.run_until(600.0);
    sim.switches().len() - 1
}

#[test]
fn oscillating_link_does_not_flap() {
    let dwell = PolicyConfig::default().min_dwell;
    let threshold = [
        ("none", threshold_flaps(0.0, Duration::ZERO)),
        ("dwell only", threshold_flaps(0.0, dwell)),
        ("hysteresis only", threshold_flaps(0.15, Duration::ZERO)),
        ("defaults", threshold_flaps(0.15, dwell)),
    ];
    let score = [
        ("none", score_flaps(0.0, 0.0, Duration::ZERO)),
        ("dwell only", score_flaps(0.0, 0.0, dwell)),
        ("hysteresis only", score_flaps(0.15, 10.0, Duration::ZERO)),
        ("defaults", score_flaps(0.15, 10.0, dwell)),
    ];
    eprintln!(
        "switches in 10 minutes, link oscillating around the warning threshold: {threshold:?}"
    );
    eprintln!("switches in 10 minutes, two links with crossing scores: {score:?}");
    assert!(
        threshold[0].1 >= 20,
        "without protection the threshold case should flap: {threshold:?}"
    );
    assert!(threshold[1].1 <= threshold[0].1 / 2, "{threshold:?}");
    assert!(threshold[3].1 <= 1, "{threshold:?}");
    assert!(
        score[0].1 >= 10,
        "without protection the score case should flap: {score:?}"
    );
    assert!(score[3].1 == 0, "{score:?}");
}

#[test]
fn no_switch_back_before_min_dwell() {
    let run = |min_dwell: Duration| {
        let config = PolicyConfig {
            min_dwell,
            ..PolicyConfig::default()
        };
        let mut sim = Sim::new(config, vec![eth("eth0", 100), wifi("wlan0", 600)])
            .link("eth0", |t| {
                Some(ms(if (50.0..60.0).contains(&t) { 2000 } else { 5 }))
            })
            .link("wlan0", steady(30))
            .start();
        sim.run_until(200.0);
        sim.switches()
    };
    let sw = run(Duration::from_secs(30));
    assert_eq!(sw.len(), 3, "{sw:?}");
    let (away, back) = (&sw[1], &sw[2]);
    // Away at the warning already: wlan0 is good and the first dwell is over.
    assert_eq!((away.1.as_str(), away.3), ("wlan0", false));
    assert!(matches!(away.2, Reason::Warning(_)), "{:?}", away.2);
    assert_eq!((back.1.as_str(), back.3), ("eth0", false));
    assert!(matches!(back.2, Reason::Better { .. }), "{:?}", back.2);
    // The dwell counts from the end of the switch (200ms after the decision).
    let dwell_end = away.0 + 0.2 + 30.0;
    assert!(
        back.0 >= dwell_end,
        "back at {} before the dwell ended at {dwell_end}",
        back.0
    );
    assert!(
        back.0 <= dwell_end + 2.5,
        "back at {}, long after the dwell ended at {dwell_end}",
        back.0
    );

    // Without a dwell time the same timeline switches back as soon as eth0
    // is judged good again, well before.
    let sw0 = run(Duration::ZERO);
    assert_eq!(sw0.len(), 3, "{sw0:?}");
    assert!(sw0[2].0 < back.0 - 5.0, "{} vs {}", sw0[2].0, back.0);
}

// ---- manual mode ----

/// Manual mode on Wi-Fi at 120ms; a 5ms Ethernet cable is plugged in at 40s.
fn manual_upgrade() -> Sim {
    let config = PolicyConfig {
        mode: Mode::Manual,
        ..PolicyConfig::default()
    };
    let mut sim = Sim::new(config, vec![down(eth("eth0", 100)), wifi("wlan0", 600)])
        .link("eth0", steady(5))
        .link("wlan0", steady(120))
        .start();
    sim.run_until(40.0);
    sim.set_up("eth0", true);
    sim.run_until(60.0);
    sim
}

#[test]
fn manual_mode_waits_for_approval() {
    let mut sim = manual_upgrade();
    let proposals: Vec<_> = sim
        .log
        .iter()
        .filter(|(_, d)| matches!(d, Decision::Propose { .. }))
        .collect();
    assert_eq!(proposals.len(), 1, "{:?}", sim.log);
    assert!(
        matches!(proposals[0].1, Decision::Propose { ref to, reason: Reason::Better { .. }, .. } if to == "eth0")
    );
    sim.run_until(300.0);
    assert_eq!(sim.switches().len(), 1, "no switch without approval");
    assert_eq!(
        sim.count(|d| matches!(d, Decision::Propose { .. })),
        1,
        "proposed once, not at every search"
    );
    assert_eq!(sim.engine.proposal(), Some("eth0"));
    assert_eq!(sim.engine.current(), Some("wlan0"));

    assert_eq!(sim.engine.approve(sim.now), Ok("eth0".to_owned()));
    sim.drain();
    let sw = sim.switches();
    assert_eq!(sw.len(), 2);
    assert_eq!(
        (sw[1].1.as_str(), &sw[1].2, sw[1].3),
        ("eth0", &Reason::UserApproved, false)
    );
    sim.run_until(301.0);
    assert_eq!(sim.engine.current(), Some("eth0"));
    assert_eq!(sim.engine.approve(sim.now), Err(Refusal::NoProposal));
}

#[test]
fn decline_keeps_the_path_and_does_not_nag() {
    let mut sim = manual_upgrade();
    assert_eq!(sim.engine.decline(sim.now), Ok("eth0".to_owned()));
    let declined_at = sim.secs();
    sim.run_until(declined_at + 29.0);
    assert_eq!(sim.switches().len(), 1);
    assert!(
        sim.since(declined_at)
            .iter()
            .all(|d| !matches!(d, Decision::Propose { .. })),
        "{:?}",
        sim.log
    );
    assert_eq!(sim.engine.current(), Some("wlan0"));
    // After the dwell time the still-better link is proposed once more.
    sim.run_until(declined_at + 33.0);
    assert_eq!(
        sim.since(declined_at)
            .iter()
            .filter(|d| matches!(d, Decision::Propose { .. }))
            .count(),
        1
    );
    assert_eq!(sim.switches().len(), 1);
    assert_eq!(sim.engine.decline(sim.now), Ok("eth0".to_owned()));
    assert_eq!(sim.engine.decline(sim.now), Err(Refusal::NoProposal));
}

#[test]
fn proposal_is_withdrawn_when_no_longer_better() {
    let config = PolicyConfig {
        mode: Mode::Manual,
        ..PolicyConfig::default()
    };
    let mut sim = Sim::new(config, vec![eth("eth0", 100), wifi("wlan0", 600)])
        .link("eth0", steady(100))
        .link("wlan0", step(5, 100.0, 150))
        .start();
    sim.run_until(99.0);
    assert_eq!(sim.engine.proposal(), Some("wlan0"));
    sim.run_until(130.0);
    assert_eq!(sim.engine.proposal(), None);
    assert_eq!(
        sim.count(|d| matches!(d, Decision::ProposalWithdrawn { to } if to == "wlan0")),
        1
    );
    assert_eq!(sim.engine.approve(sim.now), Err(Refusal::NoProposal));
    assert_eq!(sim.switches().len(), 1);
}

#[test]
fn critical_overrides_manual_and_prefers_no_interaction() {
    let mut config = PolicyConfig {
        mode: Mode::Manual,
        ..PolicyConfig::default()
    };
    config.interfaces.insert(
        "hotspot0".into(),
        rule(|r| r.needs_user_interaction = Some(true)),
    );
    // hotspot0 has the best metric and the best round trip, but needs a
    // captive portal.
    let mut sim = Sim::new(
        config,
        vec![wifi("hotspot0", 50), wifi("wlan0", 600), cell("wwan0", 700)],
    )
    .link("hotspot0", steady(20))
    .link("wlan0", step(100, 60.0, 2000))
    .link("wwan0", steady(90))
    .start();
    // Start-up puts the interactive link last despite its metric.
    assert_eq!(sim.switches()[0].1, "wlan0");
    sim.run_until(59.0);
    // Only hotspot0 beats wlan0 by enough: it is proposed, never taken.
    assert_eq!(sim.engine.proposal(), Some("hotspot0"));
    assert_eq!(sim.switches().len(), 1);

    sim.run_until(80.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{:?}", sim.log);
    let (at, to, reason, urgent) = &sw[1];
    assert!((60.0..66.0).contains(at), "{at}");
    assert_eq!(to, "wwan0", "the link that connects without the user");
    assert!(urgent);
    assert!(matches!(reason, Reason::Critical(_)), "{reason:?}");
    assert_eq!(sim.engine.current(), Some("wwan0"));
    // Between warning and critical the proposal moved to the automatic
    // link, and nothing was approved.
    assert!(sim
        .log
        .iter()
        .any(|(_, d)| matches!(d, Decision::ProposalWithdrawn { to } if to == "hotspot0")));
    assert!(sim
        .log
        .iter()
        .any(|(_, d)| matches!(d, Decision::Propose { to, reason: Reason::Warning(_), .. } if to == "wwan0")));
}

// ---- cost, metered, never_use ----

#[test]
fn cheaper_wins_when_quality_is_comparable() {
    let run = |wlan1_rtt: u64| {
        let mut config = PolicyConfig::default();
        config
            .interfaces
            .insert("wlan0".into(), rule(|r| r.cost = Some(2.0)));
        let mut sim = Sim::new(config, vec![wifi("wlan0", 600), down(wifi("wlan1", 700))])
            .link("wlan0", steady(30))
            .link("wlan1", steady(wlan1_rtt))
            .start();
        sim.run_until(10.0);
        sim.set_up("wlan1", true);
        sim.run_until(120.0);
        sim.switches()
    };
    // 35ms at no cost against 30ms at cost 2: the cheaper link wins, once
    // the dwell time since start-up has passed.
    let sw = run(35);
    assert_eq!(sw.len(), 2, "{sw:?}");
    assert_eq!(sw[1].1, "wlan1");
    assert!(sw[1].0 >= 30.2, "{}", sw[1].0);
    assert!(matches!(sw[1].2, Reason::Better { from_score, to_score } if to_score < from_score));
    // Cost does not buy a much worse link.
    assert_eq!(run(200).len(), 1);
}

#[test]
fn metered_and_never_use_are_avoided() {
    let mut config = PolicyConfig::default();
    config
        .kinds
        .insert(Kind::Cellular, rule(|r| r.metered = Some(true)));
    config
        .interfaces
        .insert("eth0".into(), rule(|r| r.never_use = Some(true)));
    // The kernel prefers eth0, then wwan0; both are faster than wlan0.
    let mut sim = Sim::new(
        config,
        vec![eth("eth0", 50), cell("wwan0", 100), wifi("wlan0", 600)],
    )
    .link("eth0", steady(1))
    .link("wwan0", steady(30))
    .link("wlan0", move |t| {
        Some(ms(if (100.0..150.0).contains(&t) { 400 } else { 80 }))
    })
    .start();
    sim.run_until(99.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 1, "{sw:?}");
    assert_eq!(
        sw[0].1, "wlan0",
        "start-up skips never_use and tries unmetered first"
    );
    assert!(
        sim.probes.iter().all(|(_, p)| p != "eth0"),
        "never_use is not even probed"
    );

    // wlan0 degrades: the metered link is the way out...
    sim.run_until(149.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2, "{sw:?}");
    assert_eq!(sw[1].1, "wwan0");
    // ...and it is left as soon as wlan0 is good again and the dwell allows.
    sim.run_until(300.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 3, "{sw:?}");
    assert_eq!(
        (sw[2].1.as_str(), &sw[2].2),
        ("wlan0", &Reason::LeaveMetered)
    );
    assert!(sw.iter().all(|s| s.1 != "eth0"));

    assert_eq!(
        sim.engine.request_switch("eth0", sim.now),
        Err(Refusal::NeverUse("eth0".into()))
    );
    let status = sim.engine.interfaces(sim.now);
    let eth0 = status.iter().find(|s| s.name == "eth0").unwrap();
    assert!(!eth0.usable && eth0.attributes.never_use);
    let wwan0 = status.iter().find(|s| s.name == "wwan0").unwrap();
    assert!(wwan0.attributes.metered && wwan0.score.is_some());
}

// ---- user requests ----

#[test]
fn user_initiated_switch_is_honoured() {
    let mut sim = Sim::new(
        PolicyConfig::default(),
        vec![
            eth("eth0", 100),
            wifi("wlan0", 600),
            down(cell("wwan0", 700)),
        ],
    )
    .link("eth0", steady(5))
    .link("wlan0", step(60, 200.0, 500))
    .start();
    sim.run_until(5.0);
    assert_eq!(sim.engine.current(), Some("eth0"));
    assert_eq!(
        sim.engine.request_switch("wlan9", sim.now),
        Err(Refusal::UnknownInterface("wlan9".into()))
    );
    assert_eq!(
        sim.engine.request_switch("wwan0", sim.now),
        Err(Refusal::Unusable("wwan0".into()))
    );
    assert_eq!(
        sim.engine.request_switch("eth0", sim.now),
        Err(Refusal::AlreadyCurrent("eth0".into()))
    );

    // Honoured at once, within the dwell time and against the score.
    assert_eq!(sim.engine.request_switch("wlan0", sim.now), Ok(()));
    sim.drain();
    let sw = sim.switches();
    assert_eq!(
        (sw[1].1.as_str(), &sw[1].2, sw[1].3),
        ("wlan0", &Reason::UserRequest, false)
    );
    // The user's choice is not undone by the far better eth0...
    sim.run_until(199.0);
    assert_eq!(sim.switches().len(), 2, "{:?}", sim.log);
    assert_eq!(sim.engine.current(), Some("wlan0"));
    // ...until it degrades.
    sim.run_until(220.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 3, "{sw:?}");
    assert_eq!(sw[2].1, "eth0");
    assert!(matches!(sw[2].2, Reason::Warning(_)));
}

#[test]
fn user_request_works_in_every_mode_and_waits_for_a_switch_under_way() {
    for mode in [Mode::Auto, Mode::Manual, Mode::User] {
        let config = PolicyConfig {
            mode,
            ..PolicyConfig::default()
        };
        let mut sim = Sim::new(
            config,
            vec![eth("eth0", 100), wifi("wlan0", 600), cell("wwan0", 700)],
        )
        .link("eth0", steady(5))
        .link("wlan0", steady(40))
        .link("wwan0", steady(60))
        .start();
        // Asked while the start-up switch is under way: carried out after it.
        assert_eq!(sim.engine.switching(), Some("eth0"));
        assert_eq!(sim.engine.request_switch("wwan0", sim.now), Ok(()));
        sim.run_until(1.0);
        let sw = sim.switches();
        assert_eq!(
            sw.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
            ["eth0", "wwan0"],
            "{mode}"
        );
        assert_eq!(sim.engine.current(), Some("wwan0"));
        sim.engine.set_mode(Mode::Auto);
        assert_eq!(sim.engine.request_switch("wlan0", sim.now), Ok(()));
        sim.drain();
        sim.run_until(100.0);
        assert_eq!(sim.engine.current(), Some("wlan0"), "{mode}");
    }
}

// ---- single interface ----

#[test]
fn single_interface_reports_link_going_and_never_proposes() {
    for mode in [Mode::Auto, Mode::Manual] {
        let config = PolicyConfig {
            mode,
            ..PolicyConfig::default()
        };
        let mut sim = Sim::new(config, vec![wifi("wlan0", 600)])
            .link("wlan0", worsening())
            .start();
        sim.run_until(200.0);
        let going: Vec<&Reason> = sim
            .log
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::LinkGoing { reason } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(going.len(), 2, "{mode}: {:?}", sim.log);
        assert!(matches!(going[0], Reason::Warning(_)));
        assert!(matches!(going[1], Reason::Critical(_)));
        assert_eq!(sim.switches().len(), 1, "start-up only");
        assert_eq!(
            sim.count(|d| matches!(d, Decision::Propose { .. } | Decision::StartSearch { .. })),
            0
        );
        assert_eq!(
            sim.engine.request_switch("wlan0", sim.now),
            Err(Refusal::AlreadyCurrent("wlan0".into()))
        );

        // The link goes: reported, and there is nothing to switch to.
        sim.set_up("wlan0", false);
        let tail = sim.since(sim.secs());
        assert!(
            matches!(
                tail[..],
                [
                    Decision::LinkGoing {
                        reason: Reason::PathLost { .. }
                    },
                    Decision::NoPath { .. }
                ]
            ),
            "{tail:?}"
        );
        sim.run_until(300.0);
        assert_eq!(sim.switches().len(), 1);
        // It comes back: with no path at all, the agent reconnects.
        sim.set_up("wlan0", true);
        let sw = sim.switches();
        assert_eq!((sw[1].1.as_str(), sw[1].3), ("wlan0", true));
    }
}

// ---- start-up (seed Figure 20) and no path ----

#[test]
fn startup_tries_interfaces_in_order_of_preference() {
    // No attributes: the kernel's route metrics decide; no default route
    // last; down interfaces skipped.
    let mut no_route = wifi("wlan1", 0);
    no_route.route_metric = None;
    let mut sim = Sim::new(
        PolicyConfig::default(),
        vec![
            cell("wwan0", 700),
            no_route,
            down(eth("eth1", 10)),
            eth("eth0", 100),
            wifi("wlan0", 600),
        ],
    );
    sim.failing = vec![
        "eth0".into(),
        "wlan0".into(),
        "wwan0".into(),
        "wlan1".into(),
    ];
    let mut sim = sim.start();
    sim.run_until(1.0);
    let order: Vec<String> = sim.switches().into_iter().map(|s| s.1).collect();
    assert_eq!(order, ["eth0", "wlan0", "wwan0", "wlan1"]);
    assert!(sim
        .switches()
        .iter()
        .all(|s| s.2 == Reason::Startup && !s.3));
    assert!(matches!(
        sim.log.last(),
        Some((
            _,
            Decision::NoPath {
                reason: Reason::AllFailed
            }
        ))
    ));

    // It keeps trying, every search interval, from the top.
    sim.failing.clear();
    sim.run_until(4.0);
    let sw = sim.switches();
    assert_eq!(sw.len(), 5);
    assert_eq!(sw[4].1, "eth0");
    assert!((2.0..3.0).contains(&sw[4].0), "{}", sw[4].0);
    assert_eq!(sim.engine.current(), Some("eth0"));

    // User priorities rank before metrics; an interface that needs the user
    // comes last, a metered one after the unmetered.
    let mut config = PolicyConfig::default();
    config
        .interfaces
        .insert("wwan0".into(), rule(|r| r.priority = Some(1)));
    config.interfaces.insert(
        "eth0".into(),
        rule(|r| r.needs_user_interaction = Some(true)),
    );
    config
        .interfaces
        .insert("wlan0".into(), rule(|r| r.metered = Some(true)));
    let mut sim = Sim::new(
        config,
        vec![
            eth("eth0", 100),
            wifi("wlan0", 600),
            cell("wwan0", 700),
            wifi("wlan1", 800),
        ],
    );
    sim.failing = vec![
        "eth0".into(),
        "wlan0".into(),
        "wwan0".into(),
        "wlan1".into(),
    ];
    let mut sim = sim.start();
    sim.run_until(1.0);
    let order: Vec<String> = sim.switches().into_iter().map(|s| s.1).collect();
    assert_eq!(order, ["wwan0", "wlan1", "wlan0", "eth0"]);
}

#[test]
fn no_usable_interface_is_reported_once_and_retried() {
    let mut config = PolicyConfig::default();
    config
        .interfaces
        .insert("wwan0".into(), rule(|r| r.never_use = Some(true)));
    let mut no_addr = wifi("wlan0", 600);
    no_addr.has_address = false;
    let mut sim = Sim::new(
        config,
        vec![down(eth("eth0", 100)), no_addr, cell("wwan0", 700)],
    )
    .start();
    sim.run_until(60.0);
    assert_eq!(
        sim.count(|d| *d
            == Decision::NoPath {
                reason: Reason::NoUsableInterface
            }),
        1,
        "{:?}",
        sim.log
    );
    assert_eq!(sim.log.len(), 1);
    assert!(sim.engine.poll_timeout().is_some(), "keeps searching");
    assert_eq!(sim.engine.current(), None);

    sim.set_up("eth0", true);
    let sw = sim.switches();
    assert_eq!(sw.len(), 1);
    assert_eq!((sw[0].1.as_str(), &sw[0].2), ("eth0", &Reason::Startup));
    sim.run_until(61.0);
    assert_eq!(sim.engine.current(), Some("eth0"));
}

// ---- lost paths and suspension ----

#[test]
fn lost_path_switches_at_once() {
    let mut sim = Sim::new(
        PolicyConfig::default(),
        vec![eth("eth0", 100), wifi("wlan0", 600), cell("wwan0", 700)],
    )
    .link("eth0", steady(5))
    .link("wlan0", steady(500))
    .link("wwan0", steady(60))
    .start();
    sim.run_until(20.0);
    sim.set_up("eth0", false);
    let sw = sim.switches();
    assert_eq!(sw.len(), 2);
    // Measured good beats measured degraded, whatever the metric.
    assert_eq!(
        sw[1],
        (
            20.0,
            "wwan0".into(),
            Reason::PathLost {
                from: "eth0".into()
            },
            true
        )
    );
}

#[test]
fn activities_are_suspended_during_a_switch() {
    let t0 = Instant::now();
    let mut e = Engine::new(PolicyConfig::default());
    e.on_table(&[eth("eth0", 100), wifi("wlan0", 600)], t0);
    assert!(matches!(e.poll(), Some(Decision::Switch { ref to, .. }) if to == "eth0"));
    assert_eq!(e.poll_timeout(), None, "suspended from the decision on");
    e.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!((e.poll(), e.poll_probe()), (None, None));
    let t1 = t0 + ms(300);
    e.on_switch_finished("eth0", t1);
    assert_eq!(e.poll_timeout(), Some(t1 + ms(500)), "resumed: next check");
    e.handle_timeout(t1 + ms(500));
    assert_eq!(e.poll_probe().as_deref(), Some("eth0"));

    // A switch the driver starts on its own suspends them too.
    e.on_switch_started("wlan0", t1 + ms(600));
    assert_eq!(e.poll_timeout(), None);
    e.on_switch_failed("wlan0", t1 + ms(900));
    assert_eq!(e.current(), Some("eth0"));
    assert_eq!(e.poll_timeout(), Some(t1 + ms(1400)));
}

#[test]
fn absurd_periods_do_not_overflow() {
    let t0 = Instant::now();
    let config = PolicyConfig {
        check_interval: Duration::MAX,
        search_interval: Duration::MAX,
        window: Duration::MAX,
        min_dwell: Duration::MAX,
        ..PolicyConfig::default()
    };
    let mut e = Engine::new(config);
    e.on_table(&[eth("eth0", 100), wifi("wlan0", 600)], t0);
    while e.poll().is_some() {}
    e.on_switch_finished("eth0", t0);
    e.on_measurement("eth0", Sample::Stall(Duration::MAX), t0);
    e.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(e.poll_timeout(), None);
}

// ---- property: no panic, never a bad target ----

const NAMES: [&str; 4] = ["eth0", "wlan0", "wwan0", "hot0"];

#[derive(Debug, Clone)]
enum Op {
    /// Per name: present, up, has address, kind, metric.
    Table(Vec<(bool, bool, bool, u8, Option<u16>)>),
    Measure(usize, Sample),
    Advance(u16),
    Timeout,
    Started(usize),
    /// The switch under way ends (true: it worked), as a driver would.
    Complete(bool),
    Finished(usize),
    Failed(usize),
    Request(usize),
    Approve,
    Decline,
    Mode(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    // Mostly plausible round trips, so that interfaces are often judged
    // good and proposals and planned switches happen too.
    let sample = prop_oneof![
        12 => (0u64..250).prop_map(|v| Sample::Rtt(ms(v))),
        3 => (0u64..3000).prop_map(|v| Sample::Rtt(ms(v))),
        1 => Just(Sample::Lost),
        1 => (0u64..5000).prop_map(|v| Sample::Stall(ms(v))),
        1 => any::<u64>().prop_map(Sample::Throughput),
    ];
    let row = (
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.9),
        0u8..4,
        prop::option::of(0u16..1000),
    );
    prop_oneof![
        1 => prop::collection::vec(row, NAMES.len()).prop_map(Op::Table),
        16 => (name.clone(), sample).prop_map(|(i, s)| Op::Measure(i, s)),
        4 => (0u16..3000).prop_map(Op::Advance),
        1 => any::<u16>().prop_map(Op::Advance),
        8 => Just(Op::Timeout),
        1 => name.clone().prop_map(Op::Started),
        6 => prop::bool::weighted(0.8).prop_map(Op::Complete),
        1 => name.clone().prop_map(Op::Finished),
        1 => name.clone().prop_map(Op::Failed),
        1 => name.prop_map(Op::Request),
        1 => Just(Op::Approve),
        1 => Just(Op::Decline),
        1 => (0u8..3).prop_map(Op::Mode),
    ]
}

fn config() -> impl Strategy<Value = PolicyConfig> {
    config_with(1..2000, 1..5000)
}

/// Random attributes for [`NAMES`] and random settings, with check and
/// search intervals (ms) in the given ranges.
fn config_with(
    check: std::ops::Range<u64>,
    search: std::ops::Range<u64>,
) -> impl Strategy<Value = PolicyConfig> {
    let attrs = prop::collection::vec(
        (
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.25),
            prop::bool::weighted(0.3),
            prop::option::of(0.0f64..3.0),
            prop::option::of(0u32..5),
        ),
        NAMES.len(),
    );
    let dwell = prop_oneof![Just(0u64), 0u64..60_000];
    (
        attrs,
        0u8..3,
        check,
        search,
        0.0f64..0.5,
        dwell,
        1u32..5,
        1u64..60_000,
    )
        .prop_map(
            |(attrs, mode, check, search, hysteresis, dwell, min_samples, window)| {
                let mut c = PolicyConfig {
                    mode: [Mode::Auto, Mode::Manual, Mode::User][usize::from(mode)],
                    check_interval: ms(check),
                    search_interval: ms(search),
                    hysteresis,
                    min_dwell: ms(dwell),
                    min_samples,
                    window: ms(window),
                    ..PolicyConfig::default()
                };
                for (name, (never_use, interactive, metered, cost, priority)) in
                    NAMES.iter().zip(attrs)
                {
                    c.interfaces.insert(
                        (*name).into(),
                        InterfaceRule {
                            cost,
                            priority,
                            metered: Some(metered),
                            never_use: Some(never_use),
                            needs_user_interaction: Some(interactive),
                        },
                    );
                }
                c
            },
        )
}

/// A driver for paths (interface, gateway address): probes are answered
/// from `model(t, iface, addr)`, switches complete at once and the new
/// gateway address is handed back to the engine. Returns the switches:
/// (second, interface, address).
fn run_pairs(
    e: &mut Engine,
    t0: Instant,
    until: f64,
    at: &mut (String, String),
    addrs: &[&str],
    model: &dyn Fn(f64, &str, &str) -> Option<Duration>,
) -> Vec<(f64, String, Option<String>)> {
    let mut now = t0;
    let mut out = Vec::new();
    let end = t0 + Duration::from_secs_f64(until);
    loop {
        while let Some(d) = e.poll() {
            if let Decision::Switch { to, addr, .. } = d {
                assert!(
                    addr.is_some() || to != at.0,
                    "a switch to where the path already is"
                );
                e.on_switch_started(&to, now);
                e.on_switch_finished(&to, now);
                at.0 = to.clone();
                if let Some(a) = &addr {
                    at.1 = a.clone();
                }
                let others: Vec<String> = addrs
                    .iter()
                    .map(|a| a.to_string())
                    .filter(|a| *a != at.1)
                    .collect();
                e.on_targets(Some(&at.1), &others, now);
                out.push((now.saturating_duration_since(t0).as_secs_f64(), to, addr));
            }
        }
        let t = now.saturating_duration_since(t0).as_secs_f64();
        while let Some(iface) = e.poll_probe() {
            let s = model(t, &iface, &at.1).map_or(Sample::Lost, Sample::Rtt);
            e.on_path_measurement(&iface, &at.1.clone(), s, now);
        }
        while let Some((iface, addr)) = e.poll_far_probe() {
            let s = model(t, &iface, &addr).map_or(Sample::Lost, Sample::Rtt);
            e.on_path_measurement(&iface, &addr, s, now);
        }
        let Some(next) = e.poll_timeout().filter(|&n| n <= end) else {
            return out;
        };
        now = now.max(next);
        e.handle_timeout(now);
    }
}

#[test]
fn pairs_a_degraded_address_moves_the_address_and_a_degraded_interface_the_interface() {
    const A: &str = "192.0.2.1:7700";
    const B: &str = "198.51.100.1:7700";
    // A short dwell: the moves come at the warning threshold, on the first
    // evidence, not at the critical one.
    let mut e = Engine::new(PolicyConfig {
        min_dwell: ms(2000),
        ..PolicyConfig::default()
    });
    let t0 = Instant::now();
    let table = vec![
        Interface::usable("wlan0", Kind::Wifi, Some(100)),
        Interface::usable("wwan0", Kind::Cellular, Some(200)),
    ];
    e.on_table(&table, t0);
    let Some(Decision::Switch { to, addr: None, .. }) = e.poll() else {
        panic!("a start-up decision")
    };
    assert_eq!(to, "wlan0");
    e.on_switch_started(&to, t0);
    e.on_switch_finished(&to, t0);
    e.on_targets(Some(A), &[A.to_owned(), B.to_owned()], t0);
    let mut at = ("wlan0".to_owned(), A.to_owned());
    // From 20 s the path to A loses 40% of the probes on every interface;
    // from 60 s wlan0 loses 40% whatever the address.
    let model = |t: f64, iface: &str, addr: &str| {
        let lossy = (addr == A && (20.0..60.0).contains(&t)) || (iface == "wlan0" && t >= 60.0);
        // A hash of the instant, not a period: a periodic pattern would
        // alias with the probes' own periods.
        let mut z = ((t * 1000.0) as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        if lossy && (z ^ (z >> 31)) % 10 < 4 {
            return None;
        }
        Some(ms(if iface == "wlan0" { 20 } else { 45 }))
    };
    let sw = run_pairs(&mut e, t0, 20.0, &mut at, &[A, B], &model);
    assert!(
        sw.is_empty(),
        "nothing moves while every path is good: {sw:?}"
    );
    let paths = e.paths(t0 + ms(19_000));
    assert_eq!(paths.len(), 4, "two interfaces by two addresses: {paths:?}");
    assert!(paths.iter().all(|p| p.health == Health::Good), "{paths:?}");
    let sw = run_pairs(&mut e, t0, 60.0, &mut at, &[A, B], &model);
    assert_eq!(
        sw.iter()
            .map(|(_, i, a)| (i.as_str(), a.as_deref()))
            .collect::<Vec<_>>(),
        vec![("wlan0", Some(B))],
        "the address moves, the interface stays: {sw:?}"
    );
    assert!(
        sw[0].0 < 26.0,
        "within a few checks of the degradation: {sw:?}"
    );
    assert_eq!(e.target(), Some(B));
    let sw = run_pairs(&mut e, t0, 64.0, &mut at, &[A, B], &model);
    assert_eq!(
        sw.iter()
            .map(|(_, i, a)| (i.as_str(), a.as_deref()))
            .collect::<Vec<_>>(),
        vec![("wwan0", None)],
        "the interface moves, the address stays: {sw:?}"
    );
}

#[test]
fn without_other_addresses_nothing_is_probed_but_interfaces() {
    let mut e = Engine::new(PolicyConfig::default());
    let t0 = Instant::now();
    e.on_table(&[Interface::usable("eth0", Kind::Ethernet, Some(100))], t0);
    let Some(Decision::Switch { to, .. }) = e.poll() else {
        panic!("a start-up decision")
    };
    e.on_switch_started(&to, t0);
    e.on_switch_finished(&to, t0);
    e.on_targets(Some("192.0.2.1:7700"), &["192.0.2.1:7700".to_owned()], t0);
    assert_eq!(e.paths(t0).len(), 1);
    e.handle_timeout(t0 + ms(60_000));
    assert_eq!(e.poll_far_probe(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_nor_targets_a_bad_interface(config in config(), ops in prop::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut e = Engine::new(config.clone());
        let mut table: Vec<Interface> = Vec::new();
        for op in ops {
            match op {
                Op::Table(rows) => {
                    table = NAMES
                        .iter()
                        .zip(rows)
                        .filter(|(_, r)| r.0)
                        .map(|(n, (_, up, has_address, kind, metric))| Interface {
                            name: (*n).into(),
                            kind: [Kind::Ethernet, Kind::Wifi, Kind::Cellular, Kind::Other][usize::from(kind)],
                            up,
                            has_address,
                            route_metric: metric.map(u32::from),
                        })
                        .collect();
                    e.on_table(&table, now);
                }
                Op::Measure(i, s) => e.on_measurement(NAMES[i], s, now),
                Op::Advance(d) => now += ms(u64::from(d)),
                Op::Timeout => {
                    if let Some(t) = e.poll_timeout() {
                        now = now.max(t);
                        e.handle_timeout(now);
                        if let Some(next) = e.poll_timeout() {
                            prop_assert!(next > now, "timer did not advance: {next:?} <= {now:?}");
                        }
                    }
                }
                Op::Started(i) => e.on_switch_started(NAMES[i], now),
                Op::Complete(ok) => {
                    if let Some(to) = e.switching().map(str::to_owned) {
                        if ok { e.on_switch_finished(&to, now) } else { e.on_switch_failed(&to, now) }
                    }
                }
                Op::Finished(i) => e.on_switch_finished(NAMES[i], now),
                Op::Failed(i) => e.on_switch_failed(NAMES[i], now),
                Op::Request(i) => { let _ = e.request_switch(NAMES[i], now); }
                Op::Approve => { let _ = e.approve(now); }
                Op::Decline => { let _ = e.decline(now); }
                Op::Mode(m) => e.set_mode([Mode::Auto, Mode::Manual, Mode::User][usize::from(m)]),
            }
            let single = table.iter().filter(|i| !config.attributes(&i.name, i.kind).never_use).count() <= 1;
            while let Some(d) = e.poll() {
                let to = match &d {
                    Decision::Switch { to, .. } => {
                        prop_assert_eq!(e.switching(), Some(to.as_str()));
                        prop_assert!(!single || e.current().is_none(), "single interface switched away: {:?}", d);
                        to
                    }
                    Decision::Propose { to, .. } => {
                        prop_assert!(!single, "single interface proposed: {:?}", d);
                        prop_assert_eq!(e.proposal(), Some(to.as_str()));
                        to
                    }
                    _ => continue,
                };
                let iface = table.iter().find(|i| &i.name == to);
                prop_assert!(iface.is_some_and(|i| i.up && i.has_address), "{:?} targets an absent or down interface in {:?}", d, table);
                let kind = iface.map_or(Kind::Other, |i| i.kind);
                prop_assert!(!config.attributes(to, kind).never_use, "{:?} targets a never_use interface", d);
                prop_assert_ne!(e.current(), Some(to.as_str()), "{:?} targets the current interface", d);
            }
            while e.poll_probe().is_some() {}
        }
        let _ = e.interfaces(now);
    }
}

/// A user or kernel event during a random timeline.
#[derive(Debug, Clone)]
enum Event {
    Toggle(usize),
    Request(usize),
    Approve,
    Decline,
    Mode(u8),
}

/// Round trip (ms) and loss of a link for 20s: mostly healthy, sometimes
/// not.
fn segment() -> impl Strategy<Value = (u64, f64)> {
    let rtt = prop_oneof![3 => 1u64..250, 1 => 1u64..1500];
    let loss = prop_oneof![4 => Just(0.0), 1 => 0.0f64..0.3];
    (rtt, loss)
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (0..NAMES.len()).prop_map(Event::Toggle),
        2 => (0..NAMES.len()).prop_map(Event::Request),
        2 => Just(Event::Approve),
        1 => Just(Event::Decline),
        1 => (0u8..3).prop_map(Event::Mode),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Ten minutes of links whose round trip and loss change every 20s at
    /// random, with interfaces going down and up and the user stepping in;
    /// [`Sim`] checks every decision's target.
    #[test]
    fn random_timelines_keep_the_invariants(
        config in config_with(100..2000, 500..5000),
        links in prop::collection::vec(prop::collection::vec(segment(), 30), NAMES.len()),
        mut events in prop::collection::vec((0u64..600_000, event()), 0..40),
    ) {
        let kinds = [Kind::Ethernet, Kind::Wifi, Kind::Cellular, Kind::Wifi];
        let table = NAMES.iter().zip(kinds).enumerate().map(|(i, (n, k))| Interface::usable(*n, k, Some(100 * i as u32 + 100))).collect();
        let mut sim = Sim::new(config, table);
        for (i, segments) in links.into_iter().enumerate() {
            sim = sim.link(NAMES[i], move |t| {
                let (rtt, loss) = segments[((t / 20.0) as usize).min(segments.len() - 1)];
                ((noise(t, i as u64) + 1.0) / 2.0 >= loss).then_some(ms(rtt))
            });
        }
        let mut sim = sim.start();
        events.sort_by_key(|e| e.0);
        for (at, ev) in events {
            sim.run_until(at as f64 / 1e3);
            let now = sim.now;
            match ev {
                Event::Toggle(i) => {
                    let up = sim.table.iter().any(|x| x.name == NAMES[i] && x.up);
                    sim.set_up(NAMES[i], !up);
                }
                Event::Request(i) => { let _ = sim.engine.request_switch(NAMES[i], now); }
                Event::Approve => { let _ = sim.engine.approve(now); }
                Event::Decline => { let _ = sim.engine.decline(now); }
                Event::Mode(m) => sim.engine.set_mode([Mode::Auto, Mode::Manual, Mode::User][usize::from(m)]),
            }
            sim.drain();
        }
        sim.run_until(600.0);
    }
}
