//! The decision engine's driver: feeds `baton-policy`'s [`Engine`] the
//! interface table, path probes and the current path's progress, carries out
//! its decisions (switches), relays the user's commands (mode, approve,
//! decline, switch), and publishes every proposal, decision and switch as
//! an event (admin API event stream, `baton status`, the log).
//!
//! With a multihomed gateway the candidates are (interface, gateway
//! address) pairs: probes go from each interface to the session's address
//! and to the gateway's other addresses (one socket per pair), and a
//! decision may move the interface, the address, or both, through the
//! planned switch.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baton_policy::{Decision, Engine, Kind, Mode, Sample};
use baton_proto::probe::{Probe, PROBE_LEN};
use baton_proto::LegKey;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::client::{Client, LinkState};
use crate::path::Path;
use crate::util::lock;

/// One event of the decision engine or of a switch.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When (Unix time, milliseconds).
    pub at_unix_ms: u64,
    /// `proposal`, `proposal_withdrawn`, `switch_decided`, `switch_done`,
    /// `switch_failed`, `warning`, `link_going`, `search`, `recovered`,
    /// `no_path`, `mode`, `declined`, `path_changed`.
    pub kind: &'static str,
    /// The interface concerned, if any.
    pub interface: Option<String>,
    /// For a decision or proposal that also moves the session to another
    /// address of a multihomed gateway: that address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_addr: Option<String>,
    /// Human-readable reason.
    pub reason: String,
    /// Past a critical threshold or the path is lost.
    pub urgent: bool,
    /// For `path_changed`: what the new path was measured to give.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathReport>,
}

/// A session's new path after a switch, as measured on it: for applications
/// that adapt their quality of service (a video bitrate, a sync batch size).
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// The gateway whose session moved.
    pub gateway: String,
    /// `planned` or `unexpected`.
    pub switch: crate::client::SwitchKind,
    /// The interface left, and the one now carrying the session.
    pub from: String,
    pub to: String,
    /// Round trip of the new path: connection set-up to the gateway's first
    /// answer on it, in milliseconds.
    pub rtt_ms: f64,
    /// Bytes per second the session's streams received (`down`) and had
    /// confirmed by the gateway (`up`) over the `window_ms` after the
    /// switch: what the path carried, which is at most what it can carry
    /// when the applications sent less.
    pub down_bytes_per_s: u64,
    pub up_bytes_per_s: u64,
    pub window_ms: u64,
}

/// Most events kept for `baton status`.
const RECENT: usize = 100;

/// Where events go: subscribers, the recent list, the log.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
    recent: Mutex<VecDeque<Event>>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            tx: broadcast::channel(256).0,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn publish(
        &self,
        kind: &'static str,
        interface: Option<&str>,
        reason: String,
        urgent: bool,
    ) {
        self.publish_event(kind, interface, None, reason, urgent, None);
    }

    /// Publishes an event about a path: an interface and, if the session
    /// is to move to another gateway address too, that address.
    pub(crate) fn publish_path_event(
        &self,
        kind: &'static str,
        interface: &str,
        gateway_addr: Option<&str>,
        reason: String,
        urgent: bool,
    ) {
        self.publish_event(kind, Some(interface), gateway_addr, reason, urgent, None);
    }

    /// Publishes the measurements of a session's new path.
    pub(crate) fn publish_path(&self, report: PathReport) {
        let reason = format!(
            "{} now on {} (from {}): rtt {:.1} ms, {} B/s down, {} B/s up",
            report.gateway,
            report.to,
            report.from,
            report.rtt_ms,
            report.down_bytes_per_s,
            report.up_bytes_per_s
        );
        let to = report.to.clone();
        self.publish_event("path_changed", Some(&to), None, reason, false, Some(report));
    }

    fn publish_event(
        &self,
        kind: &'static str,
        interface: Option<&str>,
        gateway_addr: Option<&str>,
        reason: String,
        urgent: bool,
        path: Option<PathReport>,
    ) {
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let e = Event {
            at_unix_ms,
            kind,
            interface: interface.map(str::to_owned),
            gateway_addr: gateway_addr.map(str::to_owned),
            reason,
            urgent,
            path,
        };
        info!(
            kind,
            interface = e.interface.as_deref().unwrap_or("-"),
            gateway_addr = e.gateway_addr.as_deref().unwrap_or("-"),
            urgent,
            "{}",
            e.reason
        );
        let mut r = lock(&self.recent);
        r.push_back(e.clone());
        while r.len() > RECENT {
            r.pop_front();
        }
        let _ = self.tx.send(e);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub(crate) fn recent(&self) -> Vec<Event> {
        lock(&self.recent).iter().cloned().collect()
    }
}

/// A user's command to the engine.
#[derive(Debug)]
pub(crate) enum Command {
    SetMode(Mode, oneshot::Sender<Result<String, String>>),
    Approve(oneshot::Sender<Result<String, String>>),
    Decline(oneshot::Sender<Result<String, String>>),
    /// A user-initiated switch; answered when it is done.
    Switch(String, oneshot::Sender<Result<String, String>>),
    /// The engine's view of the interfaces, for status.
    Status(oneshot::Sender<serde_json::Value>),
}

/// How long a probe may go unanswered before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

struct Prober {
    socket: Arc<UdpSocket>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Has the kernel ask the gateway at `target` for a TCP Fast Open cookie
/// for `path`, if it holds none, so that the legs that move to the path
/// after a failure carry their preambles in their SYNs. A connection with a
/// cookie is opened without a packet sent, and closed as such; without one,
/// it is one handshake, closed before its first byte.
fn fetch_fast_open_cookie(path: &Path, target: SocketAddr) {
    let path = path.clone();
    tokio::spawn(async move {
        let r = crate::path::connect_via(target, &path, COOKIE_TIMEOUT, true).await;
        if let Err(e) = r {
            tracing::debug!(path = %path.name, %target, "no fast open cookie fetched: {e}");
        }
    });
}

/// How long fetching a Fast Open cookie may take.
const COOKIE_TIMEOUT: Duration = Duration::from_secs(5);

fn probe_socket(path: &Path, target: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    if let Some(dev) = &path.device {
        // Without CAP_NET_RAW the routing table chooses; the probe then
        // measures the preferred route, which is still worth having.
        let _ = s.bind_device(Some(dev.as_bytes()));
    }
    if let Some(src) = path.source {
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    s.connect(&target.into())?;
    UdpSocket::from_std(s.into())
}

/// Runs the decision engine until `stop`.
pub(crate) async fn run(
    client: Client,
    mut engine: Engine,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
) {
    let events = client.events();
    let (reply_tx, mut replies) = mpsc::unbounded_channel::<((String, SocketAddr), Probe)>();
    let (done_tx, mut switch_done) = mpsc::unbounded_channel::<(String, Result<String, String>)>();
    // One probe socket per path: (interface, gateway address).
    let mut probers: HashMap<(String, SocketAddr), Prober> = HashMap::new();
    let mut pending: HashMap<u64, ((String, SocketAddr), Instant)> = HashMap::new();
    // The gateway's other addresses as last given to the engine.
    let mut targets: Vec<SocketAddr> = Vec::new();
    let mut seq = 0u64;
    let mut user_waiting: Option<(String, oneshot::Sender<Result<String, String>>)> = None;
    // A switch this driver started and has not seen finish.
    let mut in_flight: Option<String> = None;
    let mut identity: Option<(u64, LegKey, SocketAddr)> = None;
    let mut paths_rx = client.paths_changed();
    let mut link_rx = client.first_link_state();
    // The session may be up before this task starts: its state is taken
    // like any later change, or nothing would ever be probed.
    link_rx.mark_changed();
    let mut progress = Progress::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let epoch = Instant::now();
    engine.on_table(&client.policy_table(), Instant::now());
    loop {
        // Carry out what the engine decided.
        while let Some(d) = engine.poll() {
            match d {
                Decision::Switch {
                    to,
                    addr,
                    reason,
                    urgent,
                } => {
                    let on = client.current_path();
                    // The engine names addresses as given by `on_targets`.
                    let addr = addr.and_then(|a| a.parse::<SocketAddr>().ok());
                    if addr.is_none() && on.as_deref() == Some(to.as_str()) {
                        engine.on_switch_finished(&to, Instant::now());
                        answer_user(&mut user_waiting, &to, || Ok(format!("already on {to}")));
                        continue;
                    }
                    if on.is_none() {
                        // The link is (re)connecting on its own, in the same
                        // order of preference: the switch stays under way
                        // until the link reports where it landed.
                        continue;
                    }
                    let a = addr.map(|a| a.to_string());
                    // What the engine saw of every candidate when it decided
                    // (formatted only when someone reads it).
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let seen: Vec<String> = engine
                            .paths(Instant::now())
                            .iter()
                            .map(|p| {
                                format!(
                                    "{}→{} {:?} loss {:.2} n {} score {:.0}",
                                    p.interface,
                                    p.gateway_addr.as_deref().unwrap_or("-"),
                                    p.health,
                                    p.stats.loss.unwrap_or(-1.0),
                                    p.stats.samples,
                                    p.score.unwrap_or(-1.0)
                                )
                            })
                            .collect();
                        tracing::debug!(paths = ?seen, "candidate paths");
                    }
                    events.publish_path_event(
                        "switch_decided",
                        &to,
                        a.as_deref(),
                        reason.to_string(),
                        urgent,
                    );
                    engine.on_switch_started(&to, Instant::now());
                    in_flight = Some(to.clone());
                    let (c, tx, to2, why) = (
                        client.clone(),
                        done_tx.clone(),
                        to.clone(),
                        reason.to_string(),
                    );
                    tokio::spawn(async move {
                        let r = c
                            .switch_path(&to2, addr, &why)
                            .await
                            .map(|recs| format!("{} session(s) moved", recs.len()));
                        let _ = tx.send((to2, r));
                    });
                }
                Decision::Propose { to, addr, reason } => events.publish_path_event(
                    "proposal",
                    &to,
                    addr.as_deref(),
                    reason.to_string(),
                    false,
                ),
                Decision::ProposalWithdrawn { to } => events.publish(
                    "proposal_withdrawn",
                    Some(&to),
                    "no longer better".into(),
                    false,
                ),
                Decision::Warn {
                    reason,
                    no_alternative,
                } => {
                    let why = if no_alternative {
                        format!(
                            "{reason}; no other interface: the connection may soon be unavailable"
                        )
                    } else {
                        reason.to_string()
                    };
                    events.publish(
                        "warning",
                        client.current_path().as_deref(),
                        why,
                        no_alternative,
                    );
                }
                Decision::LinkGoing { reason } => events.publish(
                    "link_going",
                    client.current_path().as_deref(),
                    reason.to_string(),
                    true,
                ),
                Decision::StartSearch { reason } => {
                    events.publish("search", None, reason.to_string(), false)
                }
                Decision::Recovered => events.publish(
                    "recovered",
                    client.current_path().as_deref(),
                    "current path recovered".into(),
                    false,
                ),
                Decision::NoPath { reason } => {
                    events.publish("no_path", None, reason.to_string(), true)
                }
            }
        }
        // Send the probes it asked for: towards the current gateway address,
        // then towards the others.
        let mut wanted: Vec<(String, SocketAddr)> = Vec::new();
        while let Some(iface) = engine.poll_probe() {
            if let Some((_, _, target)) = &identity {
                wanted.push((iface, *target));
            }
        }
        while let Some((iface, addr)) = engine.poll_far_probe() {
            if let Ok(a) = addr.parse() {
                wanted.push((iface, a));
            }
        }
        for key in wanted {
            let Some((sid, leg_key, _)) = identity.clone() else {
                break;
            };
            let (iface, target) = (key.0.clone(), key.1);
            if !probers.contains_key(&key) {
                let Some(path) = client.path(&iface) else {
                    continue;
                };
                match probe_socket(&path, target) {
                    Ok(sock) => {
                        fetch_fast_open_cookie(&path, target);
                        let sock = Arc::new(sock);
                        let (r, tx, k, key2) =
                            (sock.clone(), reply_tx.clone(), key.clone(), leg_key.clone());
                        let reader = tokio::spawn(async move {
                            let mut buf = [0u8; PROBE_LEN + 1];
                            loop {
                                match r.recv(&mut buf).await {
                                    Ok(n) => {
                                        if let Some(p) =
                                            Probe::open(&buf[..n], &key2).filter(|p| p.reply)
                                        {
                                            let _ = tx.send((k.clone(), p));
                                        }
                                    }
                                    // An ICMP error (nothing listens there, no
                                    // route for a while) is reported once on a
                                    // connected socket: the probe is lost, the
                                    // socket goes on.
                                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                                }
                            }
                        });
                        probers.insert(
                            key.clone(),
                            Prober {
                                socket: sock,
                                reader,
                            },
                        );
                    }
                    Err(e) => {
                        engine.on_path_measurement(
                            &iface,
                            &target.to_string(),
                            Sample::Lost,
                            Instant::now(),
                        );
                        tracing::debug!(interface = %iface, %target, "cannot probe: {e}");
                        continue;
                    }
                }
            }
            seq += 1;
            let sent_us = epoch.elapsed().as_micros() as u64;
            let bytes = Probe {
                reply: false,
                session_id: sid,
                seq,
                sent_us,
            }
            .seal(&leg_key);
            if let Some(p) = probers.get(&key) {
                // A datagram send does not wait on the network; an error
                // (no route, interface gone) is as good as a lost probe.
                match p.socket.send(&bytes).await {
                    Ok(_) => {
                        pending.insert(seq, (key, Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(interface = %iface, %target, "probe not sent: {e}");
                        engine.on_path_measurement(
                            &iface,
                            &target.to_string(),
                            Sample::Lost,
                            Instant::now(),
                        );
                    }
                }
            }
        }
        let deadline = engine.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                engine.handle_timeout(Instant::now());
            }
            _ = tick.tick() => {
                let now = Instant::now();
                pending.retain(|_, ((iface, target), at)| {
                    if now.duration_since(*at) > PROBE_TIMEOUT {
                        tracing::debug!(interface = %iface, %target, "probe lost");
                        engine.on_path_measurement(iface, &target.to_string(), Sample::Lost, now);
                        false
                    } else {
                        true
                    }
                });
                if let Some(cur) = client.current_path() {
                    for s in progress.sample(&client, now) {
                        engine.on_measurement(&cur, s, now);
                    }
                }
                // The gateway advertised another list (or a name resolved
                // anew): the engine's candidate addresses follow.
                if let Some((_, _, current)) = &identity {
                    let now_targets = client.probe_targets(*current);
                    if now_targets != targets {
                        targets = now_targets;
                        let others: Vec<String> = targets.iter().map(ToString::to_string).collect();
                        engine.on_targets(Some(&current.to_string()), &others, now);
                    }
                }
            }
            Some((key, p)) = replies.recv() => {
                if let Some((sent_on, at)) = pending.remove(&p.seq) {
                    if sent_on == key {
                        engine.on_path_measurement(&key.0, &key.1.to_string(), Sample::Rtt(at.elapsed()), Instant::now());
                    }
                }
            }
            r = paths_rx.changed() => {
                if r.is_err() { return; }
                engine.on_table(&client.policy_table(), Instant::now());
                // A probe socket keeps the source address it was connected
                // with: after any change (an interface gone, re-addressed)
                // they are all made anew, and their probes in flight do not
                // count as lost.
                probers.clear();
                pending.clear();
            }
            r = link_rx.changed() => {
                if r.is_err() { return; }
                let state = link_rx.borrow_and_update().clone();
                match state {
                    LinkState::Up(info) => {
                        let new_identity = client.probe_identity();
                        if new_identity.as_ref().map(|i| (i.0, i.2)) != identity.as_ref().map(|i| (i.0, i.2)) {
                            if new_identity.as_ref().map(|i| i.0) != identity.as_ref().map(|i| i.0) {
                                // A new session: probes carry its id and key.
                                probers.clear();
                                pending.clear();
                            }
                            identity = new_identity;
                            // The session's gateway address is the current
                            // target; what was measured towards it from each
                            // interface becomes the current path's.
                            if let Some((_, _, current)) = &identity {
                                targets = client.probe_targets(*current);
                                let others: Vec<String> = targets.iter().map(ToString::to_string).collect();
                                engine.on_targets(Some(&current.to_string()), &others, Instant::now());
                            }
                        }
                        if in_flight.is_none() && (engine.switching().is_some() || engine.current() != Some(info.path.as_str())) {
                            // The link moved on its own (start-up, path lost).
                            if engine.switching().is_none() {
                                engine.on_switch_started(&info.path, Instant::now());
                            }
                            engine.on_switch_finished(&info.path, Instant::now());
                            // A user's switch to where the link landed by
                            // itself (its interface went down as they asked)
                            // is done.
                            let path = info.path.clone();
                            answer_user(&mut user_waiting, &path, || Ok(format!("on {path} (the session moved there after a path failure)")));
                        }
                    }
                    LinkState::Switching(_) => {}
                    _ => {}
                }
            }
            Some((to, r)) = switch_done.recv() => {
                in_flight = None;
                match &r {
                    Ok(what) => {
                        engine.on_switch_finished(&to, Instant::now());
                        events.publish("switch_done", Some(&to), what.clone(), false);
                    }
                    Err(e) => {
                        engine.on_switch_failed(&to, Instant::now());
                        events.publish("switch_failed", Some(&to), e.clone(), false);
                    }
                }
                answer_user(&mut user_waiting, &to, || r);
            }
            Some(cmd) = commands.recv() => match cmd {
                Command::SetMode(mode, reply) => {
                    engine.set_mode(mode);
                    events.publish("mode", None, format!("mode set to {mode}"), false);
                    let _ = reply.send(Ok(format!("mode {mode}")));
                }
                Command::Approve(reply) => {
                    let r = engine.approve(Instant::now()).map_err(|e| e.to_string());
                    let _ = reply.send(r.map(|to| format!("switching to {to}")));
                }
                Command::Decline(reply) => {
                    let r = engine.decline(Instant::now()).map_err(|e| e.to_string());
                    if let Ok(to) = &r {
                        events.publish("declined", Some(to), "the user declined the proposal".into(), false);
                    }
                    let _ = reply.send(r.map(|to| format!("staying; {to} declined")));
                }
                Command::Switch(to, reply) => {
                    // The table as it is now: an interface that came up a
                    // moment ago may not have reached the engine yet (its
                    // notification is still queued), and must not be refused.
                    engine.on_table(&client.policy_table(), Instant::now());
                    let asked = engine.request_switch(&to, Instant::now());
                    match asked {
                        // Where the user wants to be is where the session is
                        // (it may have landed there by itself a moment ago).
                        Err(baton_policy::Refusal::AlreadyCurrent(_)) => { let _ = reply.send(Ok(format!("already on {to}"))); }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                        Ok(()) if client.current_path().as_deref() == Some(to.as_str()) => {
                            let _ = reply.send(Ok(format!("already on {to}")));
                        }
                        Ok(()) => user_waiting = Some((to, reply)),
                    }
                }
                Command::Status(reply) => {
                    let v = serde_json::json!({
                        "mode": engine.mode().to_string(),
                        "proposal": engine.proposal(),
                        "proposal_gateway_addr": engine.proposal_addr(),
                        "switching": engine.switching(),
                        "switching_gateway_addr": engine.switching_addr(),
                        "gateway_addr": engine.target(),
                        "interfaces": engine.interfaces(Instant::now()),
                        "paths": engine.paths(Instant::now()),
                    });
                    let _ = reply.send(v);
                }
            },
            _ = stop.cancelled() => return,
        }
    }
}

/// Answers the user's pending switch request if it was for `to`.
fn answer_user(
    waiting: &mut Option<(String, oneshot::Sender<Result<String, String>>)>,
    to: &str,
    r: impl FnOnce() -> Result<String, String>,
) {
    if waiting.as_ref().is_some_and(|(t, _)| t == to) {
        if let Some((_, reply)) = waiting.take() {
            let _ = reply.send(r());
        }
    }
}

/// Stalls and throughput of the current path: a stall is the control
/// connection's silence beyond its keep-alive interval; throughput is what
/// the streams delivered or had confirmed.
#[derive(Default)]
struct Progress {
    moved: u64,
    last_sample: Option<Instant>,
}

impl Progress {
    fn sample(&mut self, client: &Client, now: Instant) -> Vec<Sample> {
        let moved: u64 = client
            .streams()
            .iter()
            .map(|s| s.confirmed + s.received)
            .sum();
        let mut out = vec![Sample::Stall(client.path_stall())];
        if let Some(prev) = self.last_sample {
            let secs = now.duration_since(prev).as_secs_f64().max(1e-3);
            if moved >= self.moved {
                out.push(Sample::Throughput(
                    ((moved - self.moved) as f64 / secs) as u64,
                ));
            }
        }
        self.moved = moved;
        self.last_sample = Some(now);
        out
    }
}

/// Maps the kernel's link kind to the policy's.
pub(crate) fn kind(k: Option<baton_os::Kind>) -> Kind {
    match k {
        Some(baton_os::Kind::Ethernet) => Kind::Ethernet,
        Some(baton_os::Kind::Wifi) => Kind::Wifi,
        Some(baton_os::Kind::Cellular) => Kind::Cellular,
        _ => Kind::Other,
    }
}
