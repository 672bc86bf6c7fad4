//! Switches on loopback: two loopback addresses stand in for two
//! interfaces; a planned switch is `Client::switch`, a sudden one is the
//! interface going down (every connection on it cut at once, as the kernel's
//! link-down event does in the agent).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use baton_proto::ClientKey;
use baton_runtime::client::SwitchKind;
use baton_runtime::config::ClientConfig;
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::Client;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

struct Bed {
    shutdown: CancellationToken,
    gw: baton_runtime::Gateway,
    client: Client,
    reports: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<verify::Report>>,
}

/// A gateway, a verifying server and a client agent with interfaces
/// `a` (127.0.0.2, preferred) and `b` (127.0.0.3).
async fn bed(client_extra: &str, gateway_extra: &str) -> Bed {
    let shutdown = CancellationToken::new();
    let (server, reports) = verify_server().await;
    let (gw, client) = pair(server, client_extra, gateway_extra, &shutdown).await;
    Bed {
        shutdown,
        gw,
        client,
        reports,
    }
}

/// A gateway whose service `data` leads to `target`, and a client agent with interfaces
/// `a` (127.0.0.2, preferred) and `b` (127.0.0.3) whose session is up on `a`.
/// `client_extra` and `gateway_extra` are top-level keys of their files.
async fn pair(
    target: SocketAddr,
    client_extra: &str,
    gateway_extra: &str,
    shutdown: &CancellationToken,
) -> (baton_runtime::Gateway, Client) {
    let k = key();
    let gw = data_gateway(target, gateway_extra, &k, shutdown).await;
    let client = data_client(gw.local_addrs()[0], client_extra, k, shutdown).await;
    (gw, client)
}

/// The gateway of [`pair`], serving client `m` of key `k`.
async fn data_gateway(
    target: SocketAddr,
    gateway_extra: &str,
    k: &ClientKey,
    shutdown: &CancellationToken,
) -> baton_runtime::Gateway {
    gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\n{gateway_extra}\n[services.data]\ntarget = \"{target}\"\n[clients.m]\nkey = \"{}\"\nservices = [\"data\"]\n",
            k.public()
        ),
        shutdown,
    )
    .await
}

/// The client agent of [`pair`], reaching its gateway at `gw`; up on `a`.
async fn data_client(
    gw: SocketAddr,
    client_extra: &str,
    k: ClientKey,
    shutdown: &CancellationToken,
) -> Client {
    let toml = format!(
        "id = \"m\"\nkey_file = \"unused\"\n{client_extra}\n[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n[gateways.gw]\naddresses = [\"{gw}\"]\n{}",
        service("data")
    );
    let cfg = ClientConfig::from_toml(std::path::Path::new("switch-client.toml"), &toml).unwrap();
    let client = Client::start(cfg, k, shutdown.clone()).await.unwrap();
    assert_eq!(client.wait_up("gw").await.unwrap().path, "a");
    client
}

impl Bed {
    /// Waits (at most `limit`) for each stream's application and for as
    /// many server reports; asserts both directions arrived exact. `what`
    /// goes into the failure messages.
    async fn assert_all_exact(
        &mut self,
        tasks: Vec<JoinHandle<std::io::Result<verify::Report>>>,
        limit: Duration,
        what: &str,
    ) {
        let n = tasks.len();
        for t in tasks {
            let r = tokio::time::timeout(limit, t)
                .await
                .unwrap()
                .unwrap()
                .expect("stream failed");
            assert!(r.is_exact(Dir::Down), "{what}{r:?}");
        }
        for _ in 0..n {
            let r = self.reports.recv().await.unwrap().unwrap();
            assert!(r.is_exact(Dir::Up), "{what}{r:?}");
        }
    }

    /// Starts a paced, verified exchange of `bytes` each way through the agent's service.
    fn start_exchange(
        &self,
        seed: u64,
        bytes: u64,
        pace: u64,
    ) -> JoinHandle<std::io::Result<verify::Report>> {
        let addr = self.client.service_addr("data").unwrap();
        tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            verify::exchange_paced(s, seed, bytes, bytes, Mode::Concurrent, pace).await
        })
    }

    /// Waits for the exchange: both directions exact, no reset or error, and one session
    /// throughout.
    async fn finish_on_one_session(
        &mut self,
        exchange: JoinHandle<std::io::Result<verify::Report>>,
    ) {
        let down = tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .unwrap()
            .unwrap()
            .expect("no reset, no error");
        assert!(down.is_exact(Dir::Down), "{down:?}");
        let up = self.reports.recv().await.unwrap().unwrap();
        assert!(up.is_exact(Dir::Up), "{up:?}");
        assert_eq!(self.gw.session_count(), 1, "one session throughout");
    }
}

async fn current(client: &Client) -> String {
    client.wait_up("gw").await.unwrap().path
}

/// Waits until the switch count reaches `n`.
async fn switches_reach(client: &Client, n: usize) -> bool {
    eventually(Duration::from_secs(10), || client.switches().len() >= n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn long_stream_survives_planned_and_sudden_switches() {
    let mut bed = bed("", "").await;
    let long = bed.start_exchange(42, 24 * MIB, 8 * MIB);
    let c = &bed.client;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.switch("b").await.unwrap();
    assert_eq!(
        (
            r[0].kind,
            r[0].from.as_str(),
            r[0].to.as_str(),
            r[0].streams
        ),
        (SwitchKind::Planned, "a", "b", 1)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.switch("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sudden: a goes down; the session must find b by itself.
    c.set_path_up("a", false).unwrap();
    assert!(switches_reach(c, 3).await);
    assert_eq!(current(c).await, "b");
    let sw = c.switches()[2].clone();
    assert_eq!(
        (sw.kind, sw.from.as_str(), sw.to.as_str()),
        (SwitchKind::Unexpected, "a", "b")
    );
    c.set_path_up("a", true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.switch("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.set_path_up("a", false).unwrap();
    assert!(switches_reach(c, 5).await);
    bed.finish_on_one_session(long).await;
    bed.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn two_hundred_random_switches_under_load_on_twenty_streams() {
    let seed: u64 = std::env::var("BATON_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (re-run with BATON_SEED={seed})");
    let mut x = seed | 1;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut bed = bed("", "").await;
    let addr = bed.client.service_addr("data").unwrap();
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            verify::exchange_paced(s, 1000 + i, 8 * MIB, 8 * MIB, Mode::Concurrent, 2 * MIB).await
        }));
    }
    let c = &bed.client;
    let (mut planned, mut sudden) = (0, 0);
    for n in 0..200 {
        let on = current(c).await;
        let other = if on == "a" { "b" } else { "a" };
        if rand() % 2 == 0 {
            let r = c
                .switch(other)
                .await
                .unwrap_or_else(|e| panic!("switch {n} (seed {seed}): {e}"));
            assert_eq!(r[0].to, other);
            planned += 1;
        } else {
            let before = c.switches().len();
            c.set_path_up(&on, false).unwrap();
            assert!(
                switches_reach(c, before + 1).await,
                "sudden switch {n} did not complete (seed {seed})"
            );
            c.set_path_up(&on, true).unwrap();
            sudden += 1;
        }
        tokio::time::sleep(Duration::from_millis(rand() % 15)).await;
    }
    println!("{planned} planned and {sudden} sudden switches");
    assert_eq!(c.switches().len(), 200);
    assert!(
        planned > 50 && sudden > 50,
        "seed {seed} gave a lopsided mix"
    );
    bed.assert_all_exact(tasks, Duration::from_secs(60), &format!("seed {seed}: "))
        .await;
    let c = &bed.client;
    let resent: u64 = c.switches().iter().map(|s| s.bytes_resent).sum();
    let longest = c
        .switches()
        .iter()
        .map(|s| s.longest_stall_ms)
        .max()
        .unwrap();
    println!("bytes resent {resent}, longest stall {longest} ms");
    bed.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn bulk_streams_sent_through_pipes_survive_switches() {
    // Unpaced streams read in large pieces: their bytes are kept and sent
    // through pipes, and every switch takes them back into the ring (a
    // sudden one) or goes on from the pipes' queue (a planned one).
    let mut bed = bed("", "").await;
    let addr = bed.client.service_addr("data").unwrap();
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            verify::exchange(s, 7000 + i, 192 * MIB, 192 * MIB, Mode::Concurrent).await
        }));
    }
    let c = &bed.client;
    let (mut switches, mut spliced_before_switch, mut received_spliced) = (0, 0u64, 0u64);
    while !tasks.iter().all(|t| t.is_finished()) && switches < 60 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let streams = c.streams();
        let spliced: u64 = streams.iter().map(|s| s.sent_spliced).sum();
        spliced_before_switch = spliced_before_switch.max(spliced);
        let spliced: u64 = streams.iter().map(|s| s.received_spliced).sum();
        received_spliced = received_spliced.max(spliced);
        let on = current(c).await;
        let other = if on == "a" { "b" } else { "a" };
        if switches % 2 == 0 {
            c.switch(other).await.unwrap();
        } else {
            let before = c.switches().len();
            c.set_path_up(&on, false).unwrap();
            assert!(
                switches_reach(c, before + 1).await,
                "sudden switch {switches}"
            );
            c.set_path_up(&on, true).unwrap();
        }
        switches += 1;
    }
    assert!(switches >= 4, "the streams ended after {switches} switches");
    assert!(spliced_before_switch > 0, "nothing was sent through pipes");
    // Busy streams are delivered through pipes too.
    assert!(received_spliced > 0, "nothing was delivered through pipes");
    bed.assert_all_exact(tasks, Duration::from_secs(120), "")
        .await;
    println!("{switches} switches, {spliced_before_switch} bytes spliced");
    bed.shutdown.cancel();
}

/// Two 64 MiB streams each way with a planned switch half-way; returns, of
/// every status read while they ran, the largest leg and application send
/// buffers baton set, and whether one was seen on a leg after the switch.
async fn send_buffers_seen(extra: &str) -> (Option<usize>, Option<usize>, bool) {
    let mut bed = bed(extra, extra).await;
    let addr = bed.client.service_addr("data").unwrap();
    let mut tasks = Vec::new();
    for i in 0..2u64 {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            verify::exchange(s, 7100 + i, 64 * MIB, 64 * MIB, Mode::Concurrent).await
        }));
    }
    let c = &bed.client;
    let (mut leg, mut app, mut after_switch, mut switched) = (None, None, false, false);
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        for s in c.streams() {
            leg = leg.max(s.leg_send_buffer);
            app = app.max(s.app_send_buffer);
            after_switch |= s.legs >= 2 && s.leg_send_buffer.is_some();
            if !switched && s.sent > 32 * MIB {
                c.switch("b").await.unwrap();
                switched = true;
            }
        }
    }
    assert!(switched, "the streams ended before the switch");
    bed.assert_all_exact(tasks, Duration::from_secs(60), "")
        .await;
    bed.shutdown.cancel();
    (leg, app, after_switch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn busy_streams_get_send_buffers_sized_to_their_path() {
    // Loopback is a path of a few µs: a busy stream's leg and application
    // connection get small buffers instead of the kernel's 4 MiB, a new leg
    // after a switch gets its own, and the bytes arrive exact.
    let (leg, app, after_switch) = send_buffers_seen("").await;
    let small =
        |b: Option<usize>| b.is_some_and(|b| (baton_os::sndbuf::FLOOR..=1 << 20).contains(&b));
    assert!(small(leg), "leg send buffer {leg:?}");
    assert!(small(app), "application send buffer {app:?}");
    assert!(after_switch, "the new leg's buffer was not sized");
    // `send_buffers = "kernel"` leaves every buffer to the kernel.
    let (leg, app, _) = send_buffers_seen("send_buffers = \"kernel\"").await;
    assert_eq!((leg, app), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn memory_stays_bounded_when_the_far_side_stops_reading() {
    // A server that accepts and never reads.
    let shutdown = CancellationToken::new();
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = sink.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let (s, _) = sink.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    });
    let (_gw, client) = pair(
        target,
        "replay_buffer = \"1MiB\"",
        "replay_buffer = \"1MiB\"",
        &shutdown,
    )
    .await;
    let mut app = TcpStream::connect(client.service_addr("data").unwrap())
        .await
        .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut switched = false;
    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, app.write_all(&chunk)).await {
        written += chunk.len() as u64;
        if !switched && written > 4 * MIB {
            // A switch while the far side is stalled: the held bytes move, no more.
            let c2 = client.clone();
            tokio::spawn(async move { c2.switch("b").await.expect("switch failed") });
            switched = true;
        }
    }
    assert!(eventually(Duration::from_secs(5), || client.switches().len() == 1).await);
    let s = &client.streams()[0];
    let held_by_agent = s.sent - s.confirmed;
    println!("application wrote {written} bytes before blocking; client agent holds {held_by_agent} unconfirmed");
    assert!(
        held_by_agent <= MIB,
        "replay buffer exceeded its bound: {held_by_agent}"
    );
    // Everything else is in kernel socket buffers (application, leg, server
    // connections), themselves bounded: far below an unbounded relay's.
    assert!(
        written < 96 * MIB,
        "the application was never pushed back: {written} bytes accepted"
    );
    held.abort();
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn outage_within_the_switch_timeout_resumes_and_beyond_it_closes() {
    let mut bed = bed("switch_timeout = \"3s\"", "switch_timeout = \"3s\"").await;
    let addr = bed.client.service_addr("data").unwrap();
    let c = bed.client.clone();
    // 1. Both interfaces gone for 1.5 s, then b comes back: resumed, exact.
    let s = TcpStream::connect(addr).await.unwrap();
    let t = tokio::spawn(verify::exchange_paced(
        s,
        9,
        6 * MIB,
        6 * MIB,
        Mode::Concurrent,
        4 * MIB,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.set_path_up("a", false).unwrap();
    c.set_path_up("b", false).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.set_path_up("b", true).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), t)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(r.is_exact(Dir::Down));
    assert!(bed.reports.recv().await.unwrap().unwrap().is_exact(Dir::Up));
    let sw = c.switches().last().cloned().unwrap();
    assert_eq!(sw.kind, SwitchKind::Unexpected);
    assert!(sw.duration_ms >= 1400, "the outage lasted 1.5 s: {sw:?}");

    // 2. No interface for longer than the switch timeout: the stream is
    //    closed with a reset (never silently), on both sides.
    let mut app = TcpStream::connect(addr).await.unwrap();
    // A verify header announcing 1 GiB that never comes; the server answers
    // only after it (mode 1): it waits, silent.
    let mut header = [0u8; 33];
    header[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
    header[24] = 1;
    app.write_all(&header).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bed.gw.stream_count(), 1);
    c.set_path_up("b", false).unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut app, Duration::from_secs(10)).await,
        "stream not closed after the switch timeout"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "closed before the switch timeout: {waited:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || bed.gw.session_count() == 0).await,
        "gateway kept the session"
    );
    bed.shutdown.cancel();
}

/// Bytes in flight on the old legs at a planned switch are not sent again:
/// the new legs go on where the old ones stop, and the far side drains the
/// old ones first. The server stalls so that hundreds of KiB sit in the old leg.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_planned_switch_sends_nothing_twice() {
    let shutdown = CancellationToken::new();
    const TOTAL: usize = 16 << 20;
    let pattern = |i: usize| (i * 31 % 253) as u8;
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = sink.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut got = Vec::with_capacity(TOTAL);
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got)
            .await
            .unwrap();
        got
    });
    let (_gw, client) = pair(target, "", "", &shutdown).await;
    let app = TcpStream::connect(client.service_addr("data").unwrap())
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let mut app = app;
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        app.write_all(&data).await.unwrap();
        app.shutdown().await.unwrap();
        app
    });
    // Switch while the server is stalled and the old leg is full.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let in_flight = {
        let s = &client.streams()[0];
        s.sent - s.confirmed
    };
    let r = client.switch("b").await.unwrap();
    assert_eq!(r[0].kind, SwitchKind::Planned);
    let got = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap();
    let _app = writer.await.unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "bytes differ"
    );
    // The record settles after the new legs have run a while.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rec = client.switches()[0].clone();
    println!(
        "unconfirmed at the switch: {in_flight} bytes; resent: {}",
        rec.bytes_resent
    );
    // Where the buffers are sized to the path (the default), loopback's
    // hold a few hundred KiB between them, not the kernel's megabytes.
    assert!(
        in_flight > 256 << 10,
        "the test needs bytes in flight at the switch: {in_flight}"
    );
    assert_eq!(rec.bytes_resent, 0, "{rec:?}");
    shutdown.cancel();
}

/// A switch asked for just as the interface under the session goes down (the
/// decision engine hears of the link in the same instant as the session) is
/// done as an unexpected switch: there is no old path to make before break,
/// and waiting on its legs would only lengthen the pause. Repeated, since
/// the two events race.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_switch_away_from_an_interface_that_went_down_is_unexpected() {
    let mut bed = bed("", "").await;
    let long = bed.start_exchange(43, 16 * MIB, 8 * MIB);
    let c = &bed.client;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, (down, to)) in [("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]
        .into_iter()
        .enumerate()
    {
        c.set_path_up(down, false).unwrap();
        // The answer may come as soon as the session is on `to`, before the
        // switch's record (written once every stream has its new leg).
        c.switch(to).await.unwrap();
        assert!(switches_reach(c, n + 1).await, "{:?}", c.switches());
        let r = c.switches()[n].clone();
        assert_eq!(
            (r.kind, r.from.as_str(), r.to.as_str(), r.streams),
            (SwitchKind::Unexpected, down, to, 1),
            "{r:?}"
        );
        assert_eq!(current(c).await, to);
        c.set_path_up(down, true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.switches().len(), 4, "{:?}", c.switches());
    bed.finish_on_one_session(long).await;
    bed.shutdown.cancel();
}

/// Sends `n` messages of 100 bytes one at a time, each checked as it comes back.
async fn messages(s: &mut TcpStream, from: u32, n: u32) {
    use tokio::io::AsyncReadExt;
    let mut got = [0u8; 100];
    for i in from..from + n {
        let msg = [(i % 251) as u8; 100];
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg, "message {i}");
    }
}

/// Small messages reach the application through a buffer (a copy costs
/// them less than a splice), messages of 16 KiB and a busy stream's bytes
/// through a pipe; the bytes are exact across the changes of mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn messages_are_copied_and_bulk_is_spliced_to_the_application() {
    use tokio::io::AsyncReadExt;
    let shutdown = CancellationToken::new();
    let (_gw, client) = pair(echo_server().await, "", "", &shutdown).await;
    let mut s = TcpStream::connect(client.service_addr("data").unwrap())
        .await
        .unwrap();
    s.set_nodelay(true).unwrap();
    let status = || client.streams().into_iter().next().unwrap();
    messages(&mut s, 0, 200).await;
    assert!(eventually(Duration::from_secs(5), || status().received == 20_000).await);
    assert_eq!(status().received_spliced, 0, "messages went through a pipe");

    // 16 KiB messages, each echoed before the next: once one was read
    // whole, the next ones are spliced.
    const BIG: usize = 16 << 10;
    for i in 0..20usize {
        let msg: Vec<u8> = (0..BIG).map(|j| ((i * 31 + j) % 251) as u8).collect();
        s.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; BIG];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert!(back == msg, "16 KiB message {i} differs");
    }
    let after_big = 20_000 + 20 * BIG as u64;
    assert!(eventually(Duration::from_secs(5), || status().received == after_big).await);
    let piped = status().received_spliced;
    assert!(
        piped >= 10 * BIG as u64,
        "16 KiB messages were copied: {piped} bytes spliced"
    );

    let len = (32 * MIB) as usize;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        (w, data)
    });
    let mut back = vec![0u8; len];
    r.read_exact(&mut back).await.unwrap();
    let (w, data) = writer.await.unwrap();
    assert!(back == data, "the echoed bulk differs");
    let total = after_big + len as u64;
    assert!(eventually(Duration::from_secs(5), || status().received == total).await);
    let spliced = status().received_spliced;
    assert!(spliced > piped, "nothing of the bulk went through a pipe");

    // Messages again: the first small read ends the busy spell.
    let mut s = r.reunite(w).unwrap();
    messages(&mut s, 200, 50).await;
    assert!(
        eventually(Duration::from_secs(5), || status().received
            == total + 5_000)
        .await
    );
    assert!(
        status().received_spliced <= spliced + 100,
        "messages after the bulk went through a pipe: {} bytes",
        status().received_spliced - spliced
    );
    shutdown.cancel();
}

/// Relays UDP between the agent and the gateway at `upstream`, from
/// `relay_addr` (the port of a TCP relay): the path probes must pass, or
/// the decision engine would see the path fail and switch, which would give
/// a stream a new leg by itself.
async fn udp_passthrough(relay_addr: SocketAddr, upstream: SocketAddr) -> JoinHandle<()> {
    use std::sync::{Arc, Mutex};
    let down = tokio::net::UdpSocket::bind(relay_addr).await.unwrap();
    let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    up.connect(upstream).await.unwrap();
    let agent = Arc::new(Mutex::new(None));
    tokio::spawn(async move {
        let mut a = vec![0u8; 65536];
        let mut b = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = down.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    *agent.lock().unwrap() = Some(from);
                    let _ = up.send(&a[..n]).await;
                }
                r = up.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    let to = *agent.lock().unwrap();
                    if let Some(to) = to {
                        let _ = down.send_to(&b[..n], to).await;
                    }
                }
            }
        }
    })
}

/// A leg the gateway's side drops while the session's path works (a gateway
/// worker being restarted drops connections it cannot pass on) is opened
/// again: nothing else would give the stream a leg, since the control
/// connection stays up. Between agent and gateway sits a relay that resets
/// the first connection made after the application connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_leg_dropped_on_a_working_path_is_opened_again() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = data_gateway(echo_server().await, "", &k, &shutdown).await;
    let upstream = gw.local_addrs()[0];
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let udp_task = udp_passthrough(relay_addr, upstream).await;
    let drop_next = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (drop_next2, dropped2) = (drop_next.clone(), dropped.clone());
    let relay_task = tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = relay.accept().await else {
                return;
            };
            if drop_next2.swap(false, Ordering::AcqRel) {
                // Reset as soon as the leg's first bytes are in.
                let mut first = [0u8; 16];
                let _ = down.read(&mut first).await;
                let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
                drop(down);
                dropped2.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    let client = data_client(relay_addr, "", k, &shutdown).await;

    drop_next.store(true, Ordering::Release);
    let mut app = TcpStream::connect(client.service_addr("data").unwrap())
        .await
        .unwrap();
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i * 13 % 251) as u8).collect();
    let (mut r, mut w) = app.split();
    let mut back = vec![0u8; data.len()];
    let (wrote, read) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(w.write_all(&data), r.read_exact(&mut back))
    })
    .await
    .expect("the stream got no new leg: its bytes did not come back");
    wrote.unwrap();
    read.unwrap();
    assert!(back == data, "the echoed bytes differ");
    assert_eq!(dropped.load(Ordering::Acquire), 1, "no leg was dropped");
    relay_task.abort();
    udp_task.abort();
    shutdown.cancel();
}

/// After a leg fails, the agent writes its replacement at once, from the
/// offset the gateway last confirmed, rather than a round trip later, once
/// the gateway's reply says what it holds: on a long path that round trip
/// was most of the pause the server saw. Between agent and gateway sits a
/// relay that resets the stream's first leg on demand and holds back
/// everything the gateway sends on the connection after it (the new leg's
/// reply): the bytes the application writes meanwhile must still reach the
/// server. Then the reply goes through and the stream carries on both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_resumed_leg_is_written_before_the_gateway_replies() {
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::sync::{mpsc, Notify};
    let shutdown = CancellationToken::new();
    let k = key();
    // An echo server that also reports what it receives.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let server_task = tokio::spawn(async move {
        let Ok((mut s, _)) = server.accept().await else {
            return;
        };
        let mut b = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut b).await {
            if got_tx.send(b[..n].to_vec()).is_err() || s.write_all(&b[..n]).await.is_err() {
                return;
            }
        }
    });
    let gw = data_gateway(server_addr, "", &k, &shutdown).await;
    let upstream = gw.local_addrs()[0];
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let udp_task = udp_passthrough(relay_addr, upstream).await;
    // The agent's connections in order: the control connection, the
    // stream's first leg, the leg that replaces it.
    let reset_first = CancellationToken::new();
    let release = Arc::new(Notify::new());
    let second_leg = Arc::new(Notify::new());
    let relay_task = {
        let (reset_first, release, second_leg) =
            (reset_first.clone(), release.clone(), second_leg.clone());
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((mut down, _)) = relay.accept().await else {
                    return;
                };
                if n == 2 {
                    second_leg.notify_one();
                }
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (reset_first, release) = (reset_first.clone(), release.clone());
                tokio::spawn(async move {
                    match n {
                        1 => {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                                _ = reset_first.cancelled() => {
                                    let _ = socket2::SockRef::from(&down).set_linger(Some(Duration::ZERO));
                                }
                            }
                        }
                        2 => {
                            let (mut dr, mut dw) = down.into_split();
                            let (mut ur, mut uw) = up.into_split();
                            let to_gateway = tokio::io::copy(&mut dr, &mut uw);
                            let to_agent = async {
                                release.notified().await;
                                tokio::io::copy(&mut ur, &mut dw).await
                            };
                            let _ = tokio::join!(to_gateway, to_agent);
                        }
                        _ => {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    }
                });
            }
        })
    };
    let client = data_client(relay_addr, "", k, &shutdown).await;
    let mut app = TcpStream::connect(client.service_addr("data").unwrap())
        .await
        .unwrap();
    let mut seen = Vec::new();
    app.write_all(b"before ").await.unwrap();
    server_got(&mut got_rx, &mut seen, b"before ", "through the first leg").await;
    reset_first.cancel();
    // Written once the old leg is gone: only the new one can carry it.
    tokio::time::timeout(Duration::from_secs(5), second_leg.notified())
        .await
        .expect("the agent opened a new leg");
    app.write_all(b"after ").await.unwrap();
    server_got(
        &mut got_rx,
        &mut seen,
        b"before after ",
        "written on the new leg while its reply was held back",
    )
    .await;
    release.notify_one();
    app.write_all(b"more").await.unwrap();
    server_got(
        &mut got_rx,
        &mut seen,
        b"before after more",
        "once the reply is through",
    )
    .await;
    let mut back = vec![0u8; b"before after more".len()];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut back))
        .await
        .expect("the echo came back over the new leg")
        .unwrap();
    assert_eq!(&back[..], b"before after more");
    relay_task.abort();
    udp_task.abort();
    server_task.abort();
    shutdown.cancel();
}

/// Waits (at most 5 s) until what the server reported receiving, gathered
/// in `seen`, ends with `want`.
async fn server_got(
    got: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    seen: &mut Vec<u8>,
    want: &[u8],
    what: &str,
) {
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.ends_with(want) {
            match got.recv().await {
                Some(b) => seen.extend(b),
                None => return,
            }
        }
    })
    .await;
    assert!(
        r.is_ok() && seen.ends_with(want),
        "{what}: the server got {:?}",
        String::from_utf8_lossy(seen)
    );
}
