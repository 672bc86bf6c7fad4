//! `baton-bench handover`: how long the data stops when a device changes networks, for
//! baton, kernel MPTCP and plain TCP, side by side in one run in a namespace bed
//! (`baton-netbed`: MOBILE with `wlan` and `lte`, ROUTER, SERVER).
//!
//! Each run is one system and one event in a fresh bed with wlan and lte delayed (10 and
//! 40 ms one way by default). An application pair sends a steady paced stream each way
//! (2 MiB/s by default); each receiver checks every byte against its pattern and notes when
//! each read returned data. After a warm-up the event happens (a planned switch to lte, wlan
//! going down, or wlan's address replaced); the **gap** is the longest time between two
//! reads that returned data, from the last read before the event to the end of the
//! observation window. A receiver with no data in the window's last second has **not
//! recovered**.
//!
//! With `--streams N` the application pair opens N connections (N streams in one baton
//! session), shares the pace among them, and the gap is the longest any stream saw: what it
//! costs to move many streams at once.
//!
//! Needs root; the baton binary is taken from next to this one (`cargo build --release -p
//! baton -p baton-bench`) unless `--baton` says otherwise.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use baton_netbed::{run_bounded, Bed, ChildGuard, Host, Link};
use baton_runtime::verify::{Checker, Dir, Pattern};
use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Options of `baton-bench handover`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Pace of each direction, in MiB/s.
    #[arg(long, default_value_t = 2.0)]
    pace: f64,
    /// Seconds of steady traffic before the event.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds observed after the event: the bound of "no recovery".
    #[arg(long, default_value_t = 6.0)]
    window: f64,
    /// One-way delay of wlan, in ms.
    #[arg(long, default_value_t = 10)]
    wlan_delay: u32,
    /// One-way delay of lte, in ms.
    #[arg(long, default_value_t = 40)]
    lte_delay: u32,
    /// Systems to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baton,mptcp-backup,mptcp,tcp"
    )]
    systems: Vec<System>,
    /// Events, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "planned,down,readdress")]
    events: Vec<Event>,
    /// Application connections (streams) per run, comma-separated for several runs: the
    /// pace is shared among them and the gap is the longest any of them saw.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    streams: Vec<usize>,
    /// Runs of each (system, event); the median gap is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The baton binary (default: `baton` next to this program).
    #[arg(long)]
    baton: Option<PathBuf>,
    /// `threads` of baton's agent and gateway (default: baton's own defaults).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// Where the markdown table goes.
    #[arg(long, default_value = "bench/results/handover.md")]
    out: PathBuf,
}

/// What carries the application's bytes.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum System {
    /// baton: client agent in MOBILE (kernel mode), gateway in SERVER.
    Baton,
    /// Kernel MPTCP, lte as a backup subflow (`ip mptcp endpoint ... subflow backup`).
    MptcpBackup,
    /// Kernel MPTCP, lte as a regular subflow (both subflows carry data).
    Mptcp,
    /// One plain TCP connection.
    Tcp,
}

impl System {
    fn title(self) -> &'static str {
        match self {
            Self::Baton => "baton",
            Self::MptcpBackup => "MPTCP, lte backup",
            Self::Mptcp => "MPTCP, lte subflow",
            Self::Tcp => "TCP",
        }
    }
}

/// What happens to the network.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A planned move to lte while wlan still works: `baton switch lte`; for MPTCP the
    /// endpoints' backup flags are swapped (MP_PRIO); plain TCP cannot move.
    Planned,
    /// `ip link set wlan down` on MOBILE.
    Down,
    /// wlan's address replaced (10.81.1.2 → 10.81.1.7).
    Readdress,
}

impl Event {
    fn title(self) -> &'static str {
        match self {
            Self::Planned => "planned switch wlan → lte",
            Self::Down => "wlan link down",
            Self::Readdress => "wlan re-addressed",
        }
    }

    /// The target for baton's gap, from the design: a planned switch should stall no more
    /// than one round trip of the new path plus 20 ms; after a link loss data should flow
    /// again within 250 ms.
    fn target(self, lte_rtt: Duration) -> Duration {
        match self {
            Self::Planned => lte_rtt + Duration::from_millis(20),
            Self::Down | Self::Readdress => Duration::from_millis(250),
        }
    }
}

/// The longest pause one receiver saw.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gap {
    /// Data flowed again; the longest pause.
    Resumed(Duration),
    /// No data in the window's last second: the pause had lasted this long when observation
    /// ended.
    NoRecovery(Duration),
    /// The system cannot do this (plain TCP has no planned switch).
    NotApplicable,
}

impl Gap {
    fn sort_key(self) -> Duration {
        match self {
            Self::Resumed(d) => d,
            Self::NoRecovery(_) | Self::NotApplicable => Duration::MAX,
        }
    }

    fn cell(self, window: Duration) -> String {
        match self {
            Self::Resumed(d) => format!("{} ms", d.as_millis()),
            Self::NoRecovery(_) => format!("no recovery in {} s", window.as_secs_f64()),
            Self::NotApplicable => "n/a".into(),
        }
    }
}

/// One run's result.
#[derive(Debug, Clone)]
struct Outcome {
    /// Server → mobile, seen by the mobile application.
    down: Gap,
    /// Mobile → server, seen by the server application.
    up: Gap,
    /// Every byte received matched; no receiver saw an error.
    exact: bool,
    /// What else is worth knowing (baton's switch record, errors).
    note: String,
}

const MIB: f64 = (1u64 << 20) as f64;
const APP_PORT: u16 = 9200;
const GATEWAY_PORT: u16 = 7700;
const SERVICE_PORT: u16 = 15000;
/// Paced writes of this size: at 2 MiB/s one every 8 ms.
const CHUNK: usize = 16 * 1024;
/// Receivers with nothing in the window's last stretch of this length have not recovered.
const RECOVERED_SLACK: Duration = Duration::from_secs(1);

/// Runs the benchmark and writes the table.
pub(crate) fn run(opts: &Options) -> Result<()> {
    ensure!(nix_is_root(), "needs root (network namespaces)");
    ensure!(
        opts.pace > 0.0 && opts.window > 1.5 && opts.warmup >= 0.5 && opts.rounds > 0,
        "bad --pace/--window/--warmup/--rounds"
    );
    ensure!(
        !opts.streams.is_empty() && opts.streams.iter().all(|&n| (1..=1000).contains(&n)),
        "--streams: 1 to 1000 each"
    );
    let baton = match &opts.baton {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("baton"),
    };
    if opts.systems.contains(&System::Baton) {
        ensure!(baton.exists(), "{} not found: build it first (cargo build --release -p baton -p baton-bench) or pass --baton", baton.display());
    }
    let window = Duration::from_secs_f64(opts.window);
    let mut results: Vec<(Event, Column, Vec<Outcome>)> = Vec::new();
    let mut lte_rtt = Duration::from_millis(2 * u64::from(opts.lte_delay));
    let columns = columns(opts);
    for &event in &opts.events {
        for &column in &columns {
            let Column { system, streams } = column;
            let mut outs = Vec::new();
            for round in 0..opts.rounds {
                eprintln!(
                    "[handover] {} / {} (round {})",
                    event.title(),
                    column.title(opts),
                    round + 1
                );
                let o = if system == System::Tcp && event == Event::Planned {
                    Outcome {
                        down: Gap::NotApplicable,
                        up: Gap::NotApplicable,
                        exact: true,
                        note: String::new(),
                    }
                } else {
                    let (o, rtt) = run_one(opts, &baton, system, event, streams)
                        .with_context(|| format!("{} / {}", event.title(), column.title(opts)))?;
                    if let Some(rtt) = rtt {
                        lte_rtt = rtt;
                    }
                    o
                };
                eprintln!(
                    "[handover]   server→mobile {}, mobile→server {}{}{}",
                    o.down.cell(window),
                    o.up.cell(window),
                    if o.exact { "" } else { ", NOT EXACT" },
                    if o.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", o.note)
                    }
                );
                outs.push(o);
            }
            results.push((event, column, outs));
        }
    }
    let table = render(opts, &results, lte_rtt)?;
    println!("{table}");
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.out, &table).with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("[handover] written to {}", opts.out.display());
    Ok(())
}

fn nix_is_root() -> bool {
    // Without libc: the effective uid is in /proc/self/status ("Uid: real effective ...").
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A column of the table: a system with a number of streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Column {
    system: System,
    streams: usize,
}

impl Column {
    /// The system's name, with the streams when several counts are compared.
    fn title(self, opts: &Options) -> String {
        match (opts.streams.len(), self.streams) {
            (1, 1) => self.system.title().to_owned(),
            (_, 1) => format!("{}, 1 stream", self.system.title()),
            (_, n) => format!("{}, {n} streams", self.system.title()),
        }
    }
}

/// Every (system, streams) pair, grouped by stream count so that each group reads like
/// the single-count table.
fn columns(opts: &Options) -> Vec<Column> {
    opts.streams
        .iter()
        .flat_map(|&streams| {
            opts.systems
                .iter()
                .map(move |&system| Column { system, streams })
        })
        .collect()
}

fn median_gap(outs: &[Outcome], pick: impl Fn(&Outcome) -> Gap) -> Gap {
    let mut v: Vec<Gap> = outs.iter().map(pick).collect();
    v.sort_by_key(|g| g.sort_key());
    v[v.len() / 2]
}

fn render(
    opts: &Options,
    results: &[(Event, Column, Vec<Outcome>)],
    lte_rtt: Duration,
) -> Result<String> {
    let window = Duration::from_secs_f64(opts.window);
    let mut out = String::new();
    writeln!(out, "# baton handover benchmark\n")?;
    let date = command_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    let commit = command_line(Command::new("git").args(["describe", "--always", "--dirty"]));
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = command_line(Command::new("uname").arg("-r"));
    writeln!(
        out,
        "- date: {date}; commit: {commit}; machine: {cores} cores, Linux {kernel}"
    )?;
    writeln!(
        out,
        "- bed: wlan {} ms and lte {} ms one way (lte round trip measured {} ms); {} MiB/s each way; \
         {} s warm-up, {} s observed after the event; {} round(s), median shown",
        opts.wlan_delay,
        opts.lte_delay,
        lte_rtt.as_millis(),
        opts.pace,
        opts.warmup,
        opts.window,
        opts.rounds
    )?;
    if opts.streams.iter().any(|&n| n > 1) {
        writeln!(
            out,
            "- streams: the application pair opens that many connections (one baton session) and shares the pace among them"
        )?;
        writeln!(out, "- gap: longest pause between two reads that returned data, at the receiving application, the worst of all streams\n")?;
    } else {
        writeln!(out, "- gap: longest pause between two reads that returned data, at the receiving application\n")?;
    }
    let systems = columns(opts);
    write!(out, "| event | direction |")?;
    for s in &systems {
        write!(out, " {} |", s.title(opts))?;
    }
    writeln!(out, " baton target |")?;
    write!(out, "| --- | --- |")?;
    for _ in &systems {
        write!(out, " --- |")?;
    }
    writeln!(out, " --- |")?;
    for &event in &opts.events {
        for (dir, name) in [(true, "server → mobile"), (false, "mobile → server")] {
            write!(out, "| {} | {name} |", event.title())?;
            let gap_of = |s: Column| {
                results
                    .iter()
                    .find(|(e, col, _)| *e == event && *col == s)
                    .map(|(_, _, outs)| median_gap(outs, |o| if dir { o.down } else { o.up }))
            };
            for &s in &systems {
                let Some(g) = gap_of(s) else {
                    write!(out, " - |")?;
                    continue;
                };
                let baton = gap_of(Column {
                    system: System::Baton,
                    ..s
                });
                let mut cell = g.cell(window);
                match (s.system, g, baton) {
                    (System::Baton, Gap::Resumed(d), _) => {
                        cell += if d <= event.target(lte_rtt) {
                            " ✓"
                        } else {
                            " ✗"
                        };
                    }
                    (System::Baton, ..) => cell += " ✗",
                    (_, Gap::Resumed(d), Some(Gap::Resumed(b))) if !b.is_zero() => {
                        write!(cell, " ({:.1}×)", d.as_secs_f64() / b.as_secs_f64())?;
                    }
                    _ => {}
                }
                write!(out, " {cell} |")?;
            }
            writeln!(out, " ≤ {} ms |", event.target(lte_rtt).as_millis())?;
        }
    }
    writeln!(out, "\n(×: the system's gap divided by baton's with as many streams; ✓/✗: baton within its target or not.)\n")?;
    let mut notes = String::new();
    for (event, column, outs) in results {
        for (i, o) in outs.iter().enumerate() {
            if !o.exact || !o.note.is_empty() {
                writeln!(
                    notes,
                    "- {} / {} (round {}): {}{}",
                    event.title(),
                    column.title(opts),
                    i + 1,
                    if o.exact {
                        "bytes exact"
                    } else {
                        "NOT EXACT or a receiver failed"
                    },
                    if o.note.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", o.note)
                    }
                )?;
            }
        }
    }
    if !notes.is_empty() {
        writeln!(out, "Notes:\n\n{notes}")?;
    }
    Ok(out)
}

pub(crate) fn command_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "?".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// Runs one (system, event) in a fresh bed; also returns the lte round trip measured there.
fn run_one(
    opts: &Options,
    baton: &Path,
    system: System,
    event: Event,
    streams: usize,
) -> Result<(Outcome, Option<Duration>)> {
    let bed = Bed::new(&format!(
        "ho_{}",
        system.title().split(',').next().unwrap_or("x")
    ))?;
    bed.set_delay(Link::Wlan, opts.wlan_delay)?;
    bed.set_delay(Link::Lte, opts.lte_delay)?;
    let lte_rtt = bed.ping_rtt(Link::Lte).ok();
    let server = SocketAddr::from((bed.server_addr(), APP_PORT));
    let mut baton_rig = None;
    let (listener, connect_to, mptcp) = match system {
        System::Baton => {
            let rig = BatonRig::start(&bed, baton, server, opts.threads)?;
            baton_rig = Some(rig);
            (
                listen(&bed, server, false)?,
                SocketAddr::from((Ipv4Addr::LOCALHOST, SERVICE_PORT)),
                false,
            )
        }
        System::MptcpBackup | System::Mptcp => {
            mptcp_setup(&bed, system == System::MptcpBackup)?;
            (listen(&bed, server, true)?, server, true)
        }
        System::Tcp => (listen(&bed, server, false)?, server, false),
    };
    // One connection at a time, so that each accepted one is the pair of the one just made.
    let mut pairs = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mobile = bed
            .in_ns(Host::Mobile, || -> io::Result<TcpStream> {
                let s = Socket::new(
                    Domain::IPV4,
                    Type::STREAM,
                    Some(if mptcp {
                        Protocol::MPTCP
                    } else {
                        Protocol::TCP
                    }),
                )?;
                s.connect_timeout(&SockAddr::from(connect_to), Duration::from_secs(5))?;
                Ok(s.into())
            })?
            .with_context(|| format!("connecting to {connect_to}"))?;
        let (srv, _) = accept_within(&listener, Duration::from_secs(10))?;
        pairs.push((mobile, srv));
    }
    // The pace is shared; writes stay ~8 ms apart whatever the stream count, so that the
    // gap measures the switch and not the pacing.
    let pace = opts.pace * MIB / streams as f64;
    let chunk = ((pace * 0.008) as usize).clamp(64, CHUNK);
    let stop = Arc::new(AtomicBool::new(false));
    let seed = 0x4a11_0000 + system as u64 * 16 + event as u64;
    let mut flows = Vec::with_capacity(2 * streams);
    for (i, (mobile, srv)) in pairs.iter().enumerate() {
        let seed = seed + ((i as u64) << 32);
        flows.push(FlowEnds {
            from: srv.try_clone()?,
            to: mobile.try_clone()?,
            seed,
            dir: Dir::Down,
        });
        flows.push(FlowEnds {
            from: mobile.try_clone()?,
            to: srv.try_clone()?,
            seed,
            dir: Dir::Up,
        });
    }
    let traffic = Traffic::start(flows, pace, chunk, &stop)?;
    let warm = Instant::now();
    if mptcp {
        // The second subflow joins once data has flowed (the connection is then fully
        // established); it must be there before anything happens.
        if let Err(e) = wait_subflows(&bed, 2 * streams, Duration::from_secs(5)) {
            stop.store(true, Ordering::Relaxed);
            traffic.finish();
            return Err(e);
        }
    }
    std::thread::sleep(Duration::from_secs_f64(opts.warmup).saturating_sub(warm.elapsed()));
    let t0 = Instant::now();
    let mut note = String::new();
    match event {
        Event::Planned => match system {
            System::Baton => {
                if let Some(rig) = &baton_rig {
                    rig.switch("lte")?;
                }
            }
            System::MptcpBackup => {
                ip_mptcp(&bed, &["endpoint", "change", "id", "2", "nobackup"])?;
                ip_mptcp(&bed, &["endpoint", "change", "id", "1", "backup"])?;
            }
            System::Mptcp => ip_mptcp(&bed, &["endpoint", "change", "id", "1", "backup"])?,
            System::Tcp => {}
        },
        Event::Down => bed.link_down(Link::Wlan)?,
        Event::Readdress => bed.readdress(Link::Wlan, 7)?,
    }
    let event_cost = t0.elapsed();
    std::thread::sleep(Duration::from_secs_f64(opts.window).saturating_sub(event_cost));
    let end = Instant::now();
    if let Some(rig) = &baton_rig {
        note = rig.switch_note();
    }
    stop.store(true, Ordering::Relaxed);
    let received = traffic.finish();
    for (mobile, srv) in &pairs {
        let _ = mobile.shutdown(std::net::Shutdown::Both);
        let _ = srv.shutdown(std::net::Shutdown::Both);
    }
    let mut exact = true;
    let (mut downs, mut ups) = (Vec::new(), Vec::new());
    for (i, (dir, r)) in received.iter().enumerate() {
        let what = if *dir == Dir::Down {
            "mobile receiver"
        } else {
            "server receiver"
        };
        if let Some(e) = &r.error {
            // One line per kind of failure is enough with many streams.
            if !note.contains(what) {
                if !note.is_empty() {
                    note += "; ";
                }
                note += &format!("{what} (stream {}): {e}", i / 2);
            }
        }
        exact &= r.mismatch.is_none() && r.error.is_none();
        if *dir == Dir::Down {
            downs.push(r.gap(t0, end))
        } else {
            ups.push(r.gap(t0, end))
        }
    }
    let worst = |v: &[Gap]| {
        v.iter()
            .copied()
            .max_by_key(|g| g.sort_key())
            .unwrap_or(Gap::NotApplicable)
    };
    if streams > 1 {
        let mid = |v: &mut Vec<Gap>| {
            v.sort_by_key(|g| g.sort_key());
            v[v.len() / 2].cell(Duration::from_secs_f64(opts.window))
        };
        if !note.is_empty() {
            note += "; ";
        }
        note += &format!(
            "median stream: server→mobile {}, mobile→server {}",
            mid(&mut downs.clone()),
            mid(&mut ups.clone())
        );
    }
    let outcome = Outcome {
        down: worst(&downs),
        up: worst(&ups),
        exact,
        note,
    };
    drop(baton_rig);
    drop(bed);
    Ok((outcome, lte_rtt))
}

fn listen(bed: &Bed, addr: SocketAddr, mptcp: bool) -> Result<std::net::TcpListener> {
    let l = bed.in_ns(Host::Server, || -> io::Result<std::net::TcpListener> {
        let s = Socket::new(
            Domain::IPV4,
            Type::STREAM,
            Some(if mptcp {
                Protocol::MPTCP
            } else {
                Protocol::TCP
            }),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(addr))?;
        s.listen(16)?;
        Ok(s.into())
    })??;
    Ok(l)
}

fn accept_within(l: &std::net::TcpListener, limit: Duration) -> Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => bail!("accept: {e}"),
        }
    }
}

fn ip_mptcp(bed: &Bed, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip", "mptcp"];
    full.extend_from_slice(args);
    let out = bed.exec(Host::Mobile, &full)?;
    ensure!(
        out.status.success(),
        "{}: {}",
        full.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// MPTCP on in MOBILE and SERVER; endpoints on MOBILE: wlan (id 1, the initial subflow's
/// address, listed so that its backup flag can be changed) and lte (id 2) as an extra
/// subflow, backup or not.
fn mptcp_setup(bed: &Bed, lte_backup: bool) -> Result<()> {
    for host in [Host::Mobile, Host::Server] {
        // Per namespace: /proc/sys/net is the opener's namespace's.
        bed.in_ns(host, || std::fs::write("/proc/sys/net/mptcp/enabled", "1"))?
            .context("net.mptcp.enabled (kernel without MPTCP?)")?;
        let args = [
            "ip",
            "mptcp",
            "limits",
            "set",
            "subflow",
            "2",
            "add_addr_accepted",
            "2",
        ];
        let out = bed.exec(host, &args)?;
        ensure!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wlan = bed.mobile_addr(Link::Wlan).to_string();
    let lte = bed.mobile_addr(Link::Lte).to_string();
    ip_mptcp(
        bed,
        &[
            "endpoint", "add", &wlan, "dev", "wlan", "id", "1", "subflow",
        ],
    )?;
    let mut args = vec!["endpoint", "add", &lte, "dev", "lte", "id", "2", "subflow"];
    if lte_backup {
        args.push("backup");
    }
    ip_mptcp(bed, &args)
}

/// Waits until MOBILE has `n` established MPTCP subflows (TCP connections to the app port).
fn wait_subflows(bed: &Bed, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let out = bed.exec(
            Host::Mobile,
            &[
                "ss",
                "-tnH",
                "state",
                "established",
                &format!("dport = :{APP_PORT}"),
            ],
        )?;
        let count = String::from_utf8_lossy(&out.stdout).lines().count();
        if count >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let show = |args: &[&str]| {
                bed.exec(Host::Mobile, args)
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            bail!(
                "only {count} of {n} MPTCP subflows established within {limit:?}\n{}\n{}\n{}",
                show(&["ss", "-tniM"]),
                show(&["ip", "mptcp", "endpoint", "show"]),
                show(&["nstat", "-az", "MPTcp*"])
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One direction of one stream of the application traffic: the socket its paced sender
/// writes and the one its checking receiver reads.
struct FlowEnds {
    from: TcpStream,
    to: TcpStream,
    seed: u64,
    dir: Dir,
}

/// The application traffic of a run: every flow's sender and receiver are tasks of one
/// thread, as in an event-driven application. (A thread each made 400 threads at 100
/// streams, waking every 8 ms: together most of a core of the 2-core machines this runs on,
/// taken from the systems measured.)
struct Traffic {
    thread: JoinHandle<Vec<(Dir, Received)>>,
}

impl Traffic {
    fn start(
        flows: Vec<FlowEnds>,
        pace: f64,
        chunk: usize,
        stop: &Arc<AtomicBool>,
    ) -> Result<Traffic> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("app-traffic".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut tasks = Vec::with_capacity(flows.len());
                    for f in flows {
                        let (s1, s2) = (stop.clone(), stop.clone());
                        let sender =
                            tokio::spawn(send_paced(f.from, f.seed, f.dir, pace, chunk, s1));
                        let receiver = tokio::spawn(receive(f.to, f.seed, f.dir, s2));
                        tasks.push((f.dir, sender, receiver));
                    }
                    let mut out = Vec::with_capacity(tasks.len());
                    for (dir, sender, receiver) in tasks {
                        let mut r = receiver.await.unwrap_or_else(|_| Received {
                            times: Vec::new(),
                            mismatch: None,
                            error: Some("receiver panicked".into()),
                        });
                        match sender.await {
                            Ok(Err(e)) => {
                                r.error.get_or_insert_with(|| format!("sender: {e}"));
                            }
                            Err(_) => {
                                r.error.get_or_insert_with(|| "sender panicked".into());
                            }
                            Ok(Ok(_)) => {}
                        }
                        out.push((dir, r));
                    }
                    out
                })
            })?;
        Ok(Traffic { thread })
    }

    /// What each flow's receiver saw, in the order the flows were given; call once the
    /// stop flag is set.
    fn finish(self) -> Vec<(Dir, Received)> {
        self.thread.join().unwrap_or_default()
    }
}

/// What a receiver saw.
struct Received {
    /// When each read that returned data returned.
    times: Vec<Instant>,
    mismatch: Option<u64>,
    error: Option<String>,
}

impl Received {
    /// The longest pause from the last read before `t0` to `end`.
    fn gap(&self, t0: Instant, end: Instant) -> Gap {
        let start = self
            .times
            .iter()
            .rev()
            .find(|t| **t <= t0)
            .copied()
            .unwrap_or(t0);
        let mut prev = start;
        let mut longest = Duration::ZERO;
        for &t in self.times.iter().filter(|t| **t > start && **t <= end) {
            longest = longest.max(t - prev);
            prev = t;
        }
        if end.duration_since(prev) >= RECOVERED_SLACK {
            Gap::NoRecovery(end - start)
        } else {
            Gap::Resumed(longest)
        }
    }
}

/// How long a sender or receiver waits before it looks at the stop flag again.
const STOP_POLL: Duration = Duration::from_millis(100);

async fn send_paced(
    s: TcpStream,
    seed: u64,
    dir: Dir,
    pace: f64,
    chunk: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<u64> {
    use tokio::io::AsyncWriteExt as _;
    let _ = s.set_nodelay(true);
    s.set_nonblocking(true)?;
    let mut s = tokio::net::TcpStream::from_std(s)?;
    let mut pattern = Pattern::new(seed, dir);
    let mut buf = vec![0u8; chunk];
    let (mut off, mut len) = (0, 0);
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if off == len {
            let due = start + Duration::from_secs_f64(sent as f64 / pace);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep((due - now).min(STOP_POLL)).await;
                continue;
            }
            pattern.fill(&mut buf);
            (off, len) = (0, buf.len());
        }
        match tokio::time::timeout(STOP_POLL, s.write(&buf[off..len])).await {
            Ok(Ok(n)) => {
                off += n;
                sent += n as u64;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
    }
    Ok(sent)
}

async fn receive(s: TcpStream, seed: u64, dir: Dir, stop: Arc<AtomicBool>) -> Received {
    use tokio::io::AsyncReadExt as _;
    let mut r = Received {
        times: Vec::with_capacity(4096),
        mismatch: None,
        error: None,
    };
    let s = s
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(s));
    let mut s = match s {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    let mut checker = Checker::new(seed, dir);
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(STOP_POLL, s.read(&mut buf)).await {
            Ok(Ok(0)) => {
                r.error = Some("closed by the peer".into());
                break;
            }
            Ok(Ok(n)) => {
                r.times.push(Instant::now());
                checker.check(&buf[..n]);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                r.error = Some(e.to_string());
                break;
            }
            Err(_) => {}
        }
    }
    r.mismatch = checker.first_mismatch;
    r
}

/// baton's gateway in SERVER and client agent in MOBILE, following the kernel's interfaces.
struct BatonRig {
    dir: PathBuf,
    baton: PathBuf,
    admin: PathBuf,
    _gateway: ChildGuard,
    _client: ChildGuard,
}

impl BatonRig {
    fn start(
        bed: &Bed,
        baton: &Path,
        target: SocketAddr,
        threads: Option<u16>,
    ) -> Result<BatonRig> {
        let dir = std::env::temp_dir().join(format!("baton-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("m.key");
        let out = Command::new(baton)
            .args(["keygen", "m", "--out"])
            .arg(&key)
            .output()?;
        ensure!(
            out.status.success(),
            "baton keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let public = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("key = \""))
            .and_then(|l| l.strip_suffix('"'))
            .context("baton keygen's last line is not key = \"...\"")?
            .to_owned();
        let gw_addr = SocketAddr::from((bed.server_addr(), GATEWAY_PORT));
        let threads = threads.map_or(String::new(), |n| format!("threads = {n}\n"));
        std::fs::write(
            dir.join("gateway.toml"),
            format!(
                "listen = [\"{gw_addr}\"]\n{threads}[services.data]\ntarget = \"{target}\"\n\
                 [clients.m]\nkey = \"{public}\"\nservices = [\"data\"]\n"
            ),
        )?;
        let admin = dir.join("admin.sock");
        std::fs::write(
            dir.join("client.toml"),
            format!(
                "id = \"m\"\nkey_file = \"m.key\"\nadmin = \"{}\"\n{threads}[gateways.gw]\naddresses = [\"{gw_addr}\"]\n\
                 [services.data]\ngateway = \"gw\"\nlisten = \"127.0.0.1:{SERVICE_PORT}\"\n",
                admin.display()
            ),
        )?;
        let spawn = |host: Host, role: &str| -> Result<ChildGuard> {
            let log = std::fs::File::create(dir.join(format!("{role}.log")))?;
            let mut cmd = bed.command(host, &baton.to_string_lossy());
            cmd.args([role, "-c"])
                .arg(dir.join(format!("{role}.toml")))
                .env(
                    "BATON_LOG",
                    std::env::var("BATON_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            Ok(bed.spawn(&mut cmd)?)
        };
        let gateway = spawn(Host::Server, "gateway")?;
        let client = spawn(Host::Mobile, "client")?;
        let rig = BatonRig {
            dir,
            baton: baton.to_owned(),
            admin,
            _gateway: gateway,
            _client: client,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(st) = rig.status() {
                if st["sessions"][0]["state"] == "up" && st["sessions"][0]["interface"] == "wlan" {
                    return Ok(rig);
                }
            }
            if Instant::now() >= deadline {
                // The rig's directory goes when it is dropped: the logs
                // move out of it first, to be read after the run.
                let kept = rig.dir.with_extension("failed");
                let _ = std::fs::remove_dir_all(&kept);
                let logs = match std::fs::rename(&rig.dir, &kept) {
                    Ok(()) => kept,
                    Err(_) => rig.dir.clone(),
                };
                bail!(
                    "baton's session did not come up on wlan; logs in {}",
                    logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Result<Value> {
        let mut cmd = Command::new(&self.baton);
        cmd.args(["status", "--json", "--admin"]).arg(&self.admin);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(10))?;
        ensure!(
            out.status.success(),
            "baton status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn switch(&self, to: &str) -> Result<()> {
        let mut cmd = Command::new(&self.baton);
        cmd.args(["switch", to, "--admin"]).arg(&self.admin);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "baton switch {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The switch records, briefly.
    fn switch_note(&self) -> String {
        let Ok(st) = self.status() else {
            return "no status".into();
        };
        let sw = st["switches"].as_array().cloned().unwrap_or_default();
        if sw.is_empty() {
            return "no switch recorded".into();
        }
        let mut s = sw
            .iter()
            .take(3)
            .map(|w| {
                format!(
                    "{} {} → {}: pause {} ms, stall {} ms, resent {} B",
                    w["kind"].as_str().unwrap_or("?"),
                    w["from"].as_str().unwrap_or("?"),
                    w["to"].as_str().unwrap_or("?"),
                    w["duration_ms"],
                    w["longest_stall_ms"],
                    w["bytes_resent"]
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        if sw.len() > 3 {
            write!(s, "; ... {} switches in all", sw.len()).ok();
        }
        s
    }
}

impl Drop for BatonRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gap_is_the_longest_pause_after_the_event() {
        let base = Instant::now();
        let ms = |n: u64| base + Duration::from_millis(n);
        let r = Received {
            times: vec![ms(0), ms(10), ms(20), ms(30), ms(250), ms(260), ms(2000)],
            mismatch: None,
            error: None,
        };
        // Event at 25: pauses 30-20 (from the last read before it), 250-30, 10, 1740.
        assert_eq!(
            r.gap(ms(25), ms(2500)),
            Gap::Resumed(Duration::from_millis(1740))
        );
        // Nothing in the last second: not recovered.
        assert_eq!(
            r.gap(ms(25), ms(3100)),
            Gap::NoRecovery(Duration::from_millis(3080))
        );
        let steady = Received {
            times: (0..300).map(|i| ms(i * 10)).collect(),
            mismatch: None,
            error: None,
        };
        assert_eq!(
            steady.gap(ms(1000), ms(2995)),
            Gap::Resumed(Duration::from_millis(10))
        );
    }
}
