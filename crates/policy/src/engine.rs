//! The decision engine: the seed's "decision task" with its Check and
//! Search activities, as a state machine fed with the interface table,
//! measurements, user commands and `now`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
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
        /// A multihomed gateway's other address to move to at the same
        /// time (see [`Engine::on_targets`]); `None` keeps the current one.
        addr: Option<String>,
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
        /// The gateway address proposed with it; `None`: the current one.
        addr: Option<String>,
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
            Decision::Switch {
                to,
                addr,
                reason,
                urgent: true,
            } => write!(f, "switch to {} now: {reason}", label(to, addr)),
            Decision::Switch {
                to,
                addr,
                reason,
                urgent: false,
            } => write!(f, "switch to {}: {reason}", label(to, addr)),
            Decision::Propose { to, addr, reason } => {
                write!(f, "propose {}: {reason}", label(to, addr))
            }
            Decision::ProposalWithdrawn { to } => write!(f, "proposal of {to} withdrawn"),
            Decision::Warn {
                reason,
                no_alternative: true,
            } => {
                write!(
                    f,
                    "{reason}; no other interface: the connection may soon be unavailable"
                )
            }
            Decision::Warn {
                reason,
                no_alternative: false,
            } => write!(f, "{reason}"),
            Decision::LinkGoing { reason } => write!(f, "the only link is going: {reason}"),
            Decision::StartSearch { reason } => write!(f, "{reason}; searching for another path"),
            Decision::Recovered => f.write_str("current path recovered"),
            Decision::NoPath { reason } => write!(f, "no path: {reason}"),
        }
    }
}

/// `wlan0`, or `wlan0 → 192.0.2.7:7700` for a path to another gateway
/// address.
fn label(to: &str, addr: &Option<String>) -> String {
    match addr {
        Some(a) => format!("{to} → {a}"),
        None => to.to_owned(),
    }
}

/// Most of a multihomed gateway's other addresses measured (each on every
/// usable interface): bounds the probes per round.
pub const MAX_TARGETS: usize = 8;

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
    /// Another path (interface, gateway address, or both) scores better by
    /// more than the hysteresis.
    Better {
        /// Score of the current path (lower is better).
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
            Reason::Startup => {
                f.write_str("start-up, first usable interface in order of preference")
            }
            Reason::PathLost { from } => write!(f, "path through {from} lost"),
            Reason::Warning(t) => write!(f, "warning: {t}"),
            Reason::Critical(t) => write!(f, "critical: {t}"),
            Reason::Better {
                from_score,
                to_score,
            } => {
                write!(
                    f,
                    "better path (score {to_score:.0} against {from_score:.0})"
                )
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
            Trigger::Rtt { rtt, limit } => {
                write!(f, "round trip {:.0}ms, limit {:.0}ms", ms(rtt), ms(limit))
            }
            Trigger::Loss { loss, limit } => {
                write!(f, "loss {:.1}%, limit {:.1}%", loss * 100.0, limit * 100.0)
            }
            Trigger::Jitter { jitter, limit } => {
                write!(f, "jitter {:.0}ms, limit {:.0}ms", ms(jitter), ms(limit))
            }
            Trigger::Stall { stalled, limit } => {
                write!(f, "stalled {:.0}ms, limit {:.0}ms", ms(stalled), ms(limit))
            }
            Trigger::Throughput { rate, limit } => {
                write!(f, "throughput {rate}B/s, limit {limit}B/s")
            }
        }
    }
}

/// How an interface fares against the thresholds. Ordered from no evidence
/// to worst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Too few probes in the window to judge.
    #[default]
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

/// One candidate path (interface, gateway address) of [`Engine::paths`],
/// for `baton status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathStatus {
    /// Interface name.
    pub interface: String,
    /// The gateway address (as given to [`Engine::on_targets`]); `None`
    /// when the driver named none (a single-address gateway).
    pub gateway_addr: Option<String>,
    /// Carries the session now.
    pub current: bool,
    /// Against the thresholds, as last judged.
    pub health: Health,
    /// Probe results over the window.
    pub stats: Stats,
    /// Score (lower is better); `None` until enough probes are answered.
    pub score: Option<f64>,
}

/// Measurements of a path from an interface to another address of the
/// gateway than the current one.
#[derive(Debug, Clone, Default)]
struct Far {
    window: Window,
    health: Health,
    /// A switch to this pair failed lately.
    failed_at: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    iface: Interface,
    attrs: Attributes,
    /// Probes to the current gateway address.
    window: Window,
    /// Probes to the gateway's other addresses, by address.
    far: BTreeMap<String, Far>,
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
            far: BTreeMap::new(),
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
        self.failed_at
            .is_some_and(|t| now.saturating_duration_since(t) < span)
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
fn judge_high(
    v: f64,
    warn: Option<f64>,
    crit: Option<f64>,
    prev: Health,
    h: f64,
) -> Option<Health> {
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
    assess_window(cfg, &e.window, e.health, current.then_some(e), now)
}

/// Judges a window of probes that held level `prev`; `path` is the current
/// path's entry, whose stalls and throughput count too.
fn assess_window(
    cfg: &PolicyConfig,
    window: &Window,
    prev: Health,
    path: Option<&Entry>,
    now: Instant,
) -> (Health, Option<Trigger>) {
    let (w, c, h) = (&cfg.warning, &cfg.critical, cfg.hysteresis);
    let stats = window.stats(now, cfg.window);
    let judged = stats.samples >= cfg.min_samples;
    let mut health = if judged {
        Health::Good
    } else {
        Health::Unknown
    };
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
    if let Some(e) = path {
        let stalled = e.stalled(now);
        if !stalled.is_zero() {
            consider(
                judge_high(stalled.as_secs_f64(), secs(w.stall), secs(c.stall), prev, h),
                &|l| Trigger::Stall {
                    stalled,
                    limit: pick(l, w.stall, c.stall),
                },
            );
        }
    }
    if judged {
        if let Some(loss) = stats.loss {
            consider(judge_high(loss, w.loss, c.loss, prev, h), &|l| {
                Trigger::Loss {
                    loss,
                    limit: if l == Health::Critical {
                        c.loss
                    } else {
                        w.loss
                    }
                    .unwrap_or_default(),
                }
            });
        }
        if let Some(rtt) = stats.rtt {
            consider(
                judge_high(rtt.as_secs_f64(), secs(w.rtt), secs(c.rtt), prev, h),
                &|l| Trigger::Rtt {
                    rtt,
                    limit: pick(l, w.rtt, c.rtt),
                },
            );
        }
        if let Some(jitter) = stats.jitter {
            consider(
                judge_high(
                    jitter.as_secs_f64(),
                    secs(w.jitter),
                    secs(c.jitter),
                    prev,
                    h,
                ),
                &|l| Trigger::Jitter {
                    jitter,
                    limit: pick(l, w.jitter, c.jitter),
                },
            );
        }
    }
    if let Some(e) = path {
        if let Some((rate, at)) = e.throughput {
            if now.saturating_duration_since(at) < cfg.window {
                let f = |v: Option<u64>| v.map(|v| v as f64);
                consider(
                    judge_low(rate as f64, f(w.throughput), f(c.throughput), prev, h),
                    &|l| Trigger::Throughput {
                        rate,
                        limit: if l == Health::Critical {
                            c.throughput
                        } else {
                            w.throughput
                        }
                        .unwrap_or_default(),
                    },
                );
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
        (
            e.attrs.priority.is_none(),
            e.attrs.priority,
            e.iface.route_metric.is_none(),
            e.iface.route_metric,
        )
    };
    key(a)
        .cmp(&key(b))
        .then_with(|| a.iface.name.cmp(&b.iface.name))
}

/// Order in which to try interfaces with no measurements (seed Figure 20):
/// those that connect without the user first, then by priority, unmetered
/// before metered, cheaper first, then the route metric.
fn connect_order(a: &Entry, b: &Entry) -> Ordering {
    let (x, y) = (&a.attrs, &b.attrs);
    (
        x.needs_user_interaction,
        x.priority.is_none(),
        x.priority,
        x.metered,
    )
        .cmp(&(
            y.needs_user_interaction,
            y.priority.is_none(),
            y.priority,
            y.metered,
        ))
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
    /// The gateway address the switch under way goes to, if another.
    switching_addr: Option<String>,
    /// The gateway address of the current path (probes of the Check
    /// activity go there), as the driver named it.
    target: Option<String>,
    /// The gateway's other addresses, measured every `address_interval`.
    targets: Vec<String>,
    next_far: Option<Instant>,
    far_probes: VecDeque<(String, String)>,
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
    /// Since when, with a multihomed gateway: a pair counts as good for a
    /// move only on probes taken since (measurements from before the
    /// degradation may not show it yet).
    searching_since: Option<Instant>,
    /// Worst level of the current path already told to the user.
    told: Health,
    trigger: Option<Trigger>,
    proposal: Option<String>,
    proposal_addr: Option<String>,
    declined: Option<(String, Option<String>, Instant)>,
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
            switching_addr: None,
            target: None,
            targets: Vec::new(),
            next_far: None,
            far_probes: VecDeque::new(),
            connected_once: false,
            lost_from: None,
            switched_at: None,
            pinned: false,
            pin_next: None,
            queued_request: None,
            searching: false,
            searching_since: None,
            told: Health::Good,
            trigger: None,
            proposal: None,
            proposal_addr: None,
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

    /// The other gateway address proposed with [`Engine::proposal`], if any.
    pub fn proposal_addr(&self) -> Option<&str> {
        self.proposal_addr.as_deref()
    }

    /// The gateway address the switch under way goes to, if another.
    pub fn switching_addr(&self) -> Option<&str> {
        self.switching_addr.as_deref()
    }

    /// The gateway address of the current path, as last given to
    /// [`Engine::on_targets`].
    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Every candidate path: each interface towards the current gateway
    /// address, then towards each other address, with its measurements.
    pub fn paths(&self, now: Instant) -> Vec<PathStatus> {
        let cur = self.current_index();
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            out.push(PathStatus {
                interface: e.iface.name.clone(),
                gateway_addr: self.target.clone(),
                current: Some(i) == cur,
                health: e.health,
                stats: e.window.stats(now, self.config.window),
                score: self.score(i, now),
            });
        }
        for t in &self.targets {
            for (i, e) in self.entries.iter().enumerate() {
                let far = e.far.get(t).cloned().unwrap_or_default();
                out.push(PathStatus {
                    interface: e.iface.name.clone(),
                    gateway_addr: Some(t.clone()),
                    current: false,
                    health: far.health,
                    stats: far.window.stats(now, self.config.window),
                    score: self.score_of(i, Some(t), now),
                });
            }
        }
        out
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

    /// The next interface to probe towards the current gateway address, or
    /// `None`.
    #[must_use]
    pub fn poll_probe(&mut self) -> Option<String> {
        self.probes.pop_front()
    }

    /// The next (interface, other gateway address) to probe, or `None`;
    /// report the result with [`Engine::on_path_measurement`].
    #[must_use]
    pub fn poll_far_probe(&mut self) -> Option<(String, String)> {
        self.far_probes.pop_front()
    }

    /// When to call [`Engine::handle_timeout`]; `None` while a switch is
    /// under way or before the first table.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.switching.is_some() {
            return None;
        }
        [self.next_check, self.next_search, self.next_far]
            .into_iter()
            .flatten()
            .min()
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
        if self.switching.is_none() && self.next_far.is_some_and(|t| now >= t) {
            self.next_far = self.far_timer(now);
            self.probe_far();
        }
    }

    /// A multihomed gateway: the session's gateway address is `current`
    /// and `others` are the gateway's other addresses known (static and
    /// advertised), in its order; at most [`MAX_TARGETS`] of them are
    /// measured. From now on the candidate paths are every (interface,
    /// address) pair: the Check and Search activities probe the current
    /// address on each interface, and the others are probed every
    /// `address_interval` on every usable interface (every check while the
    /// current path is degraded). When `current` changes (the session moved
    /// to another address) what was measured towards the new address
    /// becomes the current path's, and the old one's is kept as another's.
    pub fn on_targets(&mut self, current: Option<&str>, others: &[String], now: Instant) {
        let current = current.map(str::to_owned);
        if current != self.target {
            for e in &mut self.entries {
                let new = current
                    .as_ref()
                    .and_then(|c| e.far.remove(c))
                    .unwrap_or_default();
                let old = Far {
                    window: std::mem::replace(&mut e.window, new.window),
                    health: std::mem::replace(&mut e.health, new.health),
                    failed_at: None,
                };
                if let Some(t) = &self.target {
                    e.far.insert(t.clone(), old);
                }
                // Stalls and throughput belonged to the old path.
                e.stall = None;
                e.throughput = None;
            }
            self.target = current;
        }
        let mut targets: Vec<String> = Vec::new();
        for o in others {
            if Some(o) != self.target.as_ref()
                && !targets.contains(o)
                && targets.len() < MAX_TARGETS
            {
                targets.push(o.clone());
            }
        }
        for e in &mut self.entries {
            e.far.retain(|a, _| targets.contains(a));
        }
        self.far_probes.retain(|(_, a)| targets.contains(a));
        if self
            .proposal_addr
            .as_ref()
            .is_some_and(|a| !targets.contains(a))
        {
            self.withdraw();
        }
        self.targets = targets;
        if self.next_far.is_none() && self.switching.is_none() {
            self.next_far = self.far_timer(now);
        }
    }

    /// A probe from interface `iface` to gateway address `addr` (the
    /// current one or another given to [`Engine::on_targets`]) was
    /// answered ([`Sample::Rtt`]) or lost; other samples are the current
    /// path's and go to [`Engine::on_measurement`].
    pub fn on_path_measurement(&mut self, iface: &str, addr: &str, sample: Sample, now: Instant) {
        if self.target.as_deref() == Some(addr) {
            self.on_measurement(iface, sample, now);
            return;
        }
        if !self.targets.iter().any(|t| t == addr) {
            return;
        }
        let span = self.config.window;
        let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == iface) else {
            return;
        };
        let far = e.far.entry(addr.to_owned()).or_default();
        match sample {
            Sample::Rtt(rtt) => far.window.push(now, Some(rtt), span),
            Sample::Lost => far.window.push(now, None, span),
            Sample::Stall(_) | Sample::Throughput(_) => {}
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
        let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == iface) else {
            return;
        };
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
        self.proposal_addr = None;
        if self.switching.as_deref() != Some(to) {
            // Not one the engine decided: the driver's own, on the interface.
            self.switching_addr = None;
        }
        self.switching = Some(to.to_owned());
        self.next_check = None;
        self.next_search = None;
        self.next_far = None;
    }

    /// The path now runs through `to`. The activities resume, and the dwell
    /// time starts.
    pub fn on_switch_finished(&mut self, to: &str, now: Instant) {
        self.switching = None;
        let addr = self.switching_addr.take();
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
            if let Some(f) = addr.and_then(|a| e.far.get_mut(&a)) {
                f.failed_at = None;
            }
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
        let addr = self.switching_addr.take();
        if let Some(e) = self.entries.iter_mut().find(|e| e.iface.name == to) {
            // A move to another gateway address that failed says nothing
            // of the interface's other paths.
            match addr {
                Some(a) => e.far.entry(a).or_default().failed_at = Some(now),
                None => e.failed_at = Some(now),
            }
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
        let e = self
            .entries
            .iter()
            .find(|e| e.iface.name == to)
            .ok_or_else(|| Refusal::UnknownInterface(to.to_owned()))?;
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
        self.emit_switch(to.to_owned(), None, Reason::UserRequest, false);
        Ok(())
    }

    /// The user approves the pending proposal: the switch is decided.
    /// Returns the interface.
    pub fn approve(&mut self, _now: Instant) -> Result<String, Refusal> {
        let to = self.proposal.take().ok_or(Refusal::NoProposal)?;
        let addr = self.proposal_addr.take();
        if !self.is_usable(&to) {
            return Err(Refusal::Unusable(to));
        }
        if addr.is_none() && self.current.as_deref() == Some(to.as_str()) {
            return Err(Refusal::AlreadyCurrent(to));
        }
        self.emit_switch(to.clone(), addr, Reason::UserApproved, false);
        Ok(to)
    }

    /// The user declines the pending proposal: the path stays, and the same
    /// interface is not proposed again for the dwell time. A critical
    /// threshold still switches. Returns the interface.
    pub fn decline(&mut self, now: Instant) -> Result<String, Refusal> {
        let to = self.proposal.take().ok_or(Refusal::NoProposal)?;
        self.declined = Some((to.clone(), self.proposal_addr.take(), now));
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

    // ---- activities ----

    /// Check Activity: probe and judge the current path.
    fn check(&mut self, now: Instant) {
        let Some(ci) = self.current_index() else {
            return;
        };
        self.probe(self.entries[ci].iface.name.clone());
        let (health, trigger) = assess(&self.config, &self.entries[ci], now, true);
        self.entries[ci].health = health;
        self.trigger = trigger;
        if health < Health::Warning {
            if self.searching {
                self.searching = false;
                self.searching_since = None;
                self.told = Health::Good;
                self.decisions.push_back(Decision::Recovered);
            }
            return;
        }
        if !self.searching {
            self.searching = true;
            self.searching_since = Some(now);
            // A single-interface device with a single-address gateway has
            // nowhere to search (seed: "the Search activity can't be launched").
            if let (false, Some(reason)) = (self.single_path(), level_reason(health, trigger)) {
                self.decisions.push_back(Decision::StartSearch { reason });
            }
        }
        self.probe_alternatives();
        self.probe_far();
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
        let Some(ci) = self.current_index() else {
            return;
        };
        let health = self.entries[ci].health;
        let reason = level_reason(health, self.trigger);
        self.refresh_alternatives(now);
        if self.single_path() {
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
            match self.urgent_target(now, true, true) {
                Some((i, addr)) => {
                    self.emit_switch(self.entries[i].iface.name.clone(), addr, reason, true)
                }
                None if self.told < Health::Critical => {
                    self.told = Health::Critical;
                    self.decisions.push_back(Decision::Warn {
                        reason,
                        no_alternative: true,
                    });
                }
                None => {}
            }
            return;
        }
        let target = self.planned_target(now, health);
        match (self.mode, target) {
            (Mode::Auto, Some((i, addr, r))) => {
                self.emit_switch(self.entries[i].iface.name.clone(), addr, r, false)
            }
            (Mode::Manual, Some((i, addr, r))) => {
                let to = self.entries[i].iface.name.clone();
                let declined = self.declined.as_ref().is_some_and(|(d, a, at)| {
                    *d == to
                        && *a == addr
                        && now.saturating_duration_since(*at) < self.config.min_dwell
                });
                let same =
                    self.proposal.as_deref() == Some(to.as_str()) && self.proposal_addr == addr;
                if !declined && !same {
                    self.withdraw();
                    self.proposal = Some(to.clone());
                    self.proposal_addr = addr.clone();
                    self.decisions.push_back(Decision::Propose {
                        to,
                        addr,
                        reason: r,
                    });
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
                        self.decisions.push_back(Decision::Warn {
                            reason,
                            no_alternative,
                        });
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
        // With no path the link's own search tries every gateway address:
        // the engine only names the interface.
        match self.urgent_target(now, false, false) {
            Some((i, _)) => {
                let reason = match self.lost_from.clone() {
                    Some(from) => Reason::PathLost { from },
                    None => Reason::Startup,
                };
                self.no_path_told = false;
                self.emit_switch(
                    self.entries[i].iface.name.clone(),
                    None,
                    reason,
                    self.connected_once,
                );
            }
            None if !self.no_path_told => {
                self.no_path_told = true;
                let reason = if self.entries.iter().any(Entry::usable) {
                    Reason::AllFailed
                } else {
                    Reason::NoUsableInterface
                };
                self.decisions.push_back(Decision::NoPath { reason });
            }
            None => {}
        }
    }

    fn lose_current(&mut self, now: Instant) {
        let Some(from) = self.current.take() else {
            return;
        };
        self.reset_path_state();
        self.next_check = None;
        if self.single_interface() {
            self.decisions.push_back(Decision::LinkGoing {
                reason: Reason::PathLost { from: from.clone() },
            });
        }
        self.lost_from = Some(from);
        self.connect(now);
    }

    // ---- choosing ----

    /// The best path to move to without urgency, if moving is worth it:
    /// only good paths qualify; an unmetered interface beats a metered
    /// one, any good path beats a degraded current one, and otherwise the
    /// score must improve by the hysteresis. The candidates are every
    /// (interface, gateway address) pair but the current one; moving the
    /// gateway address as well must be worth it: a pair on the current
    /// address within the hysteresis of the best is preferred. Nothing
    /// within the dwell time, and nothing while the user's own choice is
    /// still good.
    fn planned_target(
        &self,
        now: Instant,
        health: Health,
    ) -> Option<(usize, Option<String>, Reason)> {
        let ci = self.current_index()?;
        let degraded = health >= Health::Warning;
        if self.pinned && !degraded {
            return None;
        }
        if self
            .switched_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.min_dwell)
        {
            return None;
        }
        let cur_class = if degraded {
            2
        } else {
            u8::from(self.entries[ci].attrs.metered)
        };
        let cur_score = self.score(ci, now);
        let (h, min_gain) = (self.config.hysteresis, self.config.min_gain);
        let dwell = self.config.min_dwell;
        let iface_suspect = degraded && self.interface_suspect(ci);
        // (entry, other address, (needs the user, class, score)), best of all
        // and best on the current address.
        type Cand<'a> = (usize, Option<&'a String>, (bool, u8, f64));
        let (mut best, mut best_here): (Option<Cand<'_>>, Option<Cand<'_>>) = (None, None);
        let wins = |key: &(bool, u8, f64), b: &Option<Cand<'_>>| {
            b.as_ref().is_none_or(|(_, _, b)| {
                (key.0, key.1)
                    .cmp(&(b.0, b.1))
                    .then_with(|| key.2.total_cmp(&b.2))
                    == Ordering::Less
            })
        };
        for (i, e) in self.entries.iter().enumerate() {
            if !e.usable() || e.failed_within(now, dwell) || (iface_suspect && i == ci) {
                continue;
            }
            for addr in std::iter::once(None).chain(self.targets.iter().map(Some)) {
                let good = match addr {
                    None => i != ci && e.health == Health::Good && self.fresh(&e.window),
                    Some(a) => e.far.get(a).is_some_and(|f| {
                        f.health == Health::Good
                            && self.fresh(&f.window)
                            && f.failed_at
                                .is_none_or(|t| now.saturating_duration_since(t) >= dwell)
                    }),
                };
                if !good {
                    continue;
                }
                let Some(s) = self.score_of(i, addr.map(String::as_str), now) else {
                    continue;
                };
                let class = u8::from(e.attrs.metered);
                let better = class < cur_class
                    || (class == cur_class
                        && cur_score.is_some_and(|c| c - s > (h * c).max(min_gain)));
                if !better {
                    continue;
                }
                // Interfaces that connect without the user first (seed: "preferring
                // the alternative provider which allows a totally automatic
                // connection procedure"), then unmetered, then the score.
                let key = (e.attrs.needs_user_interaction, class, s);
                if wins(&key, &best) {
                    best = Some((i, addr, key));
                }
                if addr.is_none() && wins(&key, &best_here) {
                    best_here = Some((i, addr, key));
                }
            }
        }
        let (mut i, mut addr, mut key) = best?;
        if let (Some(_), Some((hi, _, hk))) = (addr, best_here) {
            if (hk.0, hk.1) == (key.0, key.1) && hk.2 - key.2 <= (h * hk.2).max(min_gain) {
                (i, addr, key) = (hi, None, hk);
            }
        }
        let (_, class, s) = key;
        let reason = if degraded {
            level_reason(health, self.trigger)?
        } else if class < cur_class {
            Reason::LeaveMetered
        } else {
            Reason::Better {
                from_score: cur_score.unwrap_or_default(),
                to_score: s,
            }
        };
        Some((i, addr.cloned(), reason))
    }

    /// The path to go to when the current one is lost or critical: any
    /// usable interface not failed lately, and with `pairs` every other
    /// gateway address on each; those needing the user last, then by health
    /// (good, good on probes from before the degradation only, warning,
    /// unknown, critical), then score (another address
    /// than the current one counting the hysteresis against it), then the
    /// current address before the others, then order of preference. Critical ones
    /// are excluded when leaving a critical path.
    fn urgent_target(
        &mut self,
        now: Instant,
        exclude_critical: bool,
        pairs: bool,
    ) -> Option<(usize, Option<String>)> {
        self.refresh_alternatives(now);
        let ci = self.current_index();
        let class = |h: Health| match h {
            Health::Good => 0u8,
            Health::Warning => 1,
            Health::Unknown => 2,
            Health::Critical => 3,
        };
        let span = self.config.search_interval;
        let iface_suspect = ci.is_some_and(|c| self.interface_suspect(c));
        let mut candidates: Vec<(usize, Option<&String>, bool, u8, f64)> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if !e.usable() || e.failed_within(now, span) || (iface_suspect && Some(i) == ci) {
                continue;
            }
            let others = if pairs { self.targets.as_slice() } else { &[] };
            for addr in std::iter::once(None).chain(others.iter().map(Some)) {
                let (health, window) = match addr {
                    None if Some(i) == ci => continue,
                    None => (e.health, Some(&e.window)),
                    Some(a) => match e.far.get(a) {
                        Some(f)
                            if f.failed_at
                                .is_some_and(|t| now.saturating_duration_since(t) < span) =>
                        {
                            continue
                        }
                        Some(f) => (f.health, Some(&f.window)),
                        None => (Health::Unknown, None),
                    },
                };
                // Good on probes from before the degradation only: still
                // better than warning, after those good on fresh probes.
                let stale = window.is_some_and(|w| health == Health::Good && !self.fresh(w));
                if exclude_critical && health == Health::Critical {
                    continue;
                }
                let score = match health {
                    Health::Good | Health::Warning => self
                        .score_of(i, addr.map(String::as_str), now)
                        .unwrap_or_default(),
                    Health::Unknown | Health::Critical => 0.0,
                };
                // Moving the gateway address as well must be worth it, as
                // in `planned_target`: another address pays the hysteresis.
                let (h, min_gain) = (self.config.hysteresis, self.config.min_gain);
                let score = if addr.is_some() {
                    score + (h * score).max(min_gain)
                } else {
                    score
                };
                candidates.push((
                    i,
                    addr,
                    e.attrs.needs_user_interaction,
                    class(health) * 2 + u8::from(stale),
                    score,
                ));
            }
        }
        candidates
            .into_iter()
            .min_by(|a, b| {
                (a.2, a.3)
                    .cmp(&(b.2, b.3))
                    .then_with(|| a.4.total_cmp(&b.4))
                    .then_with(|| a.1.is_some().cmp(&b.1.is_some()))
                    .then_with(|| connect_order(&self.entries[a.0], &self.entries[b.0]))
            })
            .map(|c| (c.0, c.1.cloned()))
    }

    /// Penalty points of interface `i` (lower is better); `None` until
    /// enough probes are answered.
    fn score(&self, i: usize, now: Instant) -> Option<f64> {
        self.score_of(i, None, now)
    }

    /// Penalty points of the path from interface `i` to the gateway address
    /// `addr` (`None`: the current one).
    fn score_of(&self, i: usize, addr: Option<&str>, now: Instant) -> Option<f64> {
        let e = &self.entries[i];
        let stats = match addr {
            None => e.window.stats(now, self.config.window),
            Some(a) => e.far.get(a)?.window.stats(now, self.config.window),
        };
        if stats.samples < self.config.min_samples {
            return None;
        }
        let rtt = stats.rtt?;
        let w = &self.config.weights;
        let rank = self
            .entries
            .iter()
            .filter(|o| o.usable() && preference(o, e) == Ordering::Less)
            .count();
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
            let cfg = &self.config;
            for far in self.entries[i].far.values_mut() {
                far.health = assess_window(cfg, &far.window, far.health, None, now).0;
            }
        }
    }

    // ---- bookkeeping ----

    fn emit_switch(&mut self, to: String, addr: Option<String>, reason: Reason, urgent: bool) {
        if self.proposal.as_deref().is_some_and(|p| p != to) || self.proposal_addr != addr {
            self.withdraw();
        }
        self.proposal = None;
        self.proposal_addr = None;
        self.switching = Some(to.clone());
        self.switching_addr = addr.clone();
        self.next_check = None;
        self.next_search = None;
        self.next_far = None;
        self.decisions.push_back(Decision::Switch {
            to,
            addr,
            reason,
            urgent,
        });
    }

    fn run_queued_request(&mut self) {
        let Some(to) = self.queued_request.take() else {
            return;
        };
        if self.current.as_deref() != Some(to.as_str()) && self.is_usable(&to) {
            self.pin_next = Some(to.clone());
            self.emit_switch(to, None, Reason::UserRequest, false);
        }
    }

    fn withdraw(&mut self) {
        self.proposal_addr = None;
        if let Some(to) = self.proposal.take() {
            self.decisions.push_back(Decision::ProposalWithdrawn { to });
        }
    }

    fn resume(&mut self, now: Instant) {
        self.next_check = self
            .current
            .as_ref()
            .and_then(|_| after(now, self.config.check_interval));
        self.next_search = after(now, self.config.search_interval);
        self.next_far = self.far_timer(now);
    }

    /// When to probe the other gateway addresses next: never without any.
    fn far_timer(&self, now: Instant) -> Option<Instant> {
        if self.targets.is_empty() {
            return None;
        }
        after(now, self.config.address_interval)
    }

    /// Probes the gateway's other addresses from every usable interface.
    fn probe_far(&mut self) {
        for t in &self.targets {
            for e in self.entries.iter().filter(|e| e.usable()) {
                let p = (e.iface.name.clone(), t.clone());
                if !self.far_probes.contains(&p) {
                    self.far_probes.push_back(p);
                }
            }
        }
    }

    fn reset_path_state(&mut self) {
        self.searching = false;
        self.searching_since = None;
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
        self.entries
            .iter()
            .any(|e| e.iface.name == name && e.usable())
    }

    /// Only one interface the policy may use exists at all (up or not): the
    /// seed's device that "is able to hold only one network connection".
    fn single_interface(&self) -> bool {
        self.entries.iter().filter(|e| !e.attrs.never_use).count() <= 1
    }

    /// The current path (interface `ci`, current address) is degraded and
    /// another interface reaches the same address well: the interface is
    /// what fails, so the other addresses through it are no way out, however
    /// their few probes fared. (When every interface's path to the address
    /// is degraded, the address is the suspect, and another one through the
    /// same interface is a fine way out.)
    fn interface_suspect(&self, ci: usize) -> bool {
        !self.targets.is_empty()
            && self.entries.iter().enumerate().any(|(i, e)| {
                i != ci && e.usable() && e.health == Health::Good && self.fresh(&e.window)
            })
    }

    /// With a multihomed gateway, while the current path is degraded: the
    /// window holds `min_samples` probes taken since the search began.
    /// Always true otherwise (the engine then decides as it always did).
    fn fresh(&self, w: &Window) -> bool {
        match self.searching_since {
            Some(t) if !self.targets.is_empty() => w.count_since(t) >= self.config.min_samples,
            _ => true,
        }
    }

    /// One interface, and a gateway with a single address: no other path
    /// at all.
    fn single_path(&self) -> bool {
        self.single_interface() && self.targets.is_empty()
    }

    fn any_alternative(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.usable() && self.current.as_deref() != Some(e.iface.name.as_str()))
            || (!self.targets.is_empty()
                && self.current.as_deref().is_some_and(|c| self.is_usable(c)))
    }
}
