//! `baton-bench scale`: how many sessions and idle streams one gateway holds, what each
//! costs in memory, how fast they are accepted, and how fast a storm of clients switching
//! at once is absorbed.
//!
//! One real `baton gateway` process is started with a generated configuration (one key per
//! client), and a `baton-bench hold` process stands in for the services (it accepts every
//! connection, holds it and echoes what arrives). This process is the load generator: it
//! speaks the protocol directly with `baton-proto` (handshake, leg preamble) instead of
//! running thousands of full client agents, so that what is measured is the gateway.
//! Everything runs on loopback: each client has its own source address in 127.1.0.0/16 (and
//! moves to 127.2.0.0/16 in the storm), the targets listen on 127.0.3.x.
//!
//! Phases, each bounded in time:
//! 1. sessions: every client connects and completes the handshake;
//! 2. streams: the streams are opened, spread over the sessions (a leg each, and the
//!    gateway's connection to a target); nothing is sent on them;
//! 3. idle: the gateway's CPU use over a few seconds with everything held;
//! 4. storm: the first clients switch within a window: each drops its control connection and
//!    legs (its old network is gone) and resumes on a new source address (a new control
//!    connection resuming the session, and a new leg per stream, in parallel as the client
//!    agent does after a link loss); then as many other clients switch all at the same
//!    instant (a burst: an access point rebooting under a crowd);
//! 5. check: a sample of streams, switched and not, carries bytes to the target and back.
//!
//! The gateway's memory is its resident set (VmRSS) between phases; its CPU time comes from
//! /proc/PID/stat. File descriptors are the limit on a small machine: the gateway needs one
//! per session and two per stream, and no process can go beyond its RLIMIT_NOFILE hard
//! limit without CAP_SYS_RESOURCE; the stream count is capped to what fits, and the table
//! says so.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use baton_netbed::ChildGuard;
use baton_proto::wire::{FrameHeader, FRAME_HEADER_LEN, LEG_START_LEN, TAG_LEN};
use baton_proto::{
    ClientHandshake, ClientKey, ConnKind, ControlCipher, LegKey, Message, Offset, Preface, Role,
    StreamId,
};
use ring::rand::SystemRandom;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Options of `baton-bench scale`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Client sessions to open.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Idle streams to open, spread evenly over the sessions (capped to what the file
    /// descriptor limit allows).
    #[arg(long, default_value_t = 100_000)]
    streams: usize,
    /// Clients that switch in the storm (the first ones).
    #[arg(long, default_value_t = 1_000)]
    storm: usize,
    /// The storm's switches start spread evenly over this many seconds.
    #[arg(long, default_value_t = 1.0)]
    storm_window: f64,
    /// Skip the burst (the next `--storm` clients switching at the same instant).
    #[arg(long)]
    no_burst: bool,
    /// Handshakes and leg openings in flight at once in phases 1 and 2. The gateway listens
    /// with a backlog of 128 (Rust's default): more in flight overflows its accept queue and
    /// the dropped SYNs cost a second each, which would measure TCP's retransmission timer
    /// rather than the gateway.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of idle measurement in phase 3.
    #[arg(long, default_value_t = 5.0)]
    idle: f64,
    /// Streams of each kind (switched, not switched) checked end to end in phase 5.
    #[arg(long, default_value_t = 200)]
    check: usize,
    /// Port of the gateway on 127.0.0.1.
    #[arg(long, default_value_t = 17800)]
    port: u16,
    /// Target addresses 127.0.3.1 to 127.0.3.N (port 19000): the gateway's connections to
    /// the targets all leave from 127.0.0.1, and each destination offers ~28,000 ports.
    #[arg(long, default_value_t = 4)]
    targets: u8,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 180)]
    phase_timeout: u64,
    /// The baton binary (default: `baton` next to this program).
    #[arg(long)]
    baton: Option<PathBuf>,
    /// Where the markdown table goes.
    #[arg(long, default_value = "bench/results/scale.md")]
    out: PathBuf,
}

const TARGET_PORT: u16 = 19000;
/// File descriptors the gateway keeps for itself (listeners, runtime, log) and for
/// connections in flight during the storm; the rest is the budget for sessions and streams.
const FD_MARGIN: usize = 1_500;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the benchmark and writes the table.
pub(crate) fn run(opts: &Options) -> Result<()> {
    ensure!(
        opts.sessions > 0 && opts.concurrency > 0 && opts.targets > 0,
        "--sessions, --concurrency and --targets must be at least 1"
    );
    ensure!(
        opts.sessions <= 60_000,
        "--sessions: at most 60,000 (one source address each in 127.1.0.0/16)"
    );
    ensure!(
        opts.storm_window > 0.0 && opts.idle >= 0.0,
        "bad --storm-window/--idle"
    );
    let baton = match &opts.baton {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("baton"),
    };
    ensure!(baton.exists(), "{} not found: build it first (cargo build --release -p baton -p baton-bench) or pass --baton", baton.display());
    let (soft, hard) = raise_nofile()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    rt.block_on(async {
        tokio::select! {
            r = run_async(opts, &baton, soft, hard) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children inherit it) with
/// `prlimit`, which needs no privilege for that; returns (soft, hard) as they are then.
fn raise_nofile() -> Result<(usize, usize)> {
    let (_, hard) = nofile_limits(Path::new("/proc/self/limits"))?;
    let pid = std::process::id().to_string();
    let _ = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    nofile_limits(Path::new("/proc/self/limits"))
}

fn nofile_limits(path: &Path) -> Result<(usize, usize)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' line")?;
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [soft, hard, ..] => Ok((soft, hard)),
        _ => bail!("cannot read the open-files limit from {line:?}"),
    }
}

/// What was asked and what the limits allow.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    sessions: usize,
    streams: usize,
    storm: usize,
}

impl Plan {
    /// The gateway needs a descriptor per session and two per stream (leg and target); this
    /// process one per session and one per stream; the hold process one per stream.
    fn fit(opts: &Options, nofile: usize) -> Plan {
        let budget = nofile.saturating_sub(FD_MARGIN);
        let sessions = opts.sessions.min(budget);
        let streams = opts.streams.min(budget.saturating_sub(sessions) / 2);
        Plan {
            sessions,
            streams,
            storm: opts.storm.min(sessions),
        }
    }

    /// Streams of session `i` (the first `streams % sessions` get one more).
    fn streams_of(&self, i: usize) -> usize {
        self.streams / self.sessions + usize::from(i < self.streams % self.sessions)
    }
}

/// A client's source address: one per client, so that no address runs out of ports.
fn source(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

fn target_addr(k: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 3, k + 1), TARGET_PORT))
}

/// Counters of what the gateway sent on the control connections.
#[derive(Debug, Default)]
struct ControlStats {
    relegs: AtomicU64,
    resets: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

/// One client's session as the load generator holds it.
struct Sess {
    idx: usize,
    id: u64,
    leg_key: LegKey,
    /// Kept open: dropping it would half-close the control connection.
    ctl: Option<(OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
    legs: Vec<TcpStream>,
    /// Streams the session carries (its legs are dropped for a while in a switch).
    streams: usize,
    generation: u32,
}

impl Sess {
    fn drop_connections(&mut self) {
        if let Some((w, drain)) = self.ctl.take() {
            drain.abort();
            drop(w);
        }
        self.legs.clear();
    }
}

struct Ctx {
    gateway: SocketAddr,
    keys: Vec<ClientKey>,
    rng: SystemRandom,
    services: Vec<String>,
    stats: Arc<ControlStats>,
}

fn client_id(i: usize) -> String {
    format!("c{i:05}")
}

async fn run_async(opts: &Options, baton: &Path, soft: usize, hard: usize) -> Result<()> {
    let plan = Plan::fit(opts, soft);
    let limited = plan.sessions < opts.sessions || plan.streams < opts.streams;
    if limited {
        eprintln!(
            "[scale] RLIMIT_NOFILE is {soft} (hard {hard}): running {} sessions and {} streams instead of {} and {}",
            plan.sessions, plan.streams, opts.sessions, opts.streams
        );
    }
    let dir = std::env::temp_dir().join(format!("baton-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());

    eprintln!("[scale] generating {} client keys", plan.sessions);
    let rng = SystemRandom::new();
    let keys = (0..plan.sessions)
        .map(|_| ClientKey::generate(&rng))
        .collect::<Result<Vec<_>, _>>()?;
    let services: Vec<String> = (0..opts.targets).map(|k| format!("t{k}")).collect();
    let gateway = SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port));
    write_gateway_config(
        &dir.join("gateway.toml"),
        gateway,
        &keys,
        &services,
        opts.targets,
        plan.sessions,
    )?;

    let exe = std::env::current_exe()?;
    let mut hold_cmd = Command::new(&exe);
    hold_cmd.arg("hold");
    for k in 0..opts.targets {
        hold_cmd.arg("--listen").arg(target_addr(k).to_string());
    }
    hold_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("hold.log"))?);
    let mut hold = ChildGuard::spawn(&mut hold_cmd).context("starting the hold process")?;
    for k in 0..opts.targets {
        wait_listening(target_addr(k), &mut hold, "hold").await?;
    }

    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let mut gw_cmd = Command::new(baton);
    gw_cmd
        .args(["gateway", "-c"])
        .arg(dir.join("gateway.toml"))
        .env(
            "BATON_LOG",
            std::env::var("BATON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut gw = ChildGuard::spawn(&mut gw_cmd).context("starting baton gateway")?;
    let gw_pid = gw.id();
    wait_listening(gateway, &mut gw, "baton gateway").await?;
    let gw_limit = nofile_limits(Path::new(&format!("/proc/{gw_pid}/limits")))?.0;

    let ctx = Arc::new(Ctx {
        gateway,
        keys,
        rng,
        services,
        stats: Arc::new(ControlStats::default()),
    });
    let phase_timeout = Duration::from_secs(opts.phase_timeout);
    let mut report = Report {
        plan,
        opts: Some(opts.clone()),
        soft,
        hard,
        gw_limit,
        limited,
        ..Default::default()
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_start = rss_kib(gw_pid)?;

    // 1. Sessions.
    eprintln!("[scale] opening {} sessions", plan.sessions);
    let cpu0 = cpu_seconds(gw_pid)?;
    let t = Instant::now();
    let mut sessions = bounded(
        phase_timeout,
        "sessions",
        open_sessions(&ctx, plan.sessions, opts.concurrency),
    )
    .await?;
    report.t_sessions = t.elapsed();
    report.cpu_sessions = cpu_seconds(gw_pid)? - cpu0;
    settle().await;
    report.rss_sessions = rss_kib(gw_pid)?;
    check_alive(&mut gw, "baton gateway")?;

    // 2. Streams.
    eprintln!("[scale] opening {} idle streams", plan.streams);
    let cpu0 = cpu_seconds(gw_pid)?;
    let t = Instant::now();
    sessions = bounded(
        phase_timeout,
        "streams",
        open_streams(&ctx, sessions, &plan, opts.concurrency),
    )
    .await?;
    report.t_streams = t.elapsed();
    report.cpu_streams = cpu_seconds(gw_pid)? - cpu0;
    settle().await;
    report.rss_streams = rss_kib(gw_pid)?;
    report.fds_streams = count_fds(gw_pid);
    check_alive(&mut gw, "baton gateway")?;

    // 3. Idle.
    eprintln!("[scale] idle for {} s", opts.idle);
    let cpu0 = cpu_seconds(gw_pid)?;
    tokio::time::sleep(Duration::from_secs_f64(opts.idle)).await;
    report.cpu_idle = cpu_seconds(gw_pid)? - cpu0;

    // 4. Storm.
    let mut storms = vec![(0..plan.storm, opts.storm_window)];
    if !opts.no_burst && plan.sessions >= 2 * plan.storm {
        storms.push((plan.storm..2 * plan.storm, 0.0));
    }
    let switched = storms.last().map_or(0, |s| s.0.end);
    for (range, window) in storms {
        eprintln!(
            "[scale] storm: {} clients switch within {window} s",
            range.len()
        );
        let cpu0 = cpu_seconds(gw_pid)?;
        let (back, mut storm) =
            bounded(phase_timeout, "storm", storm(&ctx, sessions, range, window)).await?;
        sessions = back;
        storm.cpu = cpu_seconds(gw_pid)? - cpu0;
        report.storms.push(storm);
        settle().await;
        check_alive(&mut gw, "baton gateway")?;
    }
    report.rss_storm = rss_kib(gw_pid)?;

    // 5. Check.
    let (ok, failed) = bounded(
        phase_timeout,
        "check",
        check_streams(sessions, switched, opts.check),
    )
    .await?;
    report.checked = (ok, failed);
    report.control = (
        ctx.stats.relegs.load(Ordering::Relaxed),
        ctx.stats.resets.load(Ordering::Relaxed),
        ctx.stats.errors.load(Ordering::Relaxed),
    );
    report.gateway_warnings = std::fs::read_to_string(dir.join("gateway.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    check_alive(&mut gw, "baton gateway")?;
    check_alive(&mut hold, "hold")?;
    drop(gw);
    drop(hold);

    let table = report.render()?;
    println!("{table}");
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&opts.out, &table).with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("[scale] written to {}", opts.out.display());
    Ok(())
}

/// Removes the run's temporary folder, also on failure.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow!("phase {what} did not finish within {limit:?}"))?
}

/// Lets the allocator and the runtime settle before memory is read.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn check_alive(child: &mut ChildGuard, what: &str) -> Result<()> {
    if let Some(status) = child.try_wait()? {
        bail!("{what} exited: {status}");
    }
    Ok(())
}

async fn wait_listening(addr: SocketAddr, child: &mut ChildGuard, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A connection that sends nothing: the gateway drops it after its handshake timeout.
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        check_alive(child, what)?;
        ensure!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_gateway_config(
    path: &Path,
    listen: SocketAddr,
    keys: &[ClientKey],
    services: &[String],
    targets: u8,
    sessions: usize,
) -> Result<()> {
    let mut s = String::new();
    // No keep-alives come from the load generator: the session must not be detached for
    // silence during the run.
    writeln!(
        s,
        "listen = [\"{listen}\"]\ninactivity_timeout = \"1h\"\nmax_sessions = {}\n",
        sessions + 100
    )?;
    for (k, name) in services.iter().enumerate().take(usize::from(targets)) {
        writeln!(
            s,
            "[services.{name}]\ntarget = \"{}\"\n",
            target_addr(k as u8)
        )?;
    }
    let list = services
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    for (i, key) in keys.iter().enumerate() {
        writeln!(
            s,
            "[clients.{}]\nkey = \"{}\"\nservices = [{list}]\n",
            client_id(i),
            key.public()
        )?;
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

// ---- measurements of the gateway process ----

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// User and system CPU seconds of `pid` (all its threads) so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file; the list starts at field 3.
    let ticks: u64 = f
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    // USER_HZ; 100 on every Linux architecture baton runs on.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---- the protocol, client side ----

/// A frame from the gateway: header and payload as received, and the tag if it had one.
struct Frame {
    bytes: Vec<u8>,
    tag: Option<[u8; TAG_LEN]>,
}

impl Frame {
    fn header(&self) -> &[u8; FRAME_HEADER_LEN] {
        self.bytes[..FRAME_HEADER_LEN]
            .try_into()
            .expect("a Frame always holds its header")
    }

    fn decode(&self) -> Result<Message> {
        Ok(Message::decode(
            self.bytes[0],
            &self.bytes[FRAME_HEADER_LEN..],
        )?)
    }
}

fn accepted_ty() -> u8 {
    Message::Accepted {
        session_id: 0,
        keepalive_ms: 0,
        inactivity_ms: 0,
    }
    .ty()
}

/// Reads one frame; it carries a tag when `keyed` or when it is the Accepted frame (the
/// first keyed one). Lengths are bounded by `FrameHeader::decode` before allocating.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, keyed: bool) -> Result<Frame> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut header).await?;
    let hdr = FrameHeader::decode(&header)?;
    let mut bytes = vec![0u8; FRAME_HEADER_LEN + hdr.len];
    bytes[..FRAME_HEADER_LEN].copy_from_slice(&header);
    r.read_exact(&mut bytes[FRAME_HEADER_LEN..]).await?;
    let tag = if keyed || hdr.ty == accepted_ty() {
        let mut t = [0u8; TAG_LEN];
        r.read_exact(&mut t).await?;
        Some(t)
    } else {
        None
    };
    Ok(Frame { bytes, tag })
}

async fn io<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("no answer within {IO_TIMEOUT:?}"))?
}

/// Opens a control connection from `src` and completes the handshake; `resume` names the
/// session to resume (0: a new one). Returns the session id and leg key, the write half,
/// and a task that reads (and authenticates) what the gateway sends afterwards.
async fn handshake(
    ctx: &Ctx,
    idx: usize,
    src: IpAddr,
    resume: u64,
) -> Result<(u64, LegKey, OwnedWriteHalf, tokio::task::JoinHandle<()>)> {
    let mut s = baton_os::connect_via(ctx.gateway, None, Some(src), IO_TIMEOUT).await?;
    let _ = s.set_nodelay(true);
    let (hs, first) = ClientHandshake::start(&client_id(idx), &ctx.keys[idx], resume, &ctx.rng)?;
    io(async { Ok(s.write_all(&first).await?) }).await?;
    let challenge = io(read_frame(&mut s, false)).await?;
    if let Message::Refused { reason, detail } = challenge.decode()? {
        bail!("refused: {reason}: {detail}");
    }
    let (sid, keys, auth) = hs.on_challenge(&challenge.bytes)?;
    io(async { Ok(s.write_all(&auth).await?) }).await?;
    let reply = io(read_frame(&mut s, false)).await?;
    let mut cipher = ControlCipher::new(&keys, Role::Client);
    let Some(tag) = reply.tag else {
        match reply.decode()? {
            Message::Refused { reason, detail } => bail!("refused: {reason}: {detail}"),
            other => bail!("unexpected message type {:#04x}", other.ty()),
        }
    };
    match cipher.open(reply.header(), &reply.bytes[FRAME_HEADER_LEN..], &tag)? {
        Message::Accepted { session_id, .. } if session_id == sid => {}
        other => bail!("unexpected answer to the handshake: {other:?}"),
    }
    ensure!(
        resume == 0 || sid == resume,
        "the gateway did not resume session {resume:016x} (got {sid:016x})"
    );
    let (mut r, w) = s.into_split();
    let stats = ctx.stats.clone();
    let drain = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut r, true).await {
                Ok(f) => f,
                Err(_) => return,
            };
            let Some(tag) = frame.tag else { return };
            match cipher.open(frame.header(), &frame.bytes[FRAME_HEADER_LEN..], &tag) {
                Ok(Message::Releg { .. }) => stats.relegs.fetch_add(1, Ordering::Relaxed),
                Ok(Message::StreamReset { .. }) => stats.resets.fetch_add(1, Ordering::Relaxed),
                Ok(_) => stats.other.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
        }
    });
    Ok((sid, keys.leg_key(), w, drain))
}

/// Opens a leg from `src` for `stream` of the session; returns it once the gateway accepted.
async fn open_leg(
    ctx: &Ctx,
    src: IpAddr,
    sess: &Sess,
    stream: u64,
    service: &str,
) -> Result<TcpStream> {
    let mut leg = baton_os::connect_via(ctx.gateway, None, Some(src), IO_TIMEOUT).await?;
    let _ = leg.set_nodelay(true);
    let mut out = Preface::new(ConnKind::Leg).encode().to_vec();
    let open = Message::LegOpen {
        session_id: sess.id,
        stream: StreamId(stream),
        generation: sess.generation,
        received: Offset(0),
        service: service.to_owned(),
        // A resumed idle stream rewinds: it has nothing in flight.
        handover: false,
        compression: baton_proto::Compression::None,
    };
    let open_tag = sess.leg_key.seal_open(&open, &mut out);
    io(async { Ok(leg.write_all(&out).await?) }).await?;
    let reply = io(async {
        let mut header = [0u8; FRAME_HEADER_LEN];
        leg.read_exact(&mut header).await?;
        let hdr = FrameHeader::decode(&header)?;
        let mut bytes = vec![0u8; FRAME_HEADER_LEN + hdr.len];
        bytes[..FRAME_HEADER_LEN].copy_from_slice(&header);
        leg.read_exact(&mut bytes[FRAME_HEADER_LEN..]).await?;
        let mut tag = [0u8; TAG_LEN];
        leg.read_exact(&mut tag).await?;
        Ok(Frame {
            bytes,
            tag: Some(tag),
        })
    })
    .await
    .context("leg preamble (the gateway closes a leg it cannot authenticate)")?;
    let tag = reply.tag.expect("read with a tag above");
    ensure!(
        sess.leg_key.verify_reply(&open_tag, &reply.bytes, &tag),
        "leg reply failed authentication"
    );
    match reply.decode()? {
        Message::LegReply { result: Ok(_), .. } => Ok(leg),
        Message::LegReply {
            result: Err(reason),
            detail,
        } => bail!("leg refused: {reason}: {detail}"),
        other => bail!("unexpected leg reply type {:#04x}", other.ty()),
    }
}

fn service_of(ctx: &Ctx, idx: usize, stream: u64) -> &str {
    &ctx.services[(idx + stream as usize) % ctx.services.len()]
}

async fn open_sessions(ctx: &Arc<Ctx>, n: usize, concurrency: usize) -> Result<Vec<Sess>> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for idx in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let ctx = ctx.clone();
        set.spawn(async move {
            let r = handshake(&ctx, idx, source(1, idx), 0).await;
            drop(permit);
            r.map(|(id, leg_key, w, drain)| Sess {
                idx,
                id,
                leg_key,
                ctl: Some((w, drain)),
                legs: Vec::new(),
                streams: 0,
                generation: 0,
            })
            .with_context(|| format!("session {}", client_id(idx)))
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    out.sort_by_key(|s| s.idx);
    Ok(out)
}

async fn open_streams(
    ctx: &Arc<Ctx>,
    sessions: Vec<Sess>,
    plan: &Plan,
    concurrency: usize,
) -> Result<Vec<Sess>> {
    // One task per session, each opening its streams in turn under a shared bound on the
    // legs in flight.
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for mut sess in sessions {
        let (ctx, sem, count) = (ctx.clone(), sem.clone(), plan.streams_of(sess.idx));
        set.spawn(async move {
            for j in 0..count as u64 {
                let _permit = sem.acquire().await?;
                let leg = open_leg(
                    &ctx,
                    source(1, sess.idx),
                    &sess,
                    j,
                    service_of(&ctx, sess.idx, j),
                )
                .await
                .with_context(|| format!("stream {j} of {}", client_id(sess.idx)))?;
                sess.legs.push(leg);
                sess.streams += 1;
            }
            Ok::<_, anyhow::Error>(sess)
        });
    }
    let mut out = Vec::with_capacity(plan.sessions);
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    out.sort_by_key(|s| s.idx);
    Ok(out)
}

/// The storm's outcome.
#[derive(Debug, Clone, Default)]
struct Storm {
    clients: usize,
    streams: usize,
    /// Seconds over which the switches started (0: all at once).
    window: f64,
    /// Gateway CPU seconds during the storm.
    cpu: f64,
    /// From the first switch's start to the last client fully resumed.
    span: Duration,
    /// Each client's own time from dropping its old connections to every leg resumed, sorted.
    per_client: Vec<Duration>,
    failures: Vec<String>,
}

async fn storm(
    ctx: &Arc<Ctx>,
    mut sessions: Vec<Sess>,
    range: std::ops::Range<usize>,
    window: f64,
) -> Result<(Vec<Sess>, Storm)> {
    let mut rest = sessions.split_off(range.end.min(sessions.len()));
    rest.extend(sessions.drain(..range.start.min(sessions.len())));
    let k = sessions.len();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let step = Duration::from_secs_f64(window / k.max(1) as f64);
    let streams: usize = sessions.iter().map(|s| s.legs.len()).sum();
    let mut set = JoinSet::new();
    for (n, mut sess) in sessions.into_iter().enumerate() {
        let ctx = ctx.clone();
        let at = t0 + step * n as u32;
        set.spawn(async move {
            tokio::time::sleep_until(at).await;
            let start = tokio::time::Instant::now();
            let r = switch(&ctx, &mut sess).await;
            (sess, r.map(|()| (start, tokio::time::Instant::now())))
        });
    }
    let mut out = Vec::with_capacity(k + rest.len());
    let mut result = Storm {
        clients: k,
        streams,
        window,
        ..Default::default()
    };
    let mut last_done = t0;
    while let Some(j) = set.join_next().await {
        let (sess, r) = j?;
        match r {
            Ok((start, done)) => {
                result.per_client.push(done - start);
                last_done = last_done.max(done);
            }
            Err(e) => result
                .failures
                .push(format!("{}: {e:#}", client_id(sess.idx))),
        }
        out.push(sess);
    }
    result.span = last_done - t0;
    result.per_client.sort();
    out.extend(rest);
    out.sort_by_key(|s| s.idx);
    Ok((out, result))
}

/// One client's switch: its old network is gone (its connections are dropped), it resumes
/// the session from a new address and opens a new leg per stream, in parallel with the
/// resume as the client agent does after a link loss.
async fn switch(ctx: &Ctx, sess: &mut Sess) -> Result<()> {
    sess.drop_connections();
    sess.generation += 1;
    let src = source(2, sess.idx);
    let view = &*sess;
    let legs = futures_util::future::try_join_all(
        (0..view.streams as u64).map(|j| open_leg(ctx, src, view, j, service_of(ctx, view.idx, j))),
    );
    let (resumed, legs) = tokio::join!(handshake(ctx, sess.idx, src, sess.id), legs);
    let (_, _, w, drain) = resumed.context("resume")?;
    sess.ctl = Some((w, drain));
    sess.legs = legs.context("new legs")?;
    Ok(())
}

/// Sends bytes over the first stream of up to `n` switched sessions and `n` others, and
/// expects them back from the echoing target: the resumed legs carry data. Returns (ok,
/// failed).
async fn check_streams(sessions: Vec<Sess>, switched: usize, n: usize) -> Result<(usize, usize)> {
    let mut set = JoinSet::new();
    let pick = |range: std::ops::Range<usize>| {
        sessions[range]
            .iter()
            .filter(|s| !s.legs.is_empty())
            .take(n)
            .map(|s| s.idx)
            .collect::<Vec<_>>()
    };
    let picked: Vec<usize> = pick(0..switched)
        .into_iter()
        .chain(pick(switched..sessions.len()))
        .collect();
    let mut sessions = sessions;
    let mut legs = Vec::new();
    for idx in picked {
        legs.push((idx, sessions[idx].legs.swap_remove(0)));
    }
    for (idx, mut leg) in legs {
        set.spawn(async move {
            let msg = format!("check {idx:05} through baton....");
            // Each direction of a leg opens with the stream offset of its first
            // byte; nothing was sent on these streams before, so both are 0.
            let mut out = 0u64.to_be_bytes().to_vec();
            out.extend_from_slice(msg.as_bytes());
            let mut back = vec![0u8; LEG_START_LEN + msg.len()];
            io(async {
                leg.write_all(&out).await?;
                leg.read_exact(&mut back).await?;
                Ok(())
            })
            .await?;
            ensure!(
                back[..LEG_START_LEN] == [0u8; LEG_START_LEN],
                "stream of {}: the gateway's leg starts at {:?}, not 0",
                client_id(idx),
                &back[..LEG_START_LEN]
            );
            ensure!(
                &back[LEG_START_LEN..] == msg.as_bytes(),
                "stream of {} echoed other bytes",
                client_id(idx)
            );
            Ok::<_, anyhow::Error>(())
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(()) => ok += 1,
            Err(e) => {
                if failed < 5 {
                    eprintln!("[scale] check failed: {e:#}");
                }
                failed += 1;
            }
        }
    }
    drop(sessions);
    Ok((ok, failed))
}

/// What a run measured.
#[derive(Debug, Default)]
struct Report {
    plan: Plan,
    opts: Option<Options>,
    soft: usize,
    hard: usize,
    gw_limit: usize,
    limited: bool,
    rss_start: u64,
    rss_sessions: u64,
    rss_streams: u64,
    rss_storm: u64,
    t_sessions: Duration,
    t_streams: Duration,
    cpu_sessions: f64,
    cpu_streams: f64,
    cpu_idle: f64,
    fds_streams: usize,
    storms: Vec<Storm>,
    checked: (usize, usize),
    /// Relegs, resets and unauthenticated frames seen on the control connections.
    control: (u64, u64, u64),
    gateway_warnings: usize,
}

fn kib_per(delta_kib: u64, n: usize) -> String {
    if n == 0 {
        return "-".into();
    }
    format!("{:.1} KiB", delta_kib as f64 / n as f64)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    fn render(&self) -> Result<String> {
        let opts = self.opts.as_ref().context("report without options")?;
        let p = &self.plan;
        let per_session = self.rss_sessions.saturating_sub(self.rss_start);
        let per_stream = self.rss_streams.saturating_sub(self.rss_sessions);
        let mut out = String::new();
        writeln!(out, "# baton scale benchmark\n")?;
        let date =
            crate::handover::command_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
        let commit = crate::handover::command_line(
            Command::new("git").args(["describe", "--always", "--dirty"]),
        );
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let kernel = crate::handover::command_line(Command::new("uname").arg("-r"));
        writeln!(
            out,
            "- date: {date}; commit: {commit}; machine: {cores} cores, Linux {kernel}"
        )?;
        writeln!(
            out,
            "- one `baton gateway` process; load generator and targets are separate processes on the same cores; \
             {} handshakes or legs in flight at most while opening",
            opts.concurrency
        )?;
        writeln!(
            out,
            "- open-files limit (RLIMIT_NOFILE) of every process: soft {}, hard {}; gateway {}",
            self.soft, self.hard, self.gw_limit
        )?;
        if self.limited {
            writeln!(
                out,
                "- **asked for {} sessions and {} streams; ran {} and {}**: the gateway needs a descriptor per session \
                 and two per stream (leg and target connection), and the hard limit of {} cannot be raised here \
                 (no CAP_SYS_RESOURCE). See the projection below.",
                opts.sessions, opts.streams, p.sessions, p.streams, self.hard
            )?;
        }
        writeln!(out)?;
        writeln!(out, "| measure | value |\n| --- | ---: |")?;
        let mut row = |k: &str, v: String| writeln!(out, "| {k} | {v} |");
        row("sessions held", format!("{}", p.sessions))?;
        row(
            "idle streams held",
            format!(
                "{} ({:.1} per session)",
                p.streams,
                p.streams as f64 / p.sessions.max(1) as f64
            ),
        )?;
        row(
            "gateway descriptors with everything open",
            format!("{}", self.fds_streams),
        )?;
        row("gateway RSS at start", mib(self.rss_start))?;
        row("gateway RSS with the sessions", mib(self.rss_sessions))?;
        row(
            "gateway RSS with sessions and streams",
            mib(self.rss_streams),
        )?;
        row("**memory per session**", kib_per(per_session, p.sessions))?;
        row("**memory per idle stream**", kib_per(per_stream, p.streams))?;
        row(
            "**time to accept all sessions**",
            format!(
                "{} ({:.0}/s; gateway CPU {:.2} s, {:.0} µs per session)",
                ms(self.t_sessions),
                p.sessions as f64 / self.t_sessions.as_secs_f64().max(1e-9),
                self.cpu_sessions,
                self.cpu_sessions * 1e6 / p.sessions.max(1) as f64
            ),
        )?;
        row(
            "**time to accept all streams**",
            format!(
                "{} ({:.0}/s; gateway CPU {:.2} s, {:.0} µs per stream)",
                ms(self.t_streams),
                p.streams as f64 / self.t_streams.as_secs_f64().max(1e-9),
                self.cpu_streams,
                self.cpu_streams * 1e6 / p.streams.max(1) as f64
            ),
        )?;
        row(
            "gateway CPU while everything is idle",
            format!(
                "{:.1} % of one core",
                100.0 * self.cpu_idle / opts.idle.max(1e-9)
            ),
        )?;
        for s in &self.storms {
            let name = if s.window > 0.0 {
                "storm".to_owned()
            } else {
                "burst".to_owned()
            };
            let when = if s.window > 0.0 {
                format!("starting evenly within {} s", s.window)
            } else {
                "all at the same instant".to_owned()
            };
            row(
                &format!("{name}: clients switching / their streams"),
                format!("{} / {} {when}", s.clients, s.streams),
            )?;
            row(
                &format!("**{name}: all resumed after** (from the first switch)"),
                ms(s.span),
            )?;
            row(
                &format!("{name}: one client's resume (p50 / p99 / max)"),
                format!(
                    "{} / {} / {}",
                    ms(pct(&s.per_client, 50.0)),
                    ms(pct(&s.per_client, 99.0)),
                    ms(pct(&s.per_client, 100.0))
                ),
            )?;
            row(&format!("{name}: gateway CPU"), format!("{:.2} s", s.cpu))?;
            row(
                &format!("{name}: clients that failed to resume"),
                format!("{}", s.failures.len()),
            )?;
        }
        row("gateway RSS after the storms", mib(self.rss_storm))?;
        row(
            "streams checked end to end after the storm (ok / failed)",
            format!("{} / {}", self.checked.0, self.checked.1),
        )?;
        row(
            "Releg / StreamReset frames the gateway sent",
            format!("{} / {}", self.control.0, self.control.1),
        )?;
        row(
            "gateway log lines (warnings and errors)",
            format!("{}", self.gateway_warnings),
        )?;
        if self.limited || p.sessions < 10_000 || p.streams < 100_000 {
            let sessions_kib = per_session as f64 / p.sessions.max(1) as f64;
            let stream_kib = per_stream as f64 / p.streams.max(1) as f64;
            let total = self.rss_start as f64 + 10_000.0 * sessions_kib + 100_000.0 * stream_kib;
            writeln!(
                out,
                "\nProjection (linear, not measured): 10,000 sessions and 100,000 idle streams would take \
                 {:.0} MiB of gateway RSS and 210,000+ descriptors in the gateway (the load generator 110,000, \
                 the targets 100,000).",
                total / 1024.0
            )?;
        }
        for s in &self.storms {
            if !s.failures.is_empty() {
                writeln!(out, "\nFailures to resume (first 5):\n")?;
                for f in s.failures.iter().take(5) {
                    writeln!(out, "- {f}")?;
                }
            }
        }
        Ok(out)
    }
}

/// `baton-bench hold`: the scale benchmark's targets. Accepts every connection on each
/// address, holds it, and echoes what arrives (the end-to-end check), without a buffer
/// per idle connection.
pub(crate) fn hold(listen: &[SocketAddr]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut set = JoinSet::new();
        for &addr in listen {
            // A deep accept queue: the gateway connects to the targets as fast as legs come.
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(addr).with_context(|| format!("binding {addr}"))?;
            let l: TcpListener = sock.listen(4096)?;
            set.spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(hold_conn(s));
                        }
                        Err(e) => {
                            eprintln!("baton-bench hold: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    })
}

async fn hold_conn(mut s: TcpStream) {
    loop {
        if s.readable().await.is_err() {
            return;
        }
        let mut buf = [0u8; 256];
        let n = match s.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Options,
    }

    fn opts(args: &[&str]) -> Options {
        Cli::parse_from(std::iter::once("scale").chain(args.iter().copied())).opts
    }

    #[test]
    fn plan_fits_the_descriptor_limit() {
        // 20,000 descriptors: 18,500 after the margin; sessions first, then two per stream.
        let p = Plan::fit(&opts(&[]), 20_000);
        assert_eq!((p.sessions, p.streams, p.storm), (10_000, 4_250, 1_000));
        let p = Plan::fit(&opts(&["--sessions", "1000"]), 20_000);
        assert_eq!((p.sessions, p.streams), (1_000, 8_750));
        let p = Plan::fit(
            &opts(&["--sessions", "100", "--streams", "1000", "--storm", "500"]),
            1_048_576,
        );
        assert_eq!((p.sessions, p.streams, p.storm), (100, 1_000, 100));
    }

    #[test]
    fn streams_are_spread_evenly() {
        let p = Plan {
            sessions: 4,
            streams: 10,
            storm: 0,
        };
        let per: Vec<usize> = (0..4).map(|i| p.streams_of(i)).collect();
        assert_eq!(per, [3, 3, 2, 2]);
        assert_eq!(per.iter().sum::<usize>(), 10);
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        assert_eq!(source(1, 0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(source(2, 9_999), IpAddr::V4(Ipv4Addr::new(127, 2, 39, 250)));
        let all: std::collections::HashSet<_> = (0..60_000).map(|i| source(1, i)).collect();
        assert_eq!(all.len(), 60_000);
    }

    #[test]
    fn reads_the_open_files_limit() {
        let dir = std::env::temp_dir().join(format!("baton-scale-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("limits");
        std::fs::write(&f, "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 20000                files\n").unwrap();
        assert_eq!(nofile_limits(&f).unwrap(), (1024, 20_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
