//! The decision engine's driver: feeds `baton-policy`'s [`Engine`] the
//! interface table, path probes and the current path's progress, carries out
//! its decisions (switches), relays the user's commands (mode, approve,
//! decline, switch), and publishes every proposal, decision and switch as
//! an event (admin API event stream, `baton status`, the log).

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
use crate::util::lock;
use crate::path::Path;

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
        Self { tx: broadcast::channel(256).0, recent: Mutex::new(VecDeque::new()) }
    }

    pub(crate) fn publish(&self, kind: &'static str, interface: Option<&str>, reason: String, urgent: bool) {
        self.publish_event(kind, interface, reason, urgent, None);
    }

    /// Publishes the measurements of a session's new path.
    pub(crate) fn publish_path(&self, report: PathReport) {
        let reason = format!(
            "{} now on {} (from {}): rtt {:.1} ms, {} B/s down, {} B/s up",
            report.gateway, report.to, report.from, report.rtt_ms, report.down_bytes_per_s, report.up_bytes_per_s
        );
        let to = report.to.clone();
        self.publish_event("path_changed", Some(&to), reason, false, Some(report));
    }

    fn publish_event(&self, kind: &'static str, interface: Option<&str>, reason: String, urgent: bool, path: Option<PathReport>) {
        let at_unix_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let e = Event { at_unix_ms, kind, interface: interface.map(str::to_owned), reason, urgent, path };
        info!(kind, interface = e.interface.as_deref().unwrap_or("-"), urgent, "{}", e.reason);
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

fn probe_socket(path: &Path, target: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(target), Type::DGRAM, Some(Protocol::UDP))?;
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
pub(crate) async fn run(client: Client, mut engine: Engine, mut commands: mpsc::UnboundedReceiver<Command>, stop: CancellationToken) {
    let events = client.events();
    let (reply_tx, mut replies) = mpsc::unbounded_channel::<(String, Probe)>();
    let (done_tx, mut switch_done) = mpsc::unbounded_channel::<(String, Result<String, String>)>();
    let mut probers: HashMap<String, Prober> = HashMap::new();
    let mut pending: HashMap<u64, (String, Instant)> = HashMap::new();
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
                Decision::Switch { to, reason, urgent } => {
                    let on = client.current_path();
                    if on.as_deref() == Some(to.as_str()) {
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
                    events.publish("switch_decided", Some(&to), reason.to_string(), urgent);
                    engine.on_switch_started(&to, Instant::now());
                    in_flight = Some(to.clone());
                    let (c, tx, to2, why) = (client.clone(), done_tx.clone(), to.clone(), reason.to_string());
                    tokio::spawn(async move {
                        let r = c.switch_now(&to2, &why).await.map(|recs| format!("{} session(s) moved", recs.len()));
                        let _ = tx.send((to2, r));
                    });
                }
                Decision::Propose { to, reason } => events.publish("proposal", Some(&to), reason.to_string(), false),
                Decision::ProposalWithdrawn { to } => {
                    events.publish("proposal_withdrawn", Some(&to), "no longer better".into(), false)
                }
                Decision::Warn { reason, no_alternative } => {
                    // No interface can take over: another address of the gateway may.
                    if no_alternative && engine.mode() == Mode::Auto {
                        client.roam_for_congestion(reason.to_string());
                    }
                    let why = if no_alternative {
                        format!("{reason}; no other interface: the connection may soon be unavailable")
                    } else {
                        reason.to_string()
                    };
                    events.publish("warning", client.current_path().as_deref(), why, no_alternative);
                }
                Decision::LinkGoing { reason } => {
                    // A lost path is the link's own business (it searches every
                    // address); a degraded one may be the gateway address's.
                    if !matches!(reason, baton_policy::Reason::PathLost { .. }) && engine.mode() == Mode::Auto {
                        client.roam_for_congestion(reason.to_string());
                    }
                    events.publish("link_going", client.current_path().as_deref(), reason.to_string(), true)
                }
                Decision::StartSearch { reason } => events.publish("search", None, reason.to_string(), false),
                Decision::Recovered => events.publish("recovered", client.current_path().as_deref(), "current path recovered".into(), false),
                Decision::NoPath { reason } => events.publish("no_path", None, reason.to_string(), true),
            }
        }
        // Send the probes it asked for.
        while let Some(iface) = engine.poll_probe() {
            let Some((sid, key, target)) = identity.clone() else { break };
            if !probers.contains_key(&iface) {
                let Some(path) = client.path(&iface) else { continue };
                match probe_socket(&path, target) {
                    Ok(sock) => {
                        let sock = Arc::new(sock);
                        let (r, tx, name, key2) = (sock.clone(), reply_tx.clone(), iface.clone(), key.clone());
                        let reader = tokio::spawn(async move {
                            let mut buf = [0u8; PROBE_LEN + 1];
                            while let Ok(n) = r.recv(&mut buf).await {
                                if let Some(p) = Probe::open(&buf[..n], &key2).filter(|p| p.reply) {
                                    let _ = tx.send((name.clone(), p));
                                }
                            }
                        });
                        probers.insert(iface.clone(), Prober { socket: sock, reader });
                    }
                    Err(e) => {
                        engine.on_measurement(&iface, Sample::Lost, Instant::now());
                        tracing::debug!(interface = %iface, "cannot probe: {e}");
                        continue;
                    }
                }
            }
            seq += 1;
            let sent_us = epoch.elapsed().as_micros() as u64;
            let bytes = Probe { reply: false, session_id: sid, seq, sent_us }.seal(&key);
            if let Some(p) = probers.get(&iface) {
                // A datagram send does not wait on the network; an error
                // (no route, interface gone) is as good as a lost probe.
                match p.socket.send(&bytes).await {
                    Ok(_) => {
                        pending.insert(seq, (iface, Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(interface = %iface, "probe not sent: {e}");
                        engine.on_measurement(&iface, Sample::Lost, Instant::now());
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
                pending.retain(|_, (iface, at)| {
                    if now.duration_since(*at) > PROBE_TIMEOUT {
                        tracing::debug!(interface = %iface, "probe lost");
                        engine.on_measurement(iface, Sample::Lost, now);
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
            }
            Some((iface, p)) = replies.recv() => {
                if let Some((name, at)) = pending.remove(&p.seq) {
                    if name == iface {
                        engine.on_measurement(&iface, Sample::Rtt(at.elapsed()), Instant::now());
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
                            // Another gateway address: the probes in flight and the
                            // measurements so far were of paths to the old one.
                            if identity.as_ref().is_some_and(|i| new_identity.as_ref().is_some_and(|n| n.2 != i.2)) {
                                pending.clear();
                                engine.on_target_changed();
                            }
                            probers.clear();
                            identity = new_identity;
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
                Command::Switch(to, reply) => match engine.request_switch(&to, Instant::now()) {
                    Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    Ok(()) if client.current_path().as_deref() == Some(to.as_str()) => {
                        let _ = reply.send(Ok(format!("already on {to}")));
                    }
                    Ok(()) => user_waiting = Some((to, reply)),
                },
                Command::Status(reply) => {
                    let v = serde_json::json!({
                        "mode": engine.mode().to_string(),
                        "proposal": engine.proposal(),
                        "switching": engine.switching(),
                        "interfaces": engine.interfaces(Instant::now()),
                    });
                    let _ = reply.send(v);
                }
            },
            _ = stop.cancelled() => return,
        }
    }
}

/// Answers the user's pending switch request if it was for `to`.
fn answer_user(waiting: &mut Option<(String, oneshot::Sender<Result<String, String>>)>, to: &str, r: impl FnOnce() -> Result<String, String>) {
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
        let moved: u64 = client.streams().iter().map(|s| s.confirmed + s.received).sum();
        let mut out = vec![Sample::Stall(client.path_stall())];
        if let Some(prev) = self.last_sample {
            let secs = now.duration_since(prev).as_secs_f64().max(1e-3);
            if moved >= self.moved {
                out.push(Sample::Throughput(((moved - self.moved) as f64 / secs) as u64));
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
