//! `baton-bench scale-part`: one shard of the scale benchmark's load generator.
//!
//! The coordinator (`baton-bench scale`) starts P parts; part p drives the clients whose
//! index i has i % P == p: their sessions, their streams, their switches in the storm and
//! the burst, and its share of the end-to-end check. A part holds a descriptor per session
//! and per stream, so P parts hold what one process's open-files limit would not.
//!
//! The coordinator drives the phases over the part's stdin and stdout, a line each way: it
//! writes a [`Phase`] (`go sessions`, `go streams`, `go storm ...`, `go check ...`), the part
//! does it and answers with one line of JSON, a [`Reply`]. A first `Reply` says the part has
//! loaded its keys; the part exits when its stdin closes. What it logs goes to stderr.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use baton_proto::wire::{FrameHeader, FRAME_HEADER_LEN, LEG_START_LEN, TAG_LEN};
use baton_proto::{
    ClientHandshake, ClientKey, ConnKind, ControlCipher, LegKey, Message, Offset, Preface, Role,
    StreamId,
};
use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{client_id, Plan};

/// Options of `baton-bench scale-part`, all set by the coordinator ([`PartOptions::args`]).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub(crate) struct PartOptions {
    /// The run's folder; the client keys are in its file `keys`, one a line in client order.
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// This part's number, from 0.
    #[arg(long)]
    pub(crate) part: usize,
    /// Number of parts.
    #[arg(long)]
    pub(crate) parts: usize,
    /// Sessions of the whole run.
    #[arg(long)]
    pub(crate) sessions: usize,
    /// Streams of the whole run, spread over the sessions as [`Plan::streams_of`] says.
    #[arg(long)]
    pub(crate) streams: usize,
    /// Handshakes or legs this part has in flight at once while opening.
    #[arg(long)]
    pub(crate) concurrency: usize,
    /// The gateway's port on 127.0.0.1.
    #[arg(long)]
    pub(crate) port: u16,
    /// Number of services (targets) each client may open streams to.
    #[arg(long)]
    pub(crate) targets: u8,
}

impl PartOptions {
    /// The command-line arguments that give these options to `scale-part`.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut a = vec!["--dir".to_owned(), self.dir.display().to_string()];
        for (k, v) in [
            ("--part", self.part.to_string()),
            ("--parts", self.parts.to_string()),
            ("--sessions", self.sessions.to_string()),
            ("--streams", self.streams.to_string()),
            ("--concurrency", self.concurrency.to_string()),
            ("--port", self.port.to_string()),
            ("--targets", self.targets.to_string()),
        ] {
            a.push(k.to_owned());
            a.push(v);
        }
        a
    }

    fn mine(&self, idx: usize) -> bool {
        idx % self.parts == self.part
    }
}

/// A phase the coordinator starts in a part, one line on its stdin.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Phase {
    /// Open this part's sessions.
    Sessions,
    /// Open this part's streams.
    Streams,
    /// Clients `from..to` switch, their starts spread evenly over `window` seconds from
    /// `start_unix_ms` (the same instant in every part; 0 s: all at that instant).
    Storm {
        from: usize,
        to: usize,
        window: f64,
        start_unix_ms: u64,
    },
    /// Check up to `n` streams of this part's clients below `switched`, and `n` of the others.
    Check { switched: usize, n: usize },
}

impl Phase {
    /// The line that starts the phase (without its newline).
    pub(crate) fn line(&self) -> String {
        match self {
            Phase::Sessions => "go sessions".to_owned(),
            Phase::Streams => "go streams".to_owned(),
            Phase::Storm {
                from,
                to,
                window,
                start_unix_ms,
            } => format!("go storm {from} {to} {window} {start_unix_ms}"),
            Phase::Check { switched, n } => format!("go check {switched} {n}"),
        }
    }

    pub(crate) fn parse(line: &str) -> Result<Phase> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |w: &str| {
            w.parse::<u64>()
                .with_context(|| format!("bad number {w:?} in {line:?}"))
        };
        let idx = |w: &str| num(w).map(|v| v as usize);
        Ok(match words[..] {
            ["go", "sessions"] => Phase::Sessions,
            ["go", "streams"] => Phase::Streams,
            ["go", "storm", from, to, window, start] => Phase::Storm {
                from: idx(from)?,
                to: idx(to)?,
                window: window
                    .parse()
                    .with_context(|| format!("bad window in {line:?}"))?,
                start_unix_ms: num(start)?,
            },
            ["go", "check", switched, n] => Phase::Check {
                switched: idx(switched)?,
                n: idx(n)?,
            },
            _ => bail!("unknown command {line:?}"),
        })
    }
}

/// A part's answer to a phase, one line of JSON on its stdout.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Reply {
    /// Why the phase failed (the coordinator gives up on the run).
    pub(crate) error: Option<String>,
    /// Sessions or streams opened in the phase.
    pub(crate) opened: usize,
    /// What a storm phase measured.
    pub(crate) storm: Option<StormPart>,
    /// Streams checked end to end: (ok, failed).
    pub(crate) checked: (usize, usize),
    /// What the gateway sent on this part's control connections so far.
    pub(crate) control: ControlCounts,
}

/// One part's share of a storm.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct StormPart {
    /// Clients of this part that switched, and their streams.
    pub(crate) clients: usize,
    pub(crate) streams: usize,
    /// Each client's own time from dropping its old connections to every leg resumed (µs).
    pub(crate) resumes_us: Vec<u64>,
    /// When the last of its clients had resumed (UNIX time, µs); the start if none did.
    pub(crate) last_done_unix_us: u64,
    /// How late the part learnt of the storm's start (µs; 0 if it was in time).
    pub(crate) late_us: u64,
    /// "client: error" of the clients that failed to resume.
    pub(crate) failures: Vec<String>,
}

/// Frames the gateway sent on the control connections.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ControlCounts {
    pub(crate) relegs: u64,
    pub(crate) resets: u64,
    /// Frames that failed authentication.
    pub(crate) errors: u64,
}

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a part until its stdin closes.
pub(crate) fn run(opts: &PartOptions) -> Result<()> {
    ensure!(
        opts.parts >= 1 && opts.part < opts.parts,
        "--part must be below --parts"
    );
    ensure!(
        opts.sessions > 0 && opts.targets > 0 && opts.concurrency > 0,
        "--sessions, --targets and --concurrency must be at least 1"
    );
    let keys = load_keys(&opts.dir.join("keys"), opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    rt.block_on(drive(opts, keys))
}

/// This part's keys, at their client's index (the others are `None`).
fn load_keys(path: &Path, opts: &PartOptions) -> Result<Vec<Option<ClientKey>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keys = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            opts.mine(i)
                .then(|| ClientKey::from_text(line))
                .transpose()
                .with_context(|| format!("key of {} in {}", client_id(i), path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        keys.len() >= opts.sessions,
        "{} holds {} keys for {} sessions",
        path.display(),
        keys.len(),
        opts.sessions
    );
    Ok(keys)
}

async fn drive(opts: &PartOptions, keys: Vec<Option<ClientKey>>) -> Result<()> {
    let ctx = Arc::new(Ctx {
        gateway: SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port)),
        keys,
        rng: SystemRandom::new(),
        services: (0..opts.targets).map(|k| format!("t{k}")).collect(),
        stats: Arc::new(ControlStats::default()),
    });
    let plan = Plan {
        sessions: opts.sessions,
        streams: opts.streams,
        ..Plan::default()
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    answer(&mut stdout, Reply::default()).await?;
    let mut sessions = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let mut reply = match phase(&ctx, opts, &plan, &mut sessions, &line).await {
            Ok(r) => r,
            Err(e) => Reply {
                error: Some(format!("{e:#}")),
                ..Reply::default()
            },
        };
        reply.control = ctx.stats.counts();
        answer(&mut stdout, reply).await?;
    }
    Ok(())
}

async fn answer(out: &mut tokio::io::Stdout, reply: Reply) -> Result<()> {
    let mut line = serde_json::to_string(&reply)?;
    line.push('\n');
    out.write_all(line.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

async fn phase(
    ctx: &Arc<Ctx>,
    opts: &PartOptions,
    plan: &Plan,
    sessions: &mut Vec<Sess>,
    line: &str,
) -> Result<Reply> {
    let mut reply = Reply::default();
    match Phase::parse(line)? {
        Phase::Sessions => {
            let mine: Vec<usize> = (0..opts.sessions).filter(|&i| opts.mine(i)).collect();
            reply.opened = mine.len();
            *sessions = open_sessions(ctx, mine, opts.concurrency).await?;
        }
        Phase::Streams => {
            let opened = std::mem::take(sessions);
            *sessions = open_streams(ctx, opened, plan, opts.concurrency).await?;
            reply.opened = sessions.iter().map(|s| s.streams).sum();
        }
        Phase::Storm {
            from,
            to,
            window,
            start_unix_ms,
        } => {
            let all = std::mem::take(sessions);
            let (back, storm) = storm(ctx, all, from..to, window, start_unix_ms).await;
            *sessions = back;
            reply.storm = Some(storm?);
        }
        Phase::Check { switched, n } => {
            reply.checked = check_streams(sessions, switched, n).await?;
        }
    }
    Ok(reply)
}

/// A client's source address: one per client, so that no address runs out of ports.
pub(crate) fn source(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// Counters of what the gateway sent on the control connections.
#[derive(Debug, Default)]
struct ControlStats {
    relegs: AtomicU64,
    resets: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

impl ControlStats {
    fn counts(&self) -> ControlCounts {
        ControlCounts {
            relegs: self.relegs.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
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
    /// Keys of this part's clients, at their index.
    keys: Vec<Option<ClientKey>>,
    rng: SystemRandom,
    services: Vec<String>,
    stats: Arc<ControlStats>,
}

impl Ctx {
    fn key(&self, idx: usize) -> Result<&ClientKey> {
        self.keys
            .get(idx)
            .and_then(Option::as_ref)
            .with_context(|| format!("no key for {} in this part", client_id(idx)))
    }
}

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
    let (hs, first) = ClientHandshake::start(&client_id(idx), ctx.key(idx)?, resume, &ctx.rng)?;
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

async fn open_sessions(
    ctx: &Arc<Ctx>,
    indices: Vec<usize>,
    concurrency: usize,
) -> Result<Vec<Sess>> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let n = indices.len();
    for idx in indices {
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
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    out.sort_by_key(|s| s.idx);
    Ok(out)
}

/// This part's clients in `range` switch, the n-th of the range at `start_unix_ms` +
/// n × `window` / its length: every part places its clients in the same window. Returns
/// every session (switched or not) and what the switches took.
async fn storm(
    ctx: &Arc<Ctx>,
    sessions: Vec<Sess>,
    range: std::ops::Range<usize>,
    window: f64,
    start_unix_ms: u64,
) -> (Vec<Sess>, Result<StormPart>) {
    let (mine, mut out): (Vec<Sess>, Vec<Sess>) =
        sessions.into_iter().partition(|s| range.contains(&s.idx));
    let start_unix_us = start_unix_ms.saturating_mul(1_000);
    let mut result = StormPart {
        clients: mine.len(),
        streams: mine.iter().map(|s| s.legs.len()).sum(),
        last_done_unix_us: start_unix_us,
        ..StormPart::default()
    };
    let step = Duration::from_secs_f64(window / range.len().max(1) as f64);
    // The start on this process's monotonic clock.
    let start = UNIX_EPOCH + Duration::from_millis(start_unix_ms);
    let now = tokio::time::Instant::now();
    let t0 = match start.duration_since(SystemTime::now()) {
        Ok(ahead) => now + ahead,
        Err(late) => {
            result.late_us = late.duration().as_micros() as u64;
            now
        }
    };
    let mut set = JoinSet::new();
    for mut sess in mine {
        let ctx = ctx.clone();
        let at = t0 + step * (sess.idx - range.start) as u32;
        set.spawn(async move {
            tokio::time::sleep_until(at).await;
            let began = tokio::time::Instant::now();
            let r = switch(&ctx, &mut sess).await;
            (sess, r.map(|()| (began.elapsed(), SystemTime::now())))
        });
    }
    while let Some(j) = set.join_next().await {
        let (sess, r) = match j {
            Ok(x) => x,
            Err(e) => return (out, Err(anyhow!("a switch task failed: {e}"))),
        };
        match r {
            Ok((took, done)) => {
                result.resumes_us.push(took.as_micros() as u64);
                let done_us = done
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                result.last_done_unix_us = result.last_done_unix_us.max(done_us);
            }
            Err(e) => result
                .failures
                .push(format!("{}: {e:#}", client_id(sess.idx))),
        }
        out.push(sess);
    }
    out.sort_by_key(|s| s.idx);
    (out, Ok(result))
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

/// Sends bytes over the first stream of up to `n` of this part's switched sessions (below
/// `switched`) and `n` others, and expects them back from the echoing target: the resumed
/// legs carry data. Returns (ok, failed).
async fn check_streams(sessions: &mut [Sess], switched: usize, n: usize) -> Result<(usize, usize)> {
    let mut legs = Vec::new();
    for was_switched in [true, false] {
        let picked = sessions
            .iter_mut()
            .filter(|s| (s.idx < switched) == was_switched && !s.legs.is_empty())
            .take(n);
        for s in picked {
            legs.push((s.idx, s.legs.swap_remove(0)));
        }
    }
    let mut set = JoinSet::new();
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
    Ok((ok, failed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: PartOptions,
    }

    #[test]
    fn options_go_through_the_command_line() {
        let opts = PartOptions {
            dir: PathBuf::from("/tmp/baton-scale-1"),
            part: 2,
            parts: 3,
            sessions: 500,
            streams: 4_000,
            concurrency: 22,
            port: 17_800,
            targets: 5,
        };
        let back =
            Cli::parse_from(std::iter::once("scale-part".to_owned()).chain(opts.args())).opts;
        assert_eq!(back, opts);
        assert!(opts.mine(5) && opts.mine(8) && !opts.mine(6));
    }

    #[test]
    fn phases_go_through_a_line() {
        for phase in [
            Phase::Sessions,
            Phase::Streams,
            Phase::Storm {
                from: 1_000,
                to: 2_000,
                window: 0.0,
                start_unix_ms: 1_796_000_000_123,
            },
            Phase::Storm {
                from: 0,
                to: 1_000,
                window: 0.25,
                start_unix_ms: 1,
            },
            Phase::Check {
                switched: 2_000,
                n: 67,
            },
        ] {
            assert_eq!(Phase::parse(&phase.line()).unwrap(), phase);
        }
        for bad in ["", "go", "go storm 1 2", "go check x 1", "stop"] {
            assert!(Phase::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_reply_is_one_line() {
        let reply = Reply {
            error: Some("line one\nline two".into()),
            storm: Some(StormPart::default()),
            ..Reply::default()
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert!(!line.contains('\n'));
        let back: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(back.error, reply.error);
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        assert_eq!(source(1, 0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(source(2, 9_999), IpAddr::V4(Ipv4Addr::new(127, 2, 39, 250)));
        let all: std::collections::HashSet<_> = (0..60_000).map(|i| source(1, i)).collect();
        assert_eq!(all.len(), 60_000);
    }
}
