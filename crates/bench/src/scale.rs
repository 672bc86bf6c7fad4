//! `baton-bench scale`: how many sessions and idle streams one gateway holds, what each
//! costs in memory, how fast they are accepted, and how fast a storm of clients switching
//! at once is absorbed.
//!
//! One real `baton gateway` is started with a generated configuration (one key per client);
//! `baton-bench hold` processes stand in for the services (they accept every connection,
//! hold it and echo what arrives). The load generator speaks the protocol directly with
//! `baton-proto` (handshake, leg preamble) instead of running thousands of full client
//! agents, so that what is measured is the gateway. Everything runs on loopback: each client
//! has its own source address in 127.1.0.0/16 (and moves to 127.2.0.0/16 in the storm), the
//! targets listen on 127.0.3.x.
//!
//! File descriptors are the limit on a small machine: no process can go beyond its
//! RLIMIT_NOFILE hard limit without CAP_SYS_RESOURCE, and the gateway needs one per session
//! and two per stream. So every role is spread over as many processes as its descriptors
//! need ([`Plan::fit`]):
//! * this process is the coordinator: it writes the keys and the gateway's configuration,
//!   starts the others, drives the phases and measures the gateway;
//! * P load-generator parts (`baton-bench scale-part`, see [`part`]) each drive the clients
//!   whose index i has i % P == part, phase by phase over their stdin and stdout;
//! * H `baton-bench hold` processes listen on the same target addresses (SO_REUSEPORT);
//! * the gateway runs `workers = N` worker processes when one is not enough.
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
//!    instant (a burst: an access point rebooting under a crowd). Every part is given the
//!    same absolute start time;
//! 5. check: a sample of streams, switched and not, carries bytes to the target and back.
//!
//! The gateway's memory is its resident set (VmRSS) between phases and its CPU time comes
//! from /proc/PID/stat, both summed over the gateway process and its direct children (the
//! workers).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use baton_netbed::ChildGuard;
use baton_proto::ClientKey;
use ring::rand::SystemRandom;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub(crate) mod part;

use part::{Phase, Reply};

/// Options of `baton-bench scale`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Client sessions to open.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Idle streams to open, spread evenly over the sessions (capped only if the machine
    /// cannot hold them: source ports towards the targets, the system's open files).
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
    /// Handshakes and leg openings in flight at once in phases 1 and 2, over all the load
    /// generator's parts. More in flight than the gateway's accept queue holds would drop
    /// SYNs that cost a second each, which would measure TCP's retransmission timer rather
    /// than the gateway.
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
    /// the targets all leave from 127.0.0.1, and each destination offers the local port
    /// range (~28,000 ports). Keep each well below full: the kernel's search for a free
    /// source port grows with the ports in use, and at 20,000 per destination it cost
    /// 1.4 ms of CPU per connection (83 s for 100,000 streams over 5 targets, 7 s over 20).
    #[arg(long, default_value_t = 20)]
    targets: u8,
    /// Load-generator processes (default: as many as their open-files limit needs; fewer
    /// cap the streams to what they hold).
    #[arg(long)]
    parts: Option<usize>,
    /// Target (`hold`) processes (default: as many as their open-files limit needs).
    #[arg(long)]
    holds: Option<usize>,
    /// Gateway worker processes, `workers` in its configuration (default: as many as its
    /// open-files limit needs; written only when more than 1).
    #[arg(long)]
    workers: Option<usize>,
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
/// File descriptors every process keeps for itself (listeners, runtime, log) and for
/// connections in flight during the storm; the rest is its budget for sessions and streams.
const FD_MARGIN: usize = 1_500;
/// Local ports of the range left to other connections to a target address.
const PORT_MARGIN: usize = 1_000;
/// SO_REUSEPORT spreads connections over the hold processes by a hash, not evenly: each is
/// planned for this much more than its share.
const HOLD_SLACK: f64 = 1.05;

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
    ensure!(
        [opts.parts, opts.holds, opts.workers]
            .iter()
            .all(|n| n.is_none_or(|n| n >= 1)),
        "--parts, --holds and --workers must be at least 1"
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

/// What the machine allows: per process and for the whole system.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// RLIMIT_NOFILE of every process of the run (children inherit it).
    nofile: usize,
    /// Local ports a connection from 127.0.0.1 to one target address can use.
    ports_per_target: usize,
    /// Files the system can still open (fs.file-max less those open).
    files_free: usize,
}

impl Limits {
    fn read(nofile: usize) -> Limits {
        let nums = |path: &str| -> Vec<usize> {
            std::fs::read_to_string(path)
                .map(|t| {
                    t.split_whitespace()
                        .filter_map(|w| w.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let ports_per_target = match nums("/proc/sys/net/ipv4/ip_local_port_range")[..] {
            [lo, hi] if hi >= lo => hi - lo + 1,
            _ => 28_232,
        };
        let files_free = match nums("/proc/sys/fs/file-nr")[..] {
            [open, _, max] => max.saturating_sub(open),
            _ => usize::MAX,
        };
        Limits {
            nofile,
            ports_per_target,
            files_free,
        }
    }
}

/// What was asked and what the limits allow.
#[derive(Debug, Clone, Default)]
struct Plan {
    sessions: usize,
    streams: usize,
    storm: usize,
    /// Load-generator processes.
    parts: usize,
    /// Target (`hold`) processes.
    holds: usize,
    /// Gateway worker processes (`workers` in its configuration).
    workers: usize,
    /// Why fewer sessions or streams than asked are run, one reason each.
    capped: Vec<String>,
}

impl Plan {
    /// Spreads every role over as many processes as its descriptors need within `nofile`
    /// less a margin: a load-generator part holds one per session and one per stream, a
    /// hold process one per stream, a gateway worker one per session and two per stream
    /// (leg and target connection). Only what the machine as a whole cannot hold, or
    /// process counts given in `opts`, cap the run.
    fn fit(opts: &Options, limits: &Limits) -> Plan {
        let budget = limits.nofile.saturating_sub(FD_MARGIN).max(1);
        let mut capped = Vec::new();
        // The smallest of the limits; the reasons of those that bind.
        let mut least = |asked: usize, limits: Vec<(usize, String)>| {
            let n = limits.iter().map(|l| l.0).fold(asked, usize::min);
            if n < asked {
                capped.extend(limits.into_iter().filter(|l| l.0 == n).map(|l| l.1));
            }
            n
        };

        let mut session_limits = Vec::new();
        if let Some(p) = opts.parts {
            session_limits.push((
                p * budget,
                format!("{p} load-generator processes hold at most {budget} sessions each"),
            ));
        }
        if let Some(n) = opts.workers {
            session_limits.push((
                n * budget,
                format!("{n} gateway processes hold at most {budget} sessions each"),
            ));
        }
        let sessions = least(opts.sessions, session_limits);

        let ports = limits.ports_per_target.saturating_sub(PORT_MARGIN);
        // Every process of the run together: 2 per session (both ends) and 4 per stream
        // (both ends of the leg and of the target connection).
        let files = limits.files_free.saturating_sub(10 * FD_MARGIN);
        let mut stream_limits = vec![
            (
                usize::from(opts.targets) * ports,
                format!(
                    "the gateway's connections to {} target addresses have ~{ports} source ports each (--targets)",
                    opts.targets
                ),
            ),
            (
                files.saturating_sub(2 * sessions) / 4,
                format!("the system can open {} more files (fs.file-max)", limits.files_free),
            ),
            (
                sessions * budget.saturating_sub(1),
                format!("a session's streams must fit in one load-generator process ({budget} descriptors)"),
            ),
        ];
        // Process counts given: what they hold.
        if let Some(parts) = opts.parts {
            // The largest stream count whose busiest part fits (the load grows with it).
            let (mut lo, mut hi) = (0, opts.streams);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if part_load(sessions, mid, parts) <= budget {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            stream_limits.push((
                lo,
                format!("{parts} load-generator processes hold at most {budget} sessions and streams each"),
            ));
        }
        if let Some(holds) = opts.holds {
            stream_limits.push((
                (holds as f64 * budget as f64 / HOLD_SLACK) as usize,
                format!("{holds} target processes hold at most {budget} connections each"),
            ));
        }
        if let Some(workers) = opts.workers {
            stream_limits.push((
                (workers * budget).saturating_sub(sessions) / 2,
                format!(
                    "{workers} gateway processes hold at most {budget} descriptors each (one per session, two per stream)"
                ),
            ));
        }
        let streams = least(opts.streams, stream_limits);

        // The other counts: as many as the run needs.
        let parts = opts.parts.unwrap_or_else(|| {
            (1..=sessions)
                .find(|&p| part_load(sessions, streams, p) <= budget)
                .unwrap_or(sessions)
        });
        let holds = opts.holds.unwrap_or_else(|| {
            ((streams as f64 * HOLD_SLACK / budget as f64).ceil() as usize).max(1)
        });
        let workers = opts
            .workers
            .unwrap_or_else(|| (sessions + 2 * streams).div_ceil(budget).max(1));

        Plan {
            sessions,
            streams,
            storm: opts.storm.min(sessions),
            parts: parts.min(sessions).max(1),
            holds,
            workers,
            capped,
        }
    }

    /// Streams of session `i` (the first `streams % sessions` get one more).
    fn streams_of(&self, i: usize) -> usize {
        self.streams / self.sessions + usize::from(i < self.streams % self.sessions)
    }
}

/// Descriptors the busiest of `parts` load-generator parts holds for `sessions` sessions
/// and `streams` streams: part 0, which has the most sessions and the first of them (those
/// with one stream more, see [`Plan::streams_of`]).
fn part_load(sessions: usize, streams: usize, parts: usize) -> usize {
    let (sessions, parts) = (sessions.max(1), parts.max(1));
    let base = streams / sessions;
    let more = streams % sessions;
    sessions.div_ceil(parts) * (1 + base) + more.div_ceil(parts)
}

fn target_addr(k: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 3, k + 1), TARGET_PORT))
}

fn client_id(i: usize) -> String {
    format!("c{i:05}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn run_async(opts: &Options, baton: &Path, soft: usize, hard: usize) -> Result<()> {
    let limits = Limits::read(soft);
    let plan = Plan::fit(opts, &limits);
    for why in &plan.capped {
        eprintln!("[scale] capped: {why}");
    }
    let limited = plan.sessions < opts.sessions || plan.streams < opts.streams;
    if limited {
        eprintln!(
            "[scale] running {} sessions and {} streams instead of {} and {}",
            plan.sessions, plan.streams, opts.sessions, opts.streams
        );
    }
    eprintln!(
        "[scale] processes: {} load-generator parts, {} target processes, gateway workers = {}",
        plan.parts, plan.holds, plan.workers
    );
    let dir = std::env::temp_dir().join(format!("baton-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());

    eprintln!("[scale] generating {} client keys", plan.sessions);
    let rng = SystemRandom::new();
    let keys = (0..plan.sessions)
        .map(|_| ClientKey::generate(&rng))
        .collect::<Result<Vec<_>, _>>()?;
    write_keys(&dir.join("keys"), &keys)?;
    let gateway = SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port));
    write_gateway_config(
        &dir.join("gateway.toml"),
        gateway,
        &keys,
        opts.targets,
        &plan,
    )?;
    drop(keys);

    // SO_REUSEPORT would let a stray listener from another run share the addresses silently.
    for addr in (0..opts.targets).map(target_addr).chain([gateway]) {
        ensure!(
            TcpStream::connect(addr).await.is_err(),
            "something already listens on {addr}: another run? (--port for the gateway)"
        );
    }

    let exe = std::env::current_exe()?;
    let mut holds = Vec::with_capacity(plan.holds);
    for h in 0..plan.holds {
        let mut cmd = Command::new(&exe);
        cmd.arg("hold");
        for k in 0..opts.targets {
            cmd.arg("--listen").arg(target_addr(k).to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("hold{h}.log")))?);
        let mut child = ChildGuard::spawn(&mut cmd).context("starting a hold process")?;
        let lines = stdout_lines(&mut child)?;
        holds.push((child, lines));
    }
    for (h, (child, lines)) in holds.iter_mut().enumerate() {
        let what = format!("hold process {h}");
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line == "ready" => {}
            Ok(_) => {
                check_alive(child, &what)?;
                bail!("{what} did not say it was ready");
            }
            Err(_) => bail!("{what} did not listen within 20 s"),
        }
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
    wait_gateway(gateway, &mut gw, &dir.join("gateway.log")).await?;
    wait_workers(gw_pid, plan.workers).await;
    let gw_limit = nofile_limits(Path::new(&format!("/proc/{gw_pid}/limits")))?.0;

    let mut parts = Parts::spawn(&exe, &dir, &plan, opts)?;
    parts.ready().await?;

    let phase_timeout = Duration::from_secs(opts.phase_timeout);
    let mut report = Report {
        plan: plan.clone(),
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
    let replies = bounded(phase_timeout, "sessions", parts.phase(|_| Phase::Sessions)).await?;
    report.t_sessions = t.elapsed();
    report.cpu_sessions = cpu_seconds(gw_pid)? - cpu0;
    let opened: usize = replies.iter().map(|r| r.opened).sum();
    ensure!(
        opened == plan.sessions,
        "{opened} sessions opened, not {}",
        plan.sessions
    );
    settle().await;
    report.rss_sessions = rss_kib(gw_pid)?;
    gateway_alive(&mut gw, &dir.join("gateway.log"))?;

    // 2. Streams.
    eprintln!("[scale] opening {} idle streams", plan.streams);
    let cpu0 = cpu_seconds(gw_pid)?;
    let t = Instant::now();
    let replies = bounded(phase_timeout, "streams", parts.phase(|_| Phase::Streams)).await?;
    report.t_streams = t.elapsed();
    report.cpu_streams = cpu_seconds(gw_pid)? - cpu0;
    let opened: usize = replies.iter().map(|r| r.opened).sum();
    ensure!(
        opened == plan.streams,
        "{opened} streams opened, not {}",
        plan.streams
    );
    settle().await;
    report.rss_streams = rss_kib(gw_pid)?;
    report.fds_streams = count_fds(gw_pid);
    report.gw_procs = gateway_pids(gw_pid).len();
    gateway_alive(&mut gw, &dir.join("gateway.log"))?;

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
        // Far enough ahead for every part to have read its line.
        let start_unix_ms = unix_ms() + 200;
        let phase = Phase::Storm {
            from: range.start,
            to: range.end,
            window,
            start_unix_ms,
        };
        let replies = bounded(phase_timeout, "storm", parts.phase(|_| phase.clone())).await?;
        let mut storm = Storm::combine(&replies, window, start_unix_ms)?;
        storm.cpu = cpu_seconds(gw_pid)? - cpu0;
        report.storms.push(storm);
        settle().await;
        gateway_alive(&mut gw, &dir.join("gateway.log"))?;
    }
    report.rss_storm = rss_kib(gw_pid)?;

    // 5. Check: each part its share of the streams of each kind.
    let n = plan.parts;
    let replies = bounded(
        phase_timeout,
        "check",
        parts.phase(|p| Phase::Check {
            switched,
            n: opts.check / n + usize::from(p < opts.check % n),
        }),
    )
    .await?;
    for r in &replies {
        report.checked.0 += r.checked.0;
        report.checked.1 += r.checked.1;
        report.control.0 += r.control.relegs;
        report.control.1 += r.control.resets;
        report.control.2 += r.control.errors;
    }
    report.gateway_warnings = std::fs::read_to_string(dir.join("gateway.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    gateway_alive(&mut gw, &dir.join("gateway.log"))?;
    for (h, (child, _)) in holds.iter_mut().enumerate() {
        check_alive(child, &format!("hold process {h}"))?;
    }
    drop(parts);
    drop(gw);
    drop(holds);

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

type ChildLines = Lines<BufReader<tokio::process::ChildStdout>>;

/// The lines a child (started with a piped stdout) writes.
fn stdout_lines(child: &mut ChildGuard) -> Result<ChildLines> {
    let out = child.stdout.take().context("child without a stdout pipe")?;
    Ok(BufReader::new(tokio::process::ChildStdout::from_std(out)?).lines())
}

/// The load generator's parts, driven phase by phase over their stdin and stdout.
struct Parts {
    children: Vec<ChildGuard>,
    pipes: Vec<(tokio::process::ChildStdin, ChildLines)>,
}

impl Parts {
    fn spawn(exe: &Path, dir: &Path, plan: &Plan, opts: &Options) -> Result<Parts> {
        let mut parts = Parts {
            children: Vec::with_capacity(plan.parts),
            pipes: Vec::with_capacity(plan.parts),
        };
        for p in 0..plan.parts {
            let args = part::PartOptions {
                dir: dir.to_owned(),
                part: p,
                parts: plan.parts,
                sessions: plan.sessions,
                streams: plan.streams,
                concurrency: opts.concurrency.div_ceil(plan.parts),
                port: opts.port,
                targets: opts.targets,
            }
            .args();
            let mut child = ChildGuard::spawn(
                Command::new(exe)
                    .arg("scale-part")
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit()),
            )
            .context("starting a load-generator part")?;
            let stdin = child.stdin.take().context("part without a stdin pipe")?;
            let lines = stdout_lines(&mut child)?;
            parts
                .pipes
                .push((tokio::process::ChildStdin::from_std(stdin)?, lines));
            parts.children.push(child);
        }
        Ok(parts)
    }

    /// Waits for every part's first reply: its keys are loaded.
    async fn ready(&mut self) -> Result<()> {
        let waits = self
            .pipes
            .iter_mut()
            .enumerate()
            .map(|(p, (_, lines))| async move { read_reply(p, lines).await.map(drop) });
        tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::try_join_all(waits),
        )
        .await
        .map_err(|_| anyhow!("the load-generator parts did not start within 60 s"))??;
        Ok(())
    }

    /// Starts `phase(p)` in every part p at once and returns their replies once the last
    /// one is done; fails if one of them failed.
    async fn phase(&mut self, phase: impl Fn(usize) -> Phase) -> Result<Vec<Reply>> {
        let runs = self
            .pipes
            .iter_mut()
            .enumerate()
            .map(|(p, (stdin, lines))| {
                let line = phase(p).line() + "\n";
                async move {
                    stdin
                        .write_all(line.as_bytes())
                        .await
                        .with_context(|| format!("load-generator part {p} is gone"))?;
                    stdin.flush().await?;
                    read_reply(p, lines).await
                }
            });
        futures_util::future::try_join_all(runs).await
    }
}

async fn read_reply(p: usize, lines: &mut ChildLines) -> Result<Reply> {
    let line = lines
        .next_line()
        .await?
        .with_context(|| format!("load-generator part {p} exited (its errors are above)"))?;
    let reply: Reply = serde_json::from_str(&line)
        .with_context(|| format!("load-generator part {p} answered {line:?}"))?;
    if let Some(e) = &reply.error {
        bail!("load-generator part {p}: {e}");
    }
    Ok(reply)
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

/// Like [`check_alive`], with the end of the gateway's log (the run's folder is removed).
fn gateway_alive(gw: &mut ChildGuard, log: &Path) -> Result<()> {
    if let Err(e) = check_alive(gw, "baton gateway") {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        let hint = if text.contains("unknown field `workers`") {
            "\n(this gateway has no worker processes: --workers 1, or WORKERS=1 for scale.sh, runs \
             one gateway process and caps the streams to what it holds)"
        } else {
            ""
        };
        bail!("{e:#}; the end of its log:\n{tail}{hint}");
    }
    Ok(())
}

async fn wait_gateway(addr: SocketAddr, gw: &mut ChildGuard, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A connection that sends nothing: the gateway drops it after its handshake timeout.
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        gateway_alive(gw, log)?;
        ensure!(
            Instant::now() < deadline,
            "baton gateway did not listen on {addr} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Gives a gateway of `workers` > 1 up to 20 s to start them, so that its memory at start
/// counts them all; the table shows how many processes there were.
async fn wait_workers(pid: u32, workers: usize) {
    if workers <= 1 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway_pids(pid).len() < workers + 1 {
        if Instant::now() >= deadline {
            eprintln!(
                "[scale] the gateway runs {} processes, not 1 + {workers} workers",
                gateway_pids(pid).len()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The clients' secret keys, one a line in client order, readable by this user only.
fn write_keys(path: &Path, keys: &[ClientKey]) -> Result<()> {
    let mut text = String::with_capacity(keys.len() * 64);
    for k in keys {
        text.push_str(&k.to_text());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn write_gateway_config(
    path: &Path,
    listen: SocketAddr,
    keys: &[ClientKey],
    targets: u8,
    plan: &Plan,
) -> Result<()> {
    let mut s = String::new();
    // No keep-alives come from the load generator: the session must not be detached for
    // silence during the run.
    writeln!(
        s,
        "listen = [\"{listen}\"]\ninactivity_timeout = \"1h\"\nmax_sessions = {}",
        plan.sessions + 100
    )?;
    // Only when needed: a gateway without worker processes does not know the key.
    if plan.workers > 1 {
        writeln!(s, "workers = {}", plan.workers)?;
    }
    // The default (10,000) would refuse streams of runs with few sessions.
    if plan.streams_of(0) >= 10_000 {
        writeln!(s, "max_streams_per_session = {}", plan.streams_of(0) + 1)?;
    }
    writeln!(s)?;
    let services: Vec<String> = (0..targets).map(|k| format!("t{k}")).collect();
    for (k, name) in services.iter().enumerate() {
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

// ---- measurements of the gateway: its process and its direct children (the workers) ----

/// `pid` and its direct children.
fn gateway_pids(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if parent_pid(&status) == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

fn parent_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Resident memory of the gateway's processes, summed (KiB).
fn rss_kib(pid: u32) -> Result<u64> {
    let mut total = 0;
    for p in gateway_pids(pid) {
        match std::fs::read_to_string(format!("/proc/{p}/status")) {
            Ok(status) => total += vm_rss_kib(&status).context("no VmRSS in /proc/PID/status")?,
            // A child that just exited.
            Err(_) if p != pid => {}
            Err(e) => return Err(e).context("reading the gateway's /proc/PID/status"),
        }
    }
    Ok(total)
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// User and system CPU seconds of the gateway's processes (all their threads) so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ticks = 0;
    for p in gateway_pids(pid) {
        match std::fs::read_to_string(format!("/proc/{p}/stat")) {
            Ok(stat) => ticks += cpu_ticks(&stat).context("malformed /proc/PID/stat")?,
            Err(_) if p != pid => {}
            Err(e) => return Err(e).context("reading the gateway's /proc/PID/stat"),
        }
    }
    Ok(ticks as f64 / clock_ticks() as f64)
}

fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = stat.rfind(')').and_then(|i| stat.get(i + 2..))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime); the list starts at field 3.
    f.get(11..13)?.iter().map(|v| v.parse::<u64>().ok()).sum()
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

/// Open descriptors of the gateway's processes, summed.
fn count_fds(pid: u32) -> usize {
    gateway_pids(pid)
        .iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .sum()
}

/// A storm's outcome, over all the parts.
#[derive(Debug, Clone, Default)]
struct Storm {
    clients: usize,
    streams: usize,
    /// Seconds over which the switches started (0: all at once).
    window: f64,
    /// Gateway CPU seconds during the storm.
    cpu: f64,
    /// From the first switch's start to the last client fully resumed (in any part).
    span: Duration,
    /// Each client's own time from dropping its old connections to every leg resumed, sorted.
    per_client: Vec<Duration>,
    failures: Vec<String>,
}

impl Storm {
    fn combine(replies: &[Reply], window: f64, start_unix_ms: u64) -> Result<Storm> {
        let mut storm = Storm {
            window,
            ..Storm::default()
        };
        let mut last_done_us = start_unix_ms * 1_000;
        for (p, r) in replies.iter().enumerate() {
            let s = r
                .storm
                .as_ref()
                .with_context(|| format!("load-generator part {p} sent no storm result"))?;
            if s.late_us > 0 {
                eprintln!(
                    "[scale] load-generator part {p} started the storm {} ms late",
                    s.late_us / 1_000
                );
            }
            storm.clients += s.clients;
            storm.streams += s.streams;
            storm
                .per_client
                .extend(s.resumes_us.iter().map(|&us| Duration::from_micros(us)));
            last_done_us = last_done_us.max(s.last_done_unix_us);
            storm.failures.extend(s.failures.iter().cloned());
        }
        storm.per_client.sort();
        storm.span = Duration::from_micros(last_done_us - start_unix_ms * 1_000);
        Ok(storm)
    }
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
    /// Gateway processes (itself and its direct children) with everything open.
    gw_procs: usize,
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
        let workers = if p.workers > 1 {
            format!("`workers = {}` in its configuration", p.workers)
        } else {
            "no `workers` in its configuration".to_owned()
        };
        writeln!(
            out,
            "- processes, all on the same cores: `baton gateway` ({workers}; {} gateway process(es) seen), \
             {} load-generator process(es) (client i in process i mod {}), {} target process(es) sharing the \
             target addresses (SO_REUSEPORT); {} handshakes or legs in flight at most while opening",
            self.gw_procs, p.parts, p.parts, p.holds, opts.concurrency
        )?;
        writeln!(
            out,
            "- open-files limit (RLIMIT_NOFILE) of every process: soft {}, hard {}; gateway {}. A gateway process \
             needs a descriptor per session and two per stream (leg and target connection), a load-generator \
             process one per session and one per stream, a target process one per stream",
            self.soft, self.hard, self.gw_limit
        )?;
        if self.limited {
            writeln!(
                out,
                "- **asked for {} sessions and {} streams; ran {} and {}**: {}. See the projection below.",
                opts.sessions,
                opts.streams,
                p.sessions,
                p.streams,
                p.capped.join("; ")
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
            "gateway processes (the gateway and its workers)",
            format!("{}", self.gw_procs),
        )?;
        row(
            "gateway descriptors with everything open (all its processes)",
            format!("{}", self.fds_streams),
        )?;
        row(
            "gateway RSS at start (all its processes)",
            mib(self.rss_start),
        )?;
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
                 {:.0} MiB of gateway RSS and 210,000+ descriptors over the gateway's processes (the load \
                 generator's 110,000, the targets' 100,000).",
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
/// per idle connection. Several hold processes share the addresses (SO_REUSEPORT: the
/// kernel spreads the connections over them); each writes `ready` on its stdout once it
/// listens on all of them.
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
            sock.set_reuseport(true)?;
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
        println!("ready");
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

    const HERE: Limits = Limits {
        nofile: 20_000,
        ports_per_target: 28_232,
        files_free: 2_400_000,
    };

    fn fit(args: &[&str], limits: &Limits) -> Plan {
        Plan::fit(&opts(args), limits)
    }

    #[test]
    fn plan_spreads_every_role_over_enough_processes() {
        // 20,000 descriptors: 18,500 per process after the margin. A part holds 1,667
        // sessions with 10 streams each (18,337); 105,000 held connections need 6 hold
        // processes; the gateway 210,000 descriptors, 12 workers.
        let p = fit(&[], &HERE);
        assert_eq!((p.sessions, p.streams, p.storm), (10_000, 100_000, 1_000));
        assert_eq!((p.parts, p.holds, p.workers), (6, 6, 12));
        assert!(p.capped.is_empty(), "{:?}", p.capped);
        let p = fit(&["--sessions", "1000", "--streams", "4000"], &HERE);
        assert_eq!((p.parts, p.holds, p.workers), (1, 1, 1));
        let p = fit(
            &["--sessions", "100", "--streams", "1000", "--storm", "500"],
            &Limits {
                nofile: 1_048_576,
                ..HERE
            },
        );
        assert_eq!((p.sessions, p.streams, p.storm), (100, 1_000, 100));
        assert_eq!((p.parts, p.holds, p.workers), (1, 1, 1));
    }

    #[test]
    fn plan_with_one_process_each_caps_as_before() {
        // The gateway first: a descriptor per session, then two per stream.
        let one = ["--parts", "1", "--holds", "1", "--workers", "1"];
        let p = fit(&one, &HERE);
        assert_eq!((p.sessions, p.streams, p.storm), (10_000, 4_250, 1_000));
        assert_eq!(p.capped.len(), 1, "{:?}", p.capped);
        assert!(
            p.capped[0].starts_with("1 gateway processes"),
            "{:?}",
            p.capped
        );
        let p = fit(&[&one[..], &["--sessions", "1000"]].concat(), &HERE);
        assert_eq!((p.sessions, p.streams), (1_000, 8_750));
        // Only the gateway fixed: the others are sized for what it holds.
        let p = fit(&["--workers", "1"], &HERE);
        assert_eq!((p.streams, p.parts, p.holds, p.workers), (4_250, 1, 1, 1));
        // A part's limit: 18,500 - 1,000 sessions.
        let p = fit(&["--sessions", "1000", "--parts", "1"], &HERE);
        assert_eq!((p.streams, p.workers), (17_500, 2));
    }

    #[test]
    fn plan_caps_what_the_machine_cannot_hold() {
        // 3 targets × 27,232 source ports.
        let p = fit(&["--targets", "3"], &HERE);
        assert_eq!(p.streams, 81_696);
        assert!(p.capped[0].contains("source ports"), "{:?}", p.capped);
        let p = fit(
            &[],
            &Limits {
                files_free: 215_000,
                ..HERE
            },
        );
        // (215,000 - 15,000 - 2 × 10,000) / 4.
        assert_eq!(p.streams, 45_000);
        assert!(p.capped[0].contains("file-max"), "{:?}", p.capped);
        // A session's streams cannot be split over processes.
        let p = fit(&["--sessions", "1", "--streams", "30000"], &HERE);
        assert_eq!((p.streams, p.parts, p.workers), (18_499, 1, 2));
    }

    #[test]
    fn the_busiest_part_is_part_0() {
        for (sessions, streams, parts) in [(10, 25, 3), (7, 7, 2), (10_000, 100_000, 6), (5, 0, 5)]
        {
            let plan = Plan {
                sessions,
                streams,
                ..Plan::default()
            };
            let loads: Vec<usize> = (0..parts)
                .map(|p| {
                    (0..sessions)
                        .filter(|i| i % parts == p)
                        .map(|i| 1 + plan.streams_of(i))
                        .sum()
                })
                .collect();
            assert_eq!(
                loads.iter().max().copied(),
                Some(part_load(sessions, streams, parts)),
                "{sessions} sessions, {streams} streams, {parts} parts: {loads:?}"
            );
        }
    }

    #[test]
    fn storms_of_the_parts_add_up() {
        let part = |resumes_us: Vec<u64>, last_done_unix_us, failures: Vec<String>| Reply {
            storm: Some(part::StormPart {
                clients: resumes_us.len() + failures.len(),
                streams: 10,
                resumes_us,
                last_done_unix_us,
                late_us: 0,
                failures,
            }),
            ..Reply::default()
        };
        let replies = [
            part(vec![3_000, 1_000], 5_000_400_000, vec![]),
            part(vec![2_000], 5_001_250_000, vec!["c00001: refused".into()]),
            part(vec![], 5_000_000_000, vec![]),
        ];
        let s = Storm::combine(&replies, 1.0, 5_000_000).unwrap();
        assert_eq!((s.clients, s.streams), (4, 30));
        assert_eq!(s.span, Duration::from_millis(1_250));
        assert_eq!(s.per_client, [1, 2, 3].map(Duration::from_millis).to_vec());
        assert_eq!(s.failures.len(), 1);
        assert!(Storm::combine(&[Reply::default()], 0.0, 0).is_err());
    }

    #[test]
    fn reads_the_gateways_processes() {
        let status = "Name:\tbaton\nUmask:\t0022\nState:\tS (sleeping)\nPid:\t4242\nPPid:\t4200\nVmRSS:\t   21504 kB\n";
        assert_eq!(parent_pid(status), Some(4_200));
        assert_eq!(vm_rss_kib(status), Some(21_504));
        let stat = "4242 (baton gw) S 4200 4242 4200 0 -1 4194560 1181 0 0 0 150 30 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(180));
        assert_eq!(cpu_ticks("4242 (baton"), None);
        let me = std::process::id();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pids = gateway_pids(me);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pids[0], me);
        assert!(pids.contains(&child.id()), "{pids:?}");
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(count_fds(me) >= 3);
    }

    #[test]
    fn workers_are_configured_only_when_more_than_one() {
        let dir = std::env::temp_dir().join(format!("baton-scale-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = vec![ClientKey::generate(&SystemRandom::new()).unwrap()];
        let gw = SocketAddr::from((Ipv4Addr::LOCALHOST, 17800));
        let f = dir.join("gateway.toml");
        let mut plan = fit(&["--sessions", "1", "--streams", "1"], &HERE);
        write_gateway_config(&f, gw, &keys, 2, &plan).unwrap();
        let one = std::fs::read_to_string(&f).unwrap();
        assert!(!one.contains("workers"), "{one}");
        plan.workers = 3;
        write_gateway_config(&f, gw, &keys, 2, &plan).unwrap();
        let three = std::fs::read_to_string(&f).unwrap();
        // A top-level key: before the first table.
        let at = three.find("workers = 3\n").unwrap();
        assert!(at < three.find("\n[").unwrap(), "{three}");
        write_keys(&dir.join("keys"), &keys).unwrap();
        let back = std::fs::read_to_string(dir.join("keys")).unwrap();
        assert_eq!(
            ClientKey::from_text(back.lines().next().unwrap())
                .unwrap()
                .public(),
            keys[0].public()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streams_are_spread_evenly() {
        let p = Plan {
            sessions: 4,
            streams: 10,
            ..Plan::default()
        };
        let per: Vec<usize> = (0..4).map(|i| p.streams_of(i)).collect();
        assert_eq!(per, [3, 3, 2, 2]);
        assert_eq!(per.iter().sum::<usize>(), 10);
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
