//! The decision engine: the seed's "decision task" with its Check and
//! Search activities, as a state machine fed with the interface table,
//! measurements, user commands and `now`.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Attributes, Kind, Mode, PolicyConfig};
use crate::table::{Interface, Sample, Stats, Window};

/// What the engine asks of the driver, or tells the user. Drained with
/// [`Engine::poll`].
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Decision {
    /// Move the session to interface `to` now. The engine counts the switch
    /// as under way from this moment (both activities are suspended) until
    /// the driver calls [`Engine::on_switch_finished`] or
    /// [`Engine::on_switch_failed`]; a driver that will not act must call
    /// the latter. With no current path this is the start-up search of seed
    /// Figure 20: the driver connects through `to`.
    Switch {
        /// Interface to switch to.
        to: String,
        /// Why.
        reason: Reason,
        /// The current path is lost or past a critical threshold: switch
        /// even if the old path cannot be drained, and tell the user.
        urgent: bool,
    },
    /// Manual mode: a better path exists; ask the user, then call
    /// [`Engine::approve`] or [`Engine::decline`]. A new proposal replaces
    /// the previous one.
    Propose {
        /// Interface proposed.
        to: String,
        /// Why it is better.
        reason: Reason,
    },
    /// The pending proposal no longer stands: its interface went away or is
    /// no longer better, the mode changed, or the path moved anyway.
    ProposalWithdrawn {
        /// Interface that was proposed.
        to: String,
    },
    /// Tell the user that the current path is degraded and the engine will
    /// not move it now: in `user` mode, or because there is nowhere to go
    /// (`no_alternative`: the seed's "the current network connection will
    /// no longer be available"). Said once per degradation.
    Warn {
        /// The threshold crossed.
        reason: Reason,
        /// No other interface can take over.
        no_alternative: bool,
    },
    /// Single-interface device: its only link is failing or gone. No switch
    /// is possible; the user decides what to do. Said once per level.
    LinkGoing {
        /// The threshold crossed, or the loss.
        reason: Reason,
    },
    /// The current path crossed a warning threshold: the other interfaces
    /// are being probed now, at every check instead of every search.
    StartSearch {
        /// The threshold crossed.
        reason: Reason,
    },
    /// The current path is back below every warning threshold.
    Recovered,
    /// No interface can carry a path now. The engine keeps trying every
    /// search interval and as the interface table changes.
    NoPath {
        /// [`Reason::NoUsableInterface`] or [`Reason::AllFailed`].
        reason: Reason,
    },
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Switch { to, reason, urgent: true } => write!(f, "switch to {to} now: {reason}"),
            Decision::Switch { to, reason, urgent: false } => write!(f, "switch to {to}: {reason}"),
            Decision::Propose { to, reason } => write!(f, "propose {to}: {reason}"),
            Decision::ProposalWithdrawn { to } => write!(f, "proposal of {to} withdrawn"),
            Decision::Warn { reason, no_alternative: true } => {
                write!(f, "{reason}; no other interface: the connection may soon be unavailable")
            }
            Decision::Warn { reason, no_alternative: false } => write!(f, "{reason}"),
            Decision::LinkGoing { reason } => write!(f, "the only link is going: {reason}"),
            Decision::StartSearch { reason } => write!(f, "{reason}; searching for another path"),
            Decision::Recovered => f.write_str("current path recovered"),
            Decision::NoPath { reason } => write!(f, "no path: {reason}"),
        }
    }
}

/// Why a decision was made.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// No path yet: the first usable interface in order of preference (seed
    /// Figure 20).
    Startup,
    /// The current interface went down or lost its address.
    PathLost {
        /// The interface that carried the path.
        from: String,
    },
    /// The current path crossed a warning threshold.
    Warning(Trigger),
    /// The current path crossed a critical threshold.
    Critical(Trigger),
    /// Another interface scores better by more than the hysteresis.
    Better {
        /// Score of the current interface (lower is better).
        from_score: f64,
        /// Score of the chosen one.
        to_score: f64,
    },
    /// Back from a metered interface to an unmetered one that is good again.
    LeaveMetered,
    /// The user asked for this interface.
    UserRequest,
    /// The user approved the engine's proposal.
    UserApproved,
    /// No interface is up with an address (or all are `never_use`).
    NoUsableInterface,
    /// Every usable interface failed to connect lately.
    AllFailed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Startup => f.write_str("start-up, first usable interface in order of preference"),
            Reason::PathLost { from } => write!(f, "path through {from} lost"),
            Reason::Warning(t) => write!(f, "warning: {t}"),
            Reason::Critical(t) => write!(f, "critical: {t}"),
            Reason::Better { from_score, to_score } => {
                write!(f, "better path (score {to_score:.0} against {from_score:.0})")
            }
            Reason::LeaveMetered => f.write_str("an unmetered path is good again"),
            Reason::UserRequest => f.write_str("requested by the user"),
            Reason::UserApproved => f.write_str("approved by the user"),
            Reason::NoUsableInterface => f.write_str("no interface is up with an address"),
            Reason::AllFailed => f.write_str("every usable interface failed to connect; retrying"),
        }
    }
}

/// The measurement that crossed a threshold, with the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// Mean round trip.
    Rtt {
        /// Measured.
        rtt: Duration,
        /// Limit.
        limit: Duration,
    },
    /// Fraction of probes lost.
    Loss {
        /// Measured.
        loss: f64,
        /// Limit.
        limit: f64,
    },
    /// Mean round-trip variation.
    Jitter {
        /// Measured.
        jitter: Duration,
        /// Limit.
        limit: Duration,
    },
    /// Time without progress on the current path.
    Stall {
        /// Measured.
        stalled: Duration,
        /// Limit.
        limit: Duration,
    },
    /// Bytes per second while busy (lower is worse).
    Throughput {
        /// Measured.
        rate: u64,
        /// Limit.
        limit: u64,
    },
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Trigger::Rtt { rtt, limit } => write!(f, "round trip {:.0}ms, limit {:.0}ms", ms(rtt), ms(limit)),
            Trigger::Loss { loss, limit } => write!(f, "loss {:.1}%, limit {:.1}%", loss * 100.0, limit * 100.0),
            Trigger::Jitter { jitter, limit } => write!(f, "jitter {:.0}ms, limit {:.0}ms", ms(jitter), ms(limit)),
            Trigger::Stall { stalled, limit } => write!(f, "stalled {:.0}ms, limit {:.0}ms", ms(stalled), ms(limit)),
            Trigger::Throughput { rate, limit } => write!(f, "throughput {rate}B/s, limit {limit}B/s"),
        }
    }
}

/// How an interface fares against the thresholds. Ordered from no evidence
/// to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Too few probes in the window to judge.
    Unknown,
    /// Below every warning threshold.
    Good,
    /// Past a warning threshold.
    Warning,
    /// Past a critical threshold.
    Critical,
}

/// Why a user command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The name is not in the interface table (typo, or the device was
    /// removed).
    #[error("no interface {0:?}")]
    UnknownInterface(String),
    /// The interface is down or has no address, so no path can use it.
    #[error("{0} is down or has no address")]
    Unusable(String),
    /// The configuration forbids the interface (`never_use = true`).
    #[error("{0} is configured never_use")]
    NeverUse(String),
    /// The path already uses it.
    #[error("already on {0}")]
    AlreadyCurrent(String),
    /// Approve or decline without a pending proposal (it may have been
    /// withdrawn meanwhile).
    #[error("no switch is proposed")]
    NoProposal,
}

/// One row of [`Engine::interfaces`], for `baton status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IfaceStatus {
    /// Interface name.
    pub name: String,
    /// Link kind.
    pub kind: Kind,
    /// Up.
    pub up: bool,
    /// Has an address.
    pub has_address: bool,
    /// Kernel default-route metric.
    pub route_metric: Option<u32>,
    /// Attributes from the configuration.
    pub attributes: Attributes,
    /// Could carry a path now (up, addressed, not `never_use`).
    pub usable: bool,
    /// Carries the current path.
    pub current: bool,
    /// Against the thresholds, as last judged.
    pub health: Health,
    /// Probe results over the window.
    pub stats: Stats,
    /// Score (lower is better); `None` until enough probes are answered.
    pub score: Option<f64>,
}

#[derive(Debug)]
struct Entry {
    iface: Interface,
    attrs: Attributes,
    window: Window,
    /// Kept between judgements: the hysteresis depends on the level held.
    health: Health,
    stall: Option<(Duration, Instant)>,
    throughput: Option<(u64, Instant)>,
    /// Last failed switch to it: it is skipped for a while, so that the
    /// engine tries the next interface instead of the same one forever.
    failed_at: Option<Instant>,
}

impl Entry {
    fn new(iface: Interface, attrs: Attributes) -> Self {
        Self {
            iface,
            attrs,
            window: Window::default(),
            health: Health::Unknown,
            stall: None,
            throughput: None,
            failed_at: None,
        }
    }

    fn usable(&self) -> bool {
        self.iface.up && self.iface.has_address && !self.attrs.never_use
    }

    fn stalled(&self, now: Instant) -> Duration {
        match self.stall {
            Some((d, at)) if !d.is_zero() => d.saturating_add(now.saturating_duration_since(at)),
            _ => Duration::ZERO,
        }
    }

    fn failed_within(&self, now: Instant, span: Duration) -> bool {
        self.failed_at.is_some_and(|t| now.saturating_duration_since(t) < span)
    }
}

/// `None` (never) rather than a panic when a configured period is absurdly
/// long.
fn after(now: Instant, d: Duration) -> Option<Instant> {
    now.checked_add(d)
}

/// The level of a metric where higher is worse. Entering a level needs the
/// limit; staying needs only `1 - h` of it, so that a value hovering at a
/// limit does not flip the level at every check. The level held is the
/// interface's overall one, so leaving a level needs every metric clear of
/// the band.
fn judge_high(v: f64, warn: Option<f64>, crit: Option<f64>, prev: Health, h: f64) -> Option<Health> {
    if crit.is_some_and(|c| v >= c || (prev == Health::Critical && v >= c * (1.0 - h))) {
        return Some(Health::Critical);
    }
    if warn.is_some_and(|w| v >= w || (prev >= Health::Warning && v >= w * (1.0 - h))) {
        return Some(Health::Warning);
    }
    None
}

/// As [`judge_high`] for a metric where lower is worse (throughput).
fn judge_low(v: f64, warn: Option<f64>, crit: Option<f64>, prev: Health, h: f64) -> Option<Health> {
    if crit.is_some_and(|c| v <= c || (prev == Health::Critical && v <= c * (1.0 + h))) {
        return Some(Health::Critical);
    }
    if warn.is_some_and(|w| v <= w || (prev >= Health::Warning && v <= w * (1.0 + h))) {
        return Some(Health::Warning);
    }
    None
}

/// Judges an interface against the thresholds. Stalls and throughput are
/// only known for the path in use.
fn assess(cfg: &PolicyConfig, e: &Entry, now: Instant, current: bool) -> (Health, Option<Trigger>) {
    let (w, c, h, prev) = (&cfg.warning, &cfg.critical, cfg.hysteresis, e.health);
    let stats = e.window.stats(now, cfg.window);
    let judged = stats.samples >= cfg.min_samples;
    let mut health = if judged { Health::Good } else { Health::Unknown };
    let mut trigger = None;
    let mut consider = |level: Option<Health>, t: &dyn Fn(Health) -> Trigger| {
        if let Some(level) = level {
            if level > health.max(Health::Good) {
                health = level;
                trigger = Some(t(level));
            }
        }
    };
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let pick = |level: Health, w: Option<Duration>, c: Option<Duration>| {
        if level == Health::Critical { c } else { w }.unwrap_or_default()
    };
    if current {
        let stalled = e.stalled(now);
        if !stalled.is_zero() {
            consider(judge_high(stalled.as_secs_f64(), secs(w.stall), secs(c.stall), prev, h), &|l| Trigger::Stall {
                stalled,
                limit: pick(l, w.stall, c.stall),
            });
        }
    }
    if judged {
        if let Some(loss) = stats.loss {
            consider(judge_high(loss, w.loss, c.loss, prev, h), &|l| Trigger::Loss {
                loss,
                limit: if l == Health::Critical { c.loss } else { w.loss }.unwrap_or_default(),
            });
        }
        if let Some(rtt) = stats.rtt {
            consider(judge_high(rtt.as_secs_f64(), secs(w.rtt), secs(c.rtt), prev, h), &|l| Trigger::Rtt {
                rtt,
                limit: pick(l, w.rtt, c.rtt),
            });
        }
        if let Some(jitter) = stats.jitter {
            consider(judge_high(jitter.as_secs_f64(), secs(w.jitter), secs(c.jitter), prev, h), &|l| Trigger::Jitter {
                jitter,
                limit: pick(l, w.jitter, c.jitter),
            });
        }
    }
    if current {
        if let Some((rate, at)) = e.throughput {
            if now.saturating_duration_since(at) < cfg.window {
                let f = |v: Option<u64>| v.map(|v| v as f64);
                consider(judge_low(rate as f64, f(w.throughput), f(c.throughput), prev, h), &|l| Trigger::Throughput {
                    rate,
                    limit: if l == Health::Critical { c.throughput } else { w.throughput }.unwrap_or_default(),
                });
            }
        }
    }
    (health, trigger)
}

fn level_reason(health: Health, trigger: Option<Trigger>) -> Option<Reason> {
    match (health, trigger) {
        (Health::Critical, Some(t)) => Some(Reason::Critical(t)),
        (Health::Warning, Some(t)) => Some(Reason::Warning(t)),
        _ => None,
    }
}

/// Order of preference: the user's priority, then the kernel's route metric
/// (so that without attributes the engine agrees with the routing table),
/// then the name for a stable order.
fn preference(a: &Entry, b: &Entry) -> Ordering {
    let key = |e: &Entry| {
        (e.attrs.priority.is_none(), e.attrs.priority, e.iface.route_metric.is_none(), e.iface.route_metric)
    };
    key(a).cmp(&key(b)).then_with(|| a.iface.name.cmp(&b.iface.name))
}

/// Order in which to try interfaces with no measurements (seed Figure 20):
/// those that connect without the user first, then by priority, unmetered
/// before metered, cheaper first, then the route metric.
fn connect_order(a: &Entry, b: &Entry) -> Ordering {
    let (x, y) = (&a.attrs, &b.attrs);
    (x.needs_user_interaction, x.priority.is_none(), x.priority, x.metered)
        .cmp(&(y.needs_user_interaction, y.priority.is_none(), y.priority, y.metered))
        .then_with(|| x.cost.total_cmp(&y.cost))
        .then_with(|| preference(a, b))
}

/// The decision engine of one client agent.
///
/// It opens no socket and reads no clock. The driver feeds it:
/// - the kernel's interface table, whenever it changes ([`Engine::on_table`]);
/// - probe results and the current path's stalls and throughput
///   ([`Engine::on_measurement`]);
/// - switches, whoever started them ([`Engine::on_switch_started`],
///   [`Engine::on_switch_finished`], [`Engine::on_switch_failed`]): the
///   driver also switches on its own when a leg dies;
/// - user commands ([`Engine::request_switch`], [`Engine::approve`],
///   [`Engine::decline`], [`Engine::set_mode`]);
/// - timer expiries ([`Engine::handle_timeout`]).
///
/// After each of these calls the driver must, in this order:
/// 1. drain [`Engine::poll`] and act on every [`Decision`];
/// 2. drain [`Engine::poll_probe`] and send a probe to the gateway bound to
///    each interface named, reporting the result with
///    [`Engine::on_measurement`] (answers may come later; that is fine);
/// 3. call [`Engine::poll_timeout`] and arrange to call
///    [`Engine::handle_timeout`] at that instant (none while a switch is
///    under way: both activities are suspended until it ends).
///
/// The Check Activity runs every `check_interval`: it probes the current
/// path and judges it against the warning and critical thresholds. The
/// Search Activity runs every `search_interval` (every check while the
/// path is degraded): it probes the other interfaces and decides whether
/// to move. Decisions are made only on these ticks and on table changes,
/// never on a single measurement, so that one late probe cannot cause a
/// switch.
#[derive(Debug)]
pub struct Engine {
    config: PolicyConfig,
    mode: Mode,
    entries: Vec<Entry>,
    current: Option<String>,
    switching: Option<String>,
    /// A path existed once: connecting again is a recovery (urgent).
    connected_once: bool,
    lost_from: Option<String>,
    switched_at: Option<Instant>,
    /// The user chose the current path: no automatic improvement moves it
    /// while it stays good.
    pinned: bool,
    pin_next: Option<String>,
    /// A user request made during a switch, carried out after it.
    queued_request: Option<String>,
    /// The current path is degraded and the alternatives are being probed.
    searching: bool,
    /// Worst level of the current path already told to the user.
    told: Health,
    trigger: Option<Trigger>,
    proposal: Option<String>,
    declined: Option<(String, Instant)>,
    no_path_told: bool,
    next_check: Option<Instant>,
    next_search: Option<Instant>,
    decisions: VecDeque<Decision>,
    probes: VecDeque<String>,
}

impl Engine {
    /// An engine with no interfaces and no path. Nothing happens until the
    /// first [`Engine::on_table`].
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            mode: config.mode,
            config,
            entries: Vec::new(),
            current: None,
            switching: None,
            connected_once: false,
            lost_from: None,
            switched_at: None,
            pinned: false,
            pin_next: None,
            queued_request: None,
            searching: false,
            told: Health::Good,
            trigger: None,
            proposal: None,
            declined: None,
            no_path_told: false,
            next_check: None,
            next_search: None,
            decisions: VecDeque::new(),
            probes: VecDeque::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Interface of the current path, if there is one.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Interface a switch under way is going to.
    pub fn switching(&self) -> Option<&str> {
        self.switching.as_deref()
    }

    /// Interface proposed to the user and not yet answered.
    pub fn proposal(&self) -> Option<&str> {
        self.proposal.as_deref()
    }

    /// Every interface of the table with its attributes, health and
    /// measurements.
    pub fn interfaces(&self, now: Instant) -> Vec<IfaceStatus> {
        (0..self.entries.len())
            .map(|i| {
                let e = &self.entries[i];
                IfaceStatus {
                    name: e.iface.name.clone(),
                    kind: e.iface.kind,
                    up: e.iface.up,
                    has_address: e.iface.has_address,
                    route_metric: e.iface.route_metric,
                    attributes: e.attrs,
                    usable: e.usable(),
                    current: self.current.as_deref() == Some(e.iface.name.as_str()),
                    health: e.health,
                    stats: e.window.stats(now, self.config.window),
                    score: self.score(i, now),
                }
            })
            .collect()
    }

    /// The next decision, or `None` when there is nothing more to do now.
    #[must_use]
    pub fn poll(&mut self) -> Option<Decision> {
        self.decisions.pop_front()
    }

    /// The next interface to probe, or `None`.
    #[must_use]
    pub fn poll_probe(&mut self) -> Option<String> {
        self.probes.pop_front()
    }

    /// When to call [`Engine::handle_timeout`]; `None` while a switch is
    /// under way or before the first table.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.switching.is_some() {
            return None;
        }
        match (self.next_check, self.next_search) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the activities that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.switching.is_some() {
            return;
        }
        if self.next_check.is_some_and(|t| now >= t) {
            self.next_check = after(now, self.config.check_interval);
            self.check(now);
        }
        if self.switching.is_none() && self.next_search.is_some_and(|t| now >= t) {
            self.next_search = after(now, self.config.search_interval);
            self.search(now);
        }
    }

    /// The kernel's interface table changed; `table` is all of it. An
    /// interface missing from it is gone, with its measurements. The
    /// current path is lost at once if its interface is down, unaddressed
    /// or gone; with no path the engine tries to get one.
    pub fn on_table(&mut self, table: &[Interface], now: Instant) {
        let mut old = std::mem::take(&mut self.entries);
        for iface in table {
            if self.entries.iter().any(|e| e.iface.name == iface.name) {
                continue;
            }
            let attrs = self.config.attributes(&iface.name, iface.kind);
            let entry = match old.iter().position(|e| e.iface.name == iface.name) {
                Some(i) => {
                    let mut e = old.swap_remove(i);
                    e.iface = iface.clone();
                    e.attrs = attrs;
                    e
                }
                None => Entry::new(iface.clone(), attrs),
            };
            self.entries.push(entry);
        }
        if let Some(p) = self.proposal.clone() {
            if !self.is_usable(&p) {
                self.withdraw();
            }
        }
        if self.switching.is_none() && self.next_search.is_none() {
            self.next_search = after(now, self.config.search_interval);
        }
        match self.current.clone() {
            Some(cur) if !self.is_usable(&cur) => self.lose_current(now),
            Some(_) => {}
            None if self.switching.is_none() => self.connect(now),
            None => {}
        }
    }

    /// A measurement of interface `iface` taken at `now`. Measurements of
    /// interfaces not in the table are ignored.
    pub fn on_measurement(&mut self, iface: &str, sample: Sample, now: Instant) {
        let span = self.config.window;
        let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == iface) else { return };
        match sample {
            Sample::Rtt(rtt) => e.window.push(now, Some(rtt), span),
            Sample::Lost => e.window.push(now, None, span),
            Sample::Stall(d) => e.stall = Some((d, now)),
            Sample::Throughput(rate) => e.throughput = Some((rate, now)),
        }
    }

    /// A switch to `to` began, decided here or by the driver (a leg died).
    /// Both activities are suspended until it ends.
    pub fn on_switch_started(&mut self, to: &str, _now: Instant) {
        if self.proposal.as_deref().is_some_and(|p| p != to) {
            self.withdraw();
        }
        self.proposal = None;
        self.switching = Some(to.to_owned());
        self.next_check = None;
        self.next_search = None;
    }

    /// The path now runs through `to`. The activities resume, and the dwell
    /// time starts.
    pub fn on_switch_finished(&mut self, to: &str, now: Instant) {
        self.switching = None;
        self.current = Some(to.to_owned());
        self.connected_once = true;
        self.lost_from = None;
        self.switched_at = Some(now);
        self.reset_path_state();
        self.pinned = self.pin_next.take().as_deref() == Some(to);
        self.no_path_told = false;
        if let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == to) {
            // Stalls and throughput belonged to the old path.
            e.stall = None;
            e.throughput = None;
            e.failed_at = None;
        }
        self.resume(now);
        if !self.is_usable(to) {
            self.lose_current(now);
            return;
        }
        self.run_queued_request();
    }

    /// The switch to `to` failed or was not attempted; the old path, if any,
    /// is still in use. `to` is skipped for a while (a search interval when
    /// there is no path, the dwell time otherwise) and the next interface in
    /// order is tried when there is no path.
    pub fn on_switch_failed(&mut self, to: &str, now: Instant) {
        self.switching = None;
        self.pin_next = None;
        if let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == to) {
            e.failed_at = Some(now);
        }
        self.resume(now);
        match self.current.clone() {
            Some(cur) if !self.is_usable(&cur) => self.lose_current(now),
            Some(_) => self.run_queued_request(),
            None => {
                self.queued_request = None;
                self.connect(now);
            }
        }
    }

    /// The user asks for interface `to` (`baton switch wlan0`). Honoured in
    /// every mode, whatever the scores, if `to` is usable; during a switch
    /// it is carried out when that one ends. The chosen path then stays
    /// until it degrades: automatic improvements do not undo the user's
    /// choice.
    pub fn request_switch(&mut self, to: &str, _now: Instant) -> Result<(), Refusal> {
        let e =
            self.entries.iter().find(|e| e.iface.name == to).ok_or_else(|| Refusal::UnknownInterface(to.to_owned()))?;
        if e.attrs.never_use {
            return Err(Refusal::NeverUse(to.to_owned()));
        }
        if !e.usable() {
            return Err(Refusal::Unusable(to.to_owned()));
        }
        if let Some(going) = self.switching.as_deref() {
            if going == to {
                self.pin_next = Some(to.to_owned());
                self.queued_request = None;
            } else {
                self.queued_request = Some(to.to_owned());
            }
            return Ok(());
        }
        if self.current.as_deref() == Some(to) {
            return Err(Refusal::AlreadyCurrent(to.to_owned()));
        }
        self.pin_next = Some(to.to_owned());
        self.emit_switch(to.to_owned(), Reason::UserRequest, false);
        Ok(())
    }

    /// The user approves the pending proposal: the switch is decided.
    /// Returns the interface.
    pub fn approve(&mut self, _now: Instant) -> Result<String, Refusal> {
        let to = self.proposal.take().ok_or(Refusal::NoProposal)?;
        if !self.is_usable(&to) {
            return Err(Refusal::Unusable(to));
        }
        if self.current.as_deref() == Some(to.as_str()) {
            return Err(Refusal::AlreadyCurrent(to));
        }
        self.emit_switch(to.clone(), Reason::UserApproved, false);
        Ok(to)
    }

    /// The user declines the pending proposal: the path stays, and the same
    /// interface is not proposed again for the dwell time. A critical
    /// threshold still switches. Returns the interface.
    pub fn decline(&mut self, now: Instant) -> Result<String, Refusal> {
        let to = self.proposal.take().ok_or(Refusal::NoProposal)?;
        self.declined = Some((to.clone(), now));
        Ok(to)
    }

    /// Changes the mode (`baton mode manual`). A pending proposal is
    /// withdrawn; the new mode applies from the next activity.
    pub fn set_mode(&mut self, mode: Mode) {
        if mode != self.mode {
            self.mode = mode;
            self.withdraw();
            self.declined = None;
            self.pinned = false;
        }
    }

    /// The probes now measure other paths through the same interfaces: the
    /// session moved to another address of a multihomed gateway, which the
    /// probes go to. What was measured towards the old address says nothing
    /// about the new one, so every interface's measurements start over.
    pub fn on_target_changed(&mut self) {
        for e in &mut self.entries {
            e.window = Window::default();
            e.health = Health::Unknown;
            e.stall = None;
            e.throughput = None;
        }
    }

    // ---- activities ----

    /// Check Activity: probe and judge the current path.
    fn check(&mut self, now: Instant) {
        let Some(ci) = self.current_index() else { return };
        self.probe(self.entries[ci].iface.name.clone());
        let (health, trigger) = assess(&self.config, &self.entries[ci], now, true);
        self.entries[ci].health = health;
        self.trigger = trigger;
        if health < Health::Warning {
            if self.searching {
                self.searching = false;
                self.told = Health::Good;
                self.decisions.push_back(Decision::Recovered);
            }
            return;
        }
        if !self.searching {
            self.searching = true;
            // A single-interface device has nowhere to search (seed: "the
            // Search activity can't be launched").
            if let (false, Some(reason)) = (self.single_interface(), level_reason(health, trigger)) {
                self.decisions.push_back(Decision::StartSearch { reason });
            }
        }
        self.probe_alternatives();
        self.decide(now);
    }

    /// Search Activity: probe the alternatives and decide; with no path,
    /// try to get one.
    fn search(&mut self, now: Instant) {
        if self.current.is_none() {
            self.connect(now);
            return;
        }
        self.probe_alternatives();
        self.decide(now);
    }

    fn decide(&mut self, now: Instant) {
        let Some(ci) = self.current_index() else { return };
        let health = self.entries[ci].health;
        let reason = level_reason(health, self.trigger);
        self.refresh_alternatives(now);
        if self.single_interface() {
            if let Some(reason) = reason {
                if health > self.told {
                    self.told = health;
                    self.decisions.push_back(Decision::LinkGoing { reason });
                }
            }
            return;
        }
        if health == Health::Critical {
            let Some(reason) = reason else { return };
            match self.urgent_target(now, true) {
                Some(i) => self.emit_switch(self.entries[i].iface.name.clone(), reason, true),
                None if self.told < Health::Critical => {
                    self.told = Health::Critical;
                    self.decisions.push_back(Decision::Warn { reason, no_alternative: true });
                }
                None => {}
            }
            return;
        }
        let target = self.planned_target(now, health);
        match (self.mode, target) {
            (Mode::Auto, Some((i, r))) => self.emit_switch(self.entries[i].iface.name.clone(), r, false),
            (Mode::Manual, Some((i, r))) => {
                let to = self.entries[i].iface.name.clone();
                let declined = self
                    .declined
                    .as_ref()
                    .is_some_and(|(d, at)| *d == to && now.saturating_duration_since(*at) < self.config.min_dwell);
                if !declined && self.proposal.as_deref() != Some(to.as_str()) {
                    self.withdraw();
                    self.proposal = Some(to.clone());
                    self.decisions.push_back(Decision::Propose { to, reason: r });
                }
            }
            (Mode::User, _) | (_, None) => {
                // Approving a switch that is no longer better must not be
                // possible.
                self.withdraw();
                if let (Some(reason), true) = (reason, self.told < Health::Warning) {
                    let no_alternative = !self.any_alternative();
                    // In auto and manual mode a degraded path with somewhere
                    // to go is the search's business, not yet the user's.
                    if self.mode == Mode::User || no_alternative {
                        self.told = Health::Warning;
                        self.decisions.push_back(Decision::Warn { reason, no_alternative });
                    }
                }
            }
        }
    }

    /// With no path: the first interface that can be tried, in order of
    /// preference (seed Figure 20), or tell that there is none.
    fn connect(&mut self, now: Instant) {
        if self.switching.is_some() || self.current.is_some() {
            return;
        }
        match self.urgent_target(now, false) {
            Some(i) => {
                let reason = match self.lost_from.clone() {
                    Some(from) => Reason::PathLost { from },
                    None => Reason::Startup,
                };
                self.no_path_told = false;
                self.emit_switch(self.entries[i].iface.name.clone(), reason, self.connected_once);
            }
            None if !self.no_path_told => {
                self.no_path_told = true;
                let reason =
                    if self.entries.iter().any(Entry::usable) { Reason::AllFailed } else { Reason::NoUsableInterface };
                self.decisions.push_back(Decision::NoPath { reason });
            }
            None => {}
        }
    }

    fn lose_current(&mut self, now: Instant) {
        let Some(from) = self.current.take() else { return };
        self.reset_path_state();
        self.next_check = None;
        if self.single_interface() {
            self.decisions.push_back(Decision::LinkGoing { reason: Reason::PathLost { from: from.clone() } });
        }
        self.lost_from = Some(from);
        self.connect(now);
    }

    // ---- choosing ----

    /// The best interface to move to without urgency, if moving is worth
    /// it: only good interfaces qualify; an unmetered one beats a metered
    /// one, any good one beats a degraded current path, and otherwise the
    /// score must improve by the hysteresis. Nothing within the dwell time,
    /// and nothing while the user's own choice is still good.
    fn planned_target(&self, now: Instant, health: Health) -> Option<(usize, Reason)> {
        let ci = self.current_index()?;
        let degraded = health >= Health::Warning;
        if self.pinned && !degraded {
            return None;
        }
        if self.switched_at.is_some_and(|t| now.saturating_duration_since(t) < self.config.min_dwell) {
            return None;
        }
        let cur_class = if degraded { 2 } else { u8::from(self.entries[ci].attrs.metered) };
        let cur_score = self.score(ci, now);
        let (h, min_gain) = (self.config.hysteresis, self.config.min_gain);
        let mut best: Option<(usize, (bool, u8, f64))> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if i == ci || !e.usable() || e.health != Health::Good || e.failed_within(now, self.config.min_dwell) {
                continue;
            }
            let Some(s) = self.score(i, now) else { continue };
            let class = u8::from(e.attrs.metered);
            let better =
                class < cur_class || (class == cur_class && cur_score.is_some_and(|c| c - s > (h * c).max(min_gain)));
            if !better {
                continue;
            }
            // Interfaces that connect without the user first (seed: "preferring
            // the alternative provider which allows a totally automatic
            // connection procedure"), then unmetered, then the score.
            let key = (e.attrs.needs_user_interaction, class, s);
            let wins = best.as_ref().is_none_or(|(_, b)| {
                (key.0, key.1).cmp(&(b.0, b.1)).then_with(|| key.2.total_cmp(&b.2)) == Ordering::Less
            });
            if wins {
                best = Some((i, key));
            }
        }
        let (i, (_, class, s)) = best?;
        let reason = if degraded {
            level_reason(health, self.trigger)?
        } else if class < cur_class {
            Reason::LeaveMetered
        } else {
            Reason::Better { from_score: cur_score.unwrap_or_default(), to_score: s }
        };
        Some((i, reason))
    }

    /// The interface to go to when the path is lost or critical: any usable
    /// one not failed lately; those needing the user last, then by health
    /// (good, warning, unknown, critical), then score or order of
    /// preference. Critical ones are excluded when leaving a critical path.
    fn urgent_target(&mut self, now: Instant, exclude_critical: bool) -> Option<usize> {
        self.refresh_alternatives(now);
        let ci = self.current_index();
        let class = |h: Health| match h {
            Health::Good => 0u8,
            Health::Warning => 1,
            Health::Unknown => 2,
            Health::Critical => 3,
        };
        let candidates: Vec<(usize, bool, u8, f64)> = (0..self.entries.len())
            .filter(|&i| {
                let e = &self.entries[i];
                Some(i) != ci
                    && e.usable()
                    && !e.failed_within(now, self.config.search_interval)
                    && !(exclude_critical && e.health == Health::Critical)
            })
            .map(|i| {
                let e = &self.entries[i];
                let score = match e.health {
                    Health::Good | Health::Warning => self.score(i, now).unwrap_or_default(),
                    Health::Unknown | Health::Critical => 0.0,
                };
                (i, e.attrs.needs_user_interaction, class(e.health), score)
            })
            .collect();
        candidates
            .into_iter()
            .min_by(|a, b| {
                (a.1, a.2)
                    .cmp(&(b.1, b.2))
                    .then_with(|| a.3.total_cmp(&b.3))
                    .then_with(|| connect_order(&self.entries[a.0], &self.entries[b.0]))
            })
            .map(|c| c.0)
    }

    /// Penalty points of interface `i` (lower is better); `None` until
    /// enough probes are answered.
    fn score(&self, i: usize, now: Instant) -> Option<f64> {
        let e = &self.entries[i];
        let stats = e.window.stats(now, self.config.window);
        if stats.samples < self.config.min_samples {
            return None;
        }
        let rtt = stats.rtt?;
        let w = &self.config.weights;
        let rank = self.entries.iter().filter(|o| o.usable() && preference(o, e) == Ordering::Less).count();
        Some(
            w.rtt * ms(rtt)
                + w.jitter * ms(stats.jitter.unwrap_or_default())
                + w.loss * stats.loss.unwrap_or_default() * 100.0
                + w.cost * e.attrs.cost
                + if e.attrs.metered { w.metered } else { 0.0 }
                + w.preference * rank as f64,
        )
    }

    fn refresh_alternatives(&mut self, now: Instant) {
        let ci = self.current_index();
        for i in 0..self.entries.len() {
            if Some(i) != ci {
                let (health, _) = assess(&self.config, &self.entries[i], now, false);
                self.entries[i].health = health;
            }
        }
    }

    // ---- bookkeeping ----

    fn emit_switch(&mut self, to: String, reason: Reason, urgent: bool) {
        if self.proposal.as_deref().is_some_and(|p| p != to) {
            self.withdraw();
        }
        self.proposal = None;
        self.switching = Some(to.clone());
        self.next_check = None;
        self.next_search = None;
        self.decisions.push_back(Decision::Switch { to, reason, urgent });
    }

    fn run_queued_request(&mut self) {
        let Some(to) = self.queued_request.take() else { return };
        if self.current.as_deref() != Some(to.as_str()) && self.is_usable(&to) {
            self.pin_next = Some(to.clone());
            self.emit_switch(to, Reason::UserRequest, false);
        }
    }

    fn withdraw(&mut self) {
        if let Some(to) = self.proposal.take() {
            self.decisions.push_back(Decision::ProposalWithdrawn { to });
        }
    }

    fn resume(&mut self, now: Instant) {
        self.next_check = self.current.as_ref().and_then(|_| after(now, self.config.check_interval));
        self.next_search = after(now, self.config.search_interval);
    }

    fn reset_path_state(&mut self) {
        self.searching = false;
        self.told = Health::Good;
        self.trigger = None;
        self.pinned = false;
    }

    fn probe(&mut self, name: String) {
        if !self.probes.contains(&name) {
            self.probes.push_back(name);
        }
    }

    fn probe_alternatives(&mut self) {
        if self.single_interface() {
            return;
        }
        let names: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.usable() && self.current.as_deref() != Some(e.iface.name.as_str()))
            .map(|e| e.iface.name.clone())
            .collect();
        for n in names {
            self.probe(n);
        }
    }

    fn current_index(&self) -> Option<usize> {
        let cur = self.current.as_deref()?;
        self.entries.iter().position(|e| e.iface.name == cur)
    }

    fn is_usable(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.iface.name == name && e.usable())
    }

    /// Only one interface the policy may use exists at all (up or not): the
    /// seed's device that "is able to hold only one network connection".
    fn single_interface(&self) -> bool {
        self.entries.iter().filter(|e| !e.attrs.never_use).count() <= 1
    }

    fn any_alternative(&self) -> bool {
        self.entries.iter().any(|e| e.usable() && self.current.as_deref() != Some(e.iface.name.as_str()))
    }
}
