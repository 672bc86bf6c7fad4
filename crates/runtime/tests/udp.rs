//! UDP services on loopback: datagrams through the client agent and the
//! gateway, across planned and sudden switches (two loopback addresses
//! stand in for two interfaces), the hold bound, idle expiry on both sides,
//! and forged or replayed datagrams; then the same for UDP client services
//! (server → client), whose flows the gateway opens.
//!
//! The test itself is the service's target (a UDP socket it reads and
//! writes), so it sees every datagram the gateway relays. Sockets get 4 MiB
//! buffers so that the kernel never drops a datagram on loopback: every
//! loss these tests see must be one baton counted.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::datagram::{Header, Kind, MAX_PAYLOAD};
use baton_proto::{ClientKey, FlowId, Message, Role};
use baton_runtime::client::{ExposedState, LinkState};
use baton_runtime::config::ClientConfig;
use baton_runtime::udp::{GatewayFlowStatus, Origin, UdpFlowStatus, UdpServiceStatus};
use baton_runtime::{Client, Gateway};
use common::*;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Every test ends within this, whatever goes wrong.
const LIMIT: Duration = Duration::from_secs(90);

async fn udp_socket(ip: &str) -> Arc<UdpSocket> {
    let s = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
    let r = SockRef::from(&s);
    r.set_recv_buffer_size(4 << 20).unwrap();
    r.set_send_buffer_size(4 << 20).unwrap();
    Arc::new(s)
}

/// Datagram number `n`: its number, then bytes that depend on it, of a
/// length that varies with it.
fn numbered(n: u64) -> Vec<u8> {
    let len = 8 + (n as usize * 37) % 1200;
    let mut d = n.to_be_bytes().to_vec();
    d.extend((8..len).map(|i| (n as usize * 131 + i * 7) as u8));
    d
}

/// The number of a datagram made by [`numbered`], if it is intact.
fn number_of(d: &[u8]) -> Option<u64> {
    let n = u64::from_be_bytes(d.get(..8)?.try_into().ok()?);
    (numbered(n) == d).then_some(n)
}

async fn recv_within(s: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = tokio::time::timeout(limit, s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some((buf, from))
}

struct Bed {
    shutdown: CancellationToken,
    gw: Gateway,
    client: Client,
    /// The service's target: the test reads and writes it.
    server: Arc<UdpSocket>,
    /// Where applications send.
    service: SocketAddr,
}

/// A gateway with the UDP service `dgram` (target: the test's socket) and a
/// client agent with the given interfaces (`name`, source address), in
/// order of preference, and `[udp]` settings on each side.
async fn bed(interfaces: &[(&str, &str)], client_udp: &str, gateway_udp: &str) -> Bed {
    let shutdown = CancellationToken::new();
    let server = udp_socket("127.0.0.1").await;
    let k = key();
    let gw = gateway(
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[udp]\n{gateway_udp}\n[services.dgram]\ntarget = \"{}\"\nprotocol = \"udp\"\n[clients.m]\nkey = \"{}\"\nservices = [\"dgram\"]\n",
            server.local_addr().unwrap(),
            k.public()
        ),
        &shutdown,
    )
    .await;
    let ifaces: String = interfaces
        .iter()
        .enumerate()
        .map(|(i, (name, src))| {
            format!(
                "[interfaces.{name}]\nsource = \"{src}\"\npriority = {}\n",
                i + 1
            )
        })
        .collect();
    let toml = format!(
        "id = \"m\"\nkey_file = \"unused\"\n[udp]\n{client_udp}\n{ifaces}[gateways.gw]\naddresses = [\"{}\"]\n[services.dgram]\ngateway = \"gw\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n",
        gw.local_addrs()[0],
    );
    let cfg = ClientConfig::from_toml(std::path::Path::new("udp-client.toml"), &toml).unwrap();
    let client = Client::start(cfg, k, shutdown.clone()).await.unwrap();
    assert_eq!(client.wait_up("gw").await.unwrap().path, interfaces[0].0);
    let service = client.service_addr("dgram").unwrap();
    Bed {
        shutdown,
        gw,
        client,
        server,
        service,
    }
}

impl Bed {
    fn service_status(&self) -> UdpServiceStatus {
        self.client
            .udp_status()
            .services
            .into_iter()
            .next()
            .unwrap()
    }

    fn flows(&self) -> Vec<UdpFlowStatus> {
        self.client.udp_status().flows
    }

    fn gw_flows(&self) -> Vec<GatewayFlowStatus> {
        self.gw.udp_flows()
    }

    /// Sends `hello` from `app` and waits for it at the target; returns the
    /// gateway's socket for the flow (where the target answers).
    async fn open_flow(&self, app: &UdpSocket) -> SocketAddr {
        app.send_to(b"hello", self.service).await.unwrap();
        let (d, from) = recv_within(&self.server, Duration::from_secs(10))
            .await
            .expect("first datagram reaches the target");
        assert_eq!(d, b"hello");
        from
    }
}

/// Echoes every datagram the target receives, until the test ends.
fn echo(server: Arc<UdpSocket>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_every_datagram_exactly() {
    tokio::time::timeout(LIMIT, async {
        let bed = bed(&[("a", "127.0.0.2")], "", "").await;
        echo(bed.server.clone());
        let apps = [udp_socket("127.0.0.1").await, udp_socket("127.0.0.1").await];
        // Sizes from empty to the largest relayable payload.
        let mut sizes: Vec<usize> = vec![0, 1, 1200, 1472, 8000, 30_000, MAX_PAYLOAD];
        sizes.extend((0..93).map(|i| 1 + i * 13));
        let n = sizes.len();
        for (i, size) in sizes.iter().enumerate() {
            // Two flows take turns; each must get its own datagrams back.
            for (j, app) in apps.iter().enumerate() {
                let d: Vec<u8> = (0..*size)
                    .map(|k| (i * 7 + j * 101 + k * 3) as u8)
                    .collect();
                app.send_to(&d, bed.service).await.unwrap();
                let (back, from) = recv_within(app, Duration::from_secs(10))
                    .await
                    .expect("echo within 10s");
                assert_eq!(from, bed.service, "answers come from the service address");
                assert!(
                    back == d,
                    "datagram {i} of flow {j} ({size} bytes) came back changed"
                );
            }
        }
        // Too large to relay: dropped and counted, nothing comes back.
        apps[0]
            .send_to(&vec![1u8; MAX_PAYLOAD + 1], bed.service)
            .await
            .unwrap();
        assert!(recv_within(&apps[0], Duration::from_millis(300))
            .await
            .is_none());
        let s = bed.service_status();
        println!("{s:?}");
        assert_eq!((s.flows, s.flows_opened), (2, 2));
        assert_eq!(
            (s.from_app, s.sent, s.received, s.dropped, s.too_large),
            (2 * n as u64 + 1, 2 * n as u64, 2 * n as u64, 0, 1)
        );
        for f in bed.flows() {
            assert_eq!(
                (f.state, f.from_app, f.sent, f.received, f.dropped, f.held),
                ("open", n as u64, n as u64, n as u64, 0, 0)
            );
        }
        let g = bed.gw_flows();
        assert_eq!(g.len(), 2);
        assert!(
            g.iter()
                .all(|f| f.from_client == n as u64 && f.to_client == n as u64 && f.dropped == 0),
            "{g:?}"
        );
        let st = &bed.gw.stats().udp;
        assert_eq!(
            (
                st.forged.load(Ordering::Relaxed),
                st.replayed.load(Ordering::Relaxed)
            ),
            (0, 0)
        );
        bed.shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// Receives numbered datagrams until `quiet` passes without one; returns
/// the numbers in arrival order. Panics on a changed datagram.
async fn collect(s: Arc<UdpSocket>, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some((d, _)) = recv_within(&s, quiet).await {
        if d == b"hello" {
            continue;
        }
        got.push(number_of(&d).unwrap_or_else(|| panic!("datagram changed: {} bytes", d.len())));
    }
    got
}

fn exactly_once(got: &[u64], what: &str) -> BTreeSet<u64> {
    let set: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "{what}: duplicates");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn numbered_datagrams_cross_planned_and_sudden_switches() {
    tokio::time::timeout(LIMIT, async {
        const N: u64 = 2500;
        // A small hold bound, so that a pause of a few milliseconds may
        // already drop: the count must still match the loss exactly.
        const HOLD: u64 = 8;
        let hold = format!("hold = {HOLD}");
        let bed = bed(&[("a", "127.0.0.2"), ("b", "127.0.0.3")], &hold, &hold).await;
        let app = udp_socket("127.0.0.1").await;
        let flow_addr = bed.open_flow(&app).await;
        // The target answers the app: the flow is open on both sides.
        bed.server.send_to(b"hello", flow_addr).await.unwrap();
        assert_eq!(recv_within(&app, Duration::from_secs(5)).await.unwrap().0, b"hello");

        // Up: the application sends to the service; down: the target sends to the flow.
        let (app2, service) = (app.clone(), bed.service);
        let up = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..N {
                every.tick().await;
                app2.send_to(&numbered(i), service).await.unwrap();
            }
        });
        let server2 = bed.server.clone();
        let down = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..N {
                every.tick().await;
                server2.send_to(&numbered(i), flow_addr).await.unwrap();
            }
        });
        let at_server = tokio::spawn(collect(bed.server.clone(), Duration::from_secs(3)));
        let at_app = tokio::spawn(collect(app.clone(), Duration::from_secs(3)));

        let c = &bed.client;
        let drops = || (bed.service_status().dropped, bed.gw_flows()[0].dropped);
        let mut phases = Vec::new();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c.switch("b").await.unwrap();
        assert_eq!((r[0].from.as_str(), r[0].to.as_str()), ("a", "b"));
        tokio::time::sleep(Duration::from_millis(400)).await;
        phases.push(("planned a→b", drops()));
        c.switch("a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        phases.push(("planned b→a", drops()));
        // Sudden: a goes down while datagrams flow both ways.
        c.set_path_up("a", false).unwrap();
        assert!(eventually(Duration::from_secs(10), || c.switches().len() >= 3).await);
        assert_eq!(c.wait_up("gw").await.unwrap().path, "b");
        c.set_path_up("a", true).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        phases.push(("sudden a→b", drops()));
        println!("cumulative drops (agent, gateway) after each switch: {phases:?}");
        up.await.unwrap();
        down.await.unwrap();

        let got_up = at_server.await.unwrap();
        let got_down = at_app.await.unwrap();
        let (set_up, set_down) = (exactly_once(&got_up, "up"), exactly_once(&got_down, "down"));
        assert!(set_up.iter().chain(&set_down).all(|n| *n < N));
        // What was lost is exactly what baton counted as dropped at the hold
        // bound: nothing else is lost on loopback.
        let s = bed.service_status();
        let g = &bed.gw_flows()[0];
        let switches: Vec<_> = c.switches().iter().map(|w| (w.kind, w.duration_ms)).collect();
        let delayed_down = bed.gw.stats().udp.delayed.load(Ordering::Relaxed);
        println!(
            "up: {} of {N} received, {} held then sent, {} dropped by the agent; down: {} of {N} received, {delayed_down} held then sent, {} dropped by the gateway; switches (kind, ms) {switches:?}; now {:?}",
            set_up.len(),
            s.delayed,
            s.dropped,
            set_down.len(),
            g.dropped,
            bed.client.udp_status().gateways
        );
        assert_eq!(set_up.len() as u64 + s.dropped, N, "up: received + counted drops == sent");
        assert_eq!(set_down.len() as u64 + g.dropped, N, "down: received + counted drops == sent");
        assert_eq!((s.from_app, s.sent + s.dropped), (N + 1, N + 1));
        assert_eq!(g.from_target, N + 1);
        let st = &bed.gw.stats().udp;
        assert_eq!((st.forged.load(Ordering::Relaxed), st.replayed.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(bed.gw.session_count(), 1, "one session throughout");
        bed.shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_path_only_the_newest_held_datagrams_arrive() {
    tokio::time::timeout(LIMIT, async {
        const BOUND: u64 = 32;
        const SENT: u64 = 100;
        let bed = bed(
            &[("a", "127.0.0.2")],
            &format!("hold = {BOUND}"),
            &format!("hold = {BOUND}"),
        )
        .await;
        let app = udp_socket("127.0.0.1").await;
        let flow_addr = bed.open_flow(&app).await;
        bed.server.send_to(b"hello", flow_addr).await.unwrap();
        assert_eq!(
            recv_within(&app, Duration::from_secs(5)).await.unwrap().0,
            b"hello"
        );

        // The only interface goes down: both sides hold.
        bed.client.set_path_up("a", false).unwrap();
        let c = &bed.client;
        assert!(
            eventually(Duration::from_secs(10), || matches!(
                c.link_state("gw"),
                Some(LinkState::Switching(_))
            ))
            .await
        );
        assert!(
            eventually(Duration::from_secs(10), || bed
                .gw_flows()
                .iter()
                .all(|f| !f.sending))
            .await,
            "gateway holds"
        );
        for i in 0..SENT {
            app.send_to(&numbered(i), bed.service).await.unwrap();
            bed.server.send_to(&numbered(i), flow_addr).await.unwrap();
        }
        let dropped = SENT - BOUND;
        assert!(
            eventually(Duration::from_secs(10), || {
                let f = &bed.flows()[0];
                let g = &bed.gw_flows()[0];
                (f.held, f.dropped, g.held, g.dropped)
                    == (BOUND as usize, dropped, BOUND as usize, dropped)
            })
            .await,
            "held and dropped: agent {:?}, gateway {:?}",
            bed.flows(),
            bed.gw_flows()
        );
        assert!(
            recv_within(&bed.server, Duration::from_millis(200))
                .await
                .is_none(),
            "nothing leaks while held"
        );

        bed.client.set_path_up("a", true).unwrap();
        let want: Vec<u64> = (dropped..SENT).collect();
        let got_up = collect(bed.server.clone(), Duration::from_secs(3)).await;
        let got_down = collect(app.clone(), Duration::from_millis(500)).await;
        println!(
            "sent {SENT} each way with a bound of {BOUND}: up got {:?}..., down got {} datagrams",
            &got_up[..3.min(got_up.len())],
            got_down.len()
        );
        assert_eq!(got_up, want, "up: exactly the newest {BOUND}, in order");
        assert_eq!(got_down, want, "down: exactly the newest {BOUND}, in order");
        let s = bed.service_status();
        assert_eq!((s.dropped, s.sent), (dropped, 1 + BOUND));
        let g = &bed.gw_flows()[0];
        assert_eq!((g.dropped, g.to_client, g.held), (dropped, 1 + BOUND, 0));
        assert_eq!(bed.gw.stats().udp.dropped.load(Ordering::Relaxed), dropped);
        bed.shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// `baton status --json`'s document, through the admin socket.
async fn admin_status(client: &Client, shutdown: &CancellationToken) -> serde_json::Value {
    let path = std::env::temp_dir().join(format!(
        "baton-udp-test-{}-{}.sock",
        std::process::id(),
        rand_suffix()
    ));
    tokio::spawn(baton_runtime::admin::serve(
        client.clone(),
        path.clone(),
        shutdown.child_token(),
    ));
    for _ in 0..100 {
        if let Ok(v) =
            baton_runtime::admin::request(&path, &baton_runtime::admin::Request::Status).await
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("admin socket never answered");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire_on_the_agent_and_on_the_gateway() {
    tokio::time::timeout(LIMIT, async {
        // The agent's timeout is the shorter: it expires the flow and tells
        // the gateway.
        let bed1 = bed(
            &[("a", "127.0.0.2")],
            "idle_timeout = \"400ms\"",
            "idle_timeout = \"30s\"",
        )
        .await;
        echo(bed1.server.clone());
        let app = udp_socket("127.0.0.1").await;
        app.send_to(b"ping", bed1.service).await.unwrap();
        assert_eq!(
            recv_within(&app, Duration::from_secs(5)).await.unwrap().0,
            b"ping"
        );
        assert_eq!((bed1.flows().len(), bed1.gw_flows().len()), (1, 1));
        assert!(
            eventually(Duration::from_secs(5), || bed1.flows().is_empty()
                && bed1.gw_flows().is_empty())
            .await
        );
        let s = bed1.service_status();
        assert_eq!((s.flows, s.flows_expired, s.flows_closed), (0, 1, 0));
        let gs = &bed1.gw.stats().udp;
        assert_eq!(
            (
                gs.flows_closed.load(Ordering::Relaxed),
                gs.flows_expired.load(Ordering::Relaxed)
            ),
            (1, 0)
        );
        let st = admin_status(&bed1.client, &bed1.shutdown).await;
        assert_eq!(st["udp"]["flows"].as_array().unwrap().len(), 0, "{st}");
        assert_eq!(st["udp"]["services"][0]["flows_expired"], 1, "{st}");
        // The application goes on: a new flow.
        app.send_to(b"again", bed1.service).await.unwrap();
        assert_eq!(
            recv_within(&app, Duration::from_secs(5)).await.unwrap().0,
            b"again"
        );
        assert_eq!(bed1.service_status().flows_opened, 2);
        bed1.shutdown.cancel();

        // The gateway's timeout is the shorter: it expires the flow and
        // tells the agent.
        let bed2 = bed(
            &[("a", "127.0.0.2")],
            "idle_timeout = \"30s\"",
            "idle_timeout = \"400ms\"",
        )
        .await;
        echo(bed2.server.clone());
        app.send_to(b"ping", bed2.service).await.unwrap();
        assert_eq!(
            recv_within(&app, Duration::from_secs(5)).await.unwrap().0,
            b"ping"
        );
        assert!(
            eventually(Duration::from_secs(5), || bed2.flows().is_empty()
                && bed2.gw_flows().is_empty())
            .await
        );
        let s = bed2.service_status();
        assert_eq!((s.flows, s.flows_expired, s.flows_closed), (0, 0, 1));
        let gs = &bed2.gw.stats().udp;
        assert_eq!(
            (
                gs.flows_expired.load(Ordering::Relaxed),
                gs.flows_closed.load(Ordering::Relaxed)
            ),
            (1, 0)
        );
        let st = admin_status(&bed2.client, &bed2.shutdown).await;
        assert_eq!(st["udp"]["services"][0]["flows_closed"], 1, "{st}");
        app.send_to(b"again", bed2.service).await.unwrap();
        assert_eq!(
            recv_within(&app, Duration::from_secs(5)).await.unwrap().0,
            b"again"
        );
        bed2.shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_datagrams_are_ignored_and_never_move_the_flow() {
    tokio::time::timeout(LIMIT, async {
        // The test plays the client agent by hand, to send what a real one
        // never would.
        let shutdown = CancellationToken::new();
        let server = udp_socket("127.0.0.1").await;
        echo(server.clone());
        let k = key();
        let gw = gateway(
            &format!(
                "listen = [\"127.0.0.1:0\"]\n[services.dgram]\ntarget = \"{}\"\nprotocol = \"udp\"\n[services.tcp]\ntarget = \"127.0.0.1:9\"\n[clients.m]\nkey = \"{}\"\nservices = [\"dgram\", \"tcp\"]\n",
                server.local_addr().unwrap(),
                k.public()
            ),
            &shutdown,
        )
        .await;
        let gw_addr = gw.local_addrs()[0];
        let mut raw = raw_session(gw_addr, "m", &k).await.unwrap();
        let mut control = |msg: Message| {
            let mut out = Vec::new();
            raw.cipher.seal(&msg, &mut out);
            out
        };
        let open = control(Message::FlowOpen { flow: FlowId(1), service: "dgram".into() });
        let open_tcp = control(Message::FlowOpen { flow: FlowId(2), service: "tcp".into() });
        raw.stream.write_all(&open).await.unwrap();
        raw.stream.write_all(&open_tcp).await.unwrap();
        let mut replies = Vec::new();
        while replies.len() < 2 {
            let (frame, tag) = read_frame(&mut raw.stream, true).await.unwrap();
            let m = raw.cipher.open(frame[..3].try_into().unwrap(), &frame[3..], &tag).unwrap();
            if let Message::FlowReply { flow, result, .. } = m {
                replies.push((flow, result));
            }
        }
        replies.sort_by_key(|r| r.0);
        assert_eq!(replies[0], (FlowId(1), Ok(())));
        assert_eq!(replies[1], (FlowId(2), Err(baton_proto::RefuseReason::ServiceNotAllowed)), "a TCP service is no UDP service");

        let key = raw.keys.leg_key();
        let sid = raw.session_id;
        let datagram = |seq: u64, payload: &[u8]| {
            let mut out = Vec::new();
            Header { kind: Kind::Data, session_id: sid, flow: FlowId(1), seq }.seal(Role::Client, payload, &key, &mut out).unwrap();
            out
        };
        let (a, b) = (udp_socket("127.0.0.2").await, udp_socket("127.0.0.3").await);
        let echo_at = |s: Arc<UdpSocket>| {
            let key = key.clone();
            async move {
                let (d, _) = recv_within(&s, Duration::from_millis(500)).await?;
                let (h, p) = Header::open(&d, &key, Role::Gateway).expect("the gateway's datagram opens");
                assert_eq!((h.kind, h.flow), (Kind::Data, FlowId(1)));
                Some(p.to_vec())
            }
        };
        let client_addr = || gw.udp_flows()[0].client_addr;
        let stats = || {
            let s = &gw.stats().udp;
            (s.forged.load(Ordering::Relaxed), s.replayed.load(Ordering::Relaxed), s.from_client.load(Ordering::Relaxed))
        };

        let one = datagram(1, b"one");
        a.send_to(&one, gw_addr).await.unwrap();
        assert_eq!(echo_at(a.clone()).await.as_deref(), Some(&b"one"[..]));
        assert_eq!(client_addr(), Some(a.local_addr().unwrap()));

        // Replayed from another address: ignored, counted, the flow stays.
        b.send_to(&one, gw_addr).await.unwrap();
        // Forged: a flipped payload bit, a flipped tag bit, a session the
        // gateway does not hold, another key.
        let two = datagram(2, b"two");
        for i in [27, two.len() - 1] {
            let mut bad = two.clone();
            bad[i] ^= 1;
            b.send_to(&bad, gw_addr).await.unwrap();
        }
        let mut other_session = Vec::new();
        Header { kind: Kind::Data, session_id: sid ^ 1, flow: FlowId(1), seq: 9 }.seal(Role::Client, b"x", &key, &mut other_session).unwrap();
        b.send_to(&other_session, gw_addr).await.unwrap();
        let (other_keys, _) = {
            let r2 = raw_session(gw_addr, "m", &k).await.unwrap();
            (r2.keys, r2.session_id)
        };
        let mut wrong_key = Vec::new();
        Header { kind: Kind::Data, session_id: sid, flow: FlowId(1), seq: 3 }.seal(Role::Client, b"x", &other_keys.leg_key(), &mut wrong_key).unwrap();
        b.send_to(&wrong_key, gw_addr).await.unwrap();
        assert!(echo_at(b.clone()).await.is_none(), "nothing answered to the forger");
        assert!(eventually(Duration::from_secs(5), || stats() == (4, 1, 1)).await, "forged, replayed, relayed: {:?}", stats());
        assert_eq!(client_addr(), Some(a.local_addr().unwrap()), "the flow did not move");

        // The genuine next datagram from the new address moves the flow.
        b.send_to(&two, gw_addr).await.unwrap();
        assert_eq!(echo_at(b.clone()).await.as_deref(), Some(&b"two"[..]));
        assert_eq!(client_addr(), Some(b.local_addr().unwrap()));
        // A late but unseen datagram from the old address is relayed, and
        // does not take the flow back.
        b.send_to(&datagram(5, b"five"), gw_addr).await.unwrap();
        assert_eq!(echo_at(b.clone()).await.as_deref(), Some(&b"five"[..]));
        a.send_to(&datagram(4, b"four"), gw_addr).await.unwrap();
        assert_eq!(echo_at(b.clone()).await.as_deref(), Some(&b"four"[..]));
        assert_eq!(client_addr(), Some(b.local_addr().unwrap()));
        assert!(recv_within(&a, Duration::from_millis(200)).await.is_none());
        assert_eq!(stats(), (4, 1, 4));
        println!("forged {}, replayed {}, relayed {}", stats().0, stats().1, stats().2);
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

// ---------------------------------------------------------------------
// UDP client services
// ---------------------------------------------------------------------
//
// The gateway's `telemetry` is a UDP client service on port 7000, the same
// port as the TCP `push`: servers beside the gateway send datagrams to an
// agent's address there, and each server address is a flow the gateway
// opens. Each test has its own pool (127.77.N.0/24, N from 11) so that
// tests running in parallel never share an address.

const PORT: u16 = 7000;

/// A gateway with the TCP client service `push` and the UDP client service
/// `telemetry`, both on port 7000, the pool `127.77.{net}.0/24`, `[udp]`
/// settings `udp`, and the given clients: (id, key), each allowed both.
async fn udp_gateway(
    net: u8,
    clients: &[(&str, &ClientKey)],
    udp: &str,
    shutdown: &CancellationToken,
) -> Gateway {
    let mut toml = format!(
        "listen = [\"127.0.0.1:0\"]\nvirtual_pool = \"127.77.{net}.0/24\"\n[udp]\n{udp}\n[exposed.push]\nport = {PORT}\n\
         [exposed.telemetry]\nport = {PORT}\nprotocol = \"udp\"\n"
    );
    for (id, key) in clients {
        toml.push_str(&format!(
            "[clients.{id}]\nkey = \"{}\"\nexposes = [\"push\", \"telemetry\"]\n",
            key.public()
        ));
    }
    gateway(&toml, shutdown).await
}

/// A client agent with the interfaces `a` (127.0.0.2) and `b` (127.0.0.3)
/// exposing `telemetry` (over `protocol`, to `target`) and `push` (TCP, to
/// `push_target`) through `gw`, with `[udp]` settings `udp`.
#[allow(clippy::too_many_arguments)]
async fn cs_agent(
    id: &str,
    key: &ClientKey,
    gw: &Gateway,
    target: SocketAddr,
    protocol: &str,
    push_target: SocketAddr,
    udp: &str,
    shutdown: &CancellationToken,
) -> Client {
    let toml = format!(
        "id = \"{id}\"\nkey_file = \"unused\"\n[udp]\n{udp}\n[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n\
         [interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n[gateways.gw]\naddresses = [\"{}\"]\n\
         [exposed.push]\ngateway = \"gw\"\ntarget = \"{push_target}\"\n\
         [exposed.telemetry]\ngateway = \"gw\"\ntarget = \"{target}\"\nprotocol = \"{protocol}\"\n",
        gw.local_addrs()[0]
    );
    let cfg =
        ClientConfig::from_toml(std::path::Path::new("udp-client-services.toml"), &toml).unwrap();
    let c = Client::start(cfg, key.clone(), shutdown.clone())
        .await
        .unwrap();
    c.wait_up("gw").await.unwrap();
    c
}

/// A UDP client service agent (`telemetry` over UDP).
async fn udp_agent(
    id: &str,
    key: &ClientKey,
    gw: &Gateway,
    target: SocketAddr,
    push_target: SocketAddr,
    udp: &str,
    shutdown: &CancellationToken,
) -> Client {
    cs_agent(id, key, gw, target, "udp", push_target, udp, shutdown).await
}

/// Where the gateway listens for the agent's client service `name`.
async fn exposed_address(c: &Client, name: &str) -> SocketAddr {
    let find = || c.exposed().into_iter().find(|e| e.name == name).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || find().state
            != ExposedState::Pending)
        .await,
        "the gateway never answered for {name}"
    );
    let e = find();
    assert_eq!(e.state, ExposedState::Listening, "{e:?}");
    e.address.unwrap()
}

async fn telemetry_address(c: &Client) -> SocketAddr {
    exposed_address(c, "telemetry").await
}

/// A TCP service on the client's side that answers each connection with
/// "NAME got " and everything it read.
async fn tagged_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s
                        .write_all(&[format!("{name} got ").as_bytes(), &got].concat())
                        .await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Pushes `msg` to `addr` over TCP, half-closes, and returns the whole answer.
async fn push(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("push stalled")
        .unwrap();
    got
}

/// A UDP service on the client's side that answers each datagram with
/// "NAME got " and the datagram, and reports what it received.
async fn tagged_udp_target(name: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let s = udp_socket("127.0.0.1").await;
    let addr = s.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let mut reply = format!("{name} got ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from).await;
            let _ = tx.send(buf[..n].to_vec());
        }
    });
    (addr, rx)
}

fn exposed_status(c: &Client) -> baton_runtime::udp::ExposedUdpStatus {
    c.udp_status()
        .exposed
        .into_iter()
        .find(|e| e.service == "telemetry")
        .unwrap()
}

fn server_flows(gw: &Gateway) -> Vec<GatewayFlowStatus> {
    gw.udp_flows()
        .into_iter()
        .filter(|f| f.opened_by == Origin::Gateway)
        .collect()
}

/// (a) Servers beside the gateway send numbered datagrams to an agent's UDP
/// client service; its target gets each one exactly, and each server gets
/// exactly the target's answers, from the address it sent to. The TCP
/// client service on the same port works alongside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reach_an_agents_udp_client_service_and_get_its_answers_exactly() {
    tokio::time::timeout(LIMIT, async {
        const N: u64 = 300;
        let shutdown = CancellationToken::new();
        let k = key();
        let gw = udp_gateway(11, &[("a", &k)], "", &shutdown).await;
        let (target, mut got) = tagged_udp_target("a").await;
        let push_target = tagged_server("a").await;
        let c = udp_agent("a", &k, &gw, target, push_target, "", &shutdown).await;
        let addr = telemetry_address(&c).await;
        assert_eq!(
            (addr.port(), Some(addr.ip())),
            (PORT, gw.client_address("a"))
        );
        assert_eq!(
            exposed_address(&c, "push").await,
            addr,
            "TCP and UDP client services share the agent's address and port"
        );

        let servers = [udp_socket("127.0.0.1").await, udp_socket("127.0.0.1").await];
        // Sizes from empty to large, not only the numbered ones.
        for (i, size) in [0usize, 1, 1472, 30_000].into_iter().enumerate() {
            let d: Vec<u8> = (0..size).map(|k| (i * 31 + k * 7) as u8).collect();
            servers[i % 2].send_to(&d, addr).await.unwrap();
            let (back, from) = recv_within(&servers[i % 2], Duration::from_secs(10))
                .await
                .expect("an answer within 10s");
            assert_eq!(
                from, addr,
                "answers come from the address the server sent to"
            );
            assert!(
                back == [b"a got ".as_slice(), &d].concat(),
                "{size}-byte datagram: answer changed"
            );
            assert!(
                got.recv().await.unwrap() == d,
                "{size}-byte datagram changed on its way to the target"
            );
        }
        for n in 0..N {
            // The two servers take turns: each must get its own answers.
            let s = &servers[(n % 2) as usize];
            s.send_to(&numbered(n), addr).await.unwrap();
            let (back, from) = recv_within(s, Duration::from_secs(10))
                .await
                .expect("an answer within 10s");
            assert_eq!(from, addr);
            assert_eq!(back.get(..6), Some(&b"a got "[..]));
            assert_eq!(number_of(&back[6..]), Some(n), "answer to datagram {n}");
            assert_eq!(
                number_of(&got.recv().await.unwrap()),
                Some(n),
                "datagram {n} at the target"
            );
        }
        assert!(
            recv_within(&servers[0], Duration::from_millis(200))
                .await
                .is_none(),
            "no answer twice"
        );
        assert!(got.try_recv().is_err(), "no datagram twice");
        assert_eq!(push(addr, b"tcp too").await, b"a got tcp too");

        // Both sides show two flows, one per server, opened by the gateway.
        let per_server = N / 2 + 2;
        let flows = server_flows(&gw);
        println!("gateway: {flows:?}");
        assert_eq!(flows.len(), 2);
        let mut servers_seen: Vec<SocketAddr> = flows.iter().map(|f| f.target).collect();
        servers_seen.sort();
        let mut want: Vec<SocketAddr> = servers.iter().map(|s| s.local_addr().unwrap()).collect();
        want.sort();
        assert_eq!(servers_seen, want);
        for f in &flows {
            assert!(
                f.flow >= 1 << 31,
                "gateway flow ids have the top bit: {}",
                f.flow
            );
            assert_eq!((f.service.as_str(), f.state), ("telemetry", "open"));
            assert_eq!(
                (f.from_target, f.to_client, f.from_client, f.dropped),
                (per_server, per_server, per_server, 0)
            );
        }
        let e = exposed_status(&c);
        println!("agent: {e:?}");
        assert_eq!((e.flows, e.flows_opened, e.flows_refused), (2, 2, 0));
        assert_eq!(
            (e.received, e.from_target, e.sent, e.dropped),
            (2 * per_server, 2 * per_server, 2 * per_server, 0)
        );
        let st = baton_runtime::admin::status(&c).await;
        assert_eq!(
            st["udp"]["exposed_flows"].as_array().unwrap().len(),
            2,
            "{st}"
        );
        let tele = st["exposed"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "telemetry")
            .unwrap()
            .clone();
        assert_eq!(
            (tele["protocol"].as_str(), tele["state"].as_str()),
            (Some("udp"), Some("listening"))
        );
        let us = &gw.stats().udp;
        assert_eq!(
            (
                us.forged.load(Ordering::Relaxed),
                us.replayed.load(Ordering::Relaxed)
            ),
            (0, 0)
        );
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// (b) Two agents expose the same UDP port, each on its own address: every
/// datagram reaches the agent it was sent to, and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_the_same_udp_port_each_get_their_own_datagrams() {
    tokio::time::timeout(LIMIT, async {
        let shutdown = CancellationToken::new();
        let (ka, kb) = (key(), key());
        let gw = udp_gateway(12, &[("a", &ka), ("b", &kb)], "", &shutdown).await;
        let (ta, mut got_a) = tagged_udp_target("a").await;
        let (tb, mut got_b) = tagged_udp_target("b").await;
        let push_target = tagged_server("x").await;
        let a = udp_agent("a", &ka, &gw, ta, push_target, "", &shutdown).await;
        let b = udp_agent("b", &kb, &gw, tb, push_target, "", &shutdown).await;
        let (addr_a, addr_b) = (telemetry_address(&a).await, telemetry_address(&b).await);
        assert_ne!(addr_a.ip(), addr_b.ip());
        assert_eq!((addr_a.port(), addr_b.port()), (PORT, PORT));
        // One server socket sends to both, interleaved: answers must not cross.
        let server = udp_socket("127.0.0.1").await;
        for i in 0..50 {
            let (to_a, to_b) = (format!("reading {i} for a"), format!("reading {i} for b"));
            server.send_to(to_a.as_bytes(), addr_a).await.unwrap();
            server.send_to(to_b.as_bytes(), addr_b).await.unwrap();
            let mut answers = Vec::new();
            for _ in 0..2 {
                let (d, from) = recv_within(&server, Duration::from_secs(10))
                    .await
                    .expect("both answer within 10s");
                answers.push((from, String::from_utf8(d).unwrap()));
            }
            answers.sort();
            let mut want = vec![
                (addr_a, format!("a got {to_a}")),
                (addr_b, format!("b got {to_b}")),
            ];
            want.sort();
            assert_eq!(answers, want);
            assert_eq!(got_a.recv().await.unwrap(), to_a.as_bytes());
            assert_eq!(got_b.recv().await.unwrap(), to_b.as_bytes());
        }
        assert!(recv_within(&server, Duration::from_millis(200))
            .await
            .is_none());
        assert!(
            got_a.try_recv().is_err() && got_b.try_recv().is_err(),
            "a datagram reached an agent twice"
        );
        let (ea, eb) = (exposed_status(&a), exposed_status(&b));
        assert_eq!(
            (ea.flows_opened, ea.received, eb.flows_opened, eb.received),
            (1, 50, 1, 50)
        );
        let flows = server_flows(&gw);
        assert_eq!(flows.len(), 2, "one flow per agent: {flows:?}");
        assert!(flows.iter().all(|f| f.from_target == 50
            && f.to_client == 50
            && f.target == server.local_addr().unwrap()));
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// (c) A server pushes numbered datagrams to the agent's UDP client service
/// while the target answers with its own, across a planned and a sudden
/// switch of the agent and then an outage longer than the hold bound lasts:
/// each way, received + counted drops == sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_udp_push_flow_crosses_planned_and_sudden_switches() {
    tokio::time::timeout(LIMIT, async {
        const N: u64 = 2500;
        // A small hold bound, so that a pause of a few milliseconds may
        // already drop: the count must still match the loss exactly.
        const HOLD: u64 = 8;
        let hold = format!("hold = {HOLD}");
        let shutdown = CancellationToken::new();
        let k = key();
        let gw = udp_gateway(13, &[("a", &k)], &hold, &shutdown).await;
        let target = udp_socket("127.0.0.1").await;
        let push_target = tagged_server("a").await;
        let c = udp_agent("a", &k, &gw, target.local_addr().unwrap(), push_target, &hold, &shutdown).await;
        let addr = telemetry_address(&c).await;
        // The flow opens: the target learns the agent's socket for it and
        // answers once.
        let server = udp_socket("127.0.0.1").await;
        server.send_to(b"hello", addr).await.unwrap();
        let (d, flow_addr) = recv_within(&target, Duration::from_secs(10)).await.expect("first datagram reaches the target");
        assert_eq!(d, b"hello");
        target.send_to(b"hello", flow_addr).await.unwrap();
        assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap(), (b"hello".to_vec(), addr));

        // Push: server → target; answers: target → server.
        let (server2, target2) = (server.clone(), target.clone());
        let pace = |s: Arc<UdpSocket>, to: SocketAddr| async move {
            let mut every = tokio::time::interval(Duration::from_millis(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..N {
                every.tick().await;
                s.send_to(&numbered(i), to).await.unwrap();
            }
        };
        let push_task = tokio::spawn(pace(server2, addr));
        let answer_task = tokio::spawn(pace(target2, flow_addr));
        let at_target = tokio::spawn(collect(target.clone(), Duration::from_secs(3)));
        let at_server = tokio::spawn(collect(server.clone(), Duration::from_secs(3)));

        let drops = || (server_flows(&gw)[0].dropped, exposed_status(&c).dropped);
        let mut phases = Vec::new();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = c.switch("b").await.unwrap();
        assert_eq!((r[0].from.as_str(), r[0].to.as_str()), ("a", "b"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        phases.push(("planned a→b", drops()));
        // Sudden: b goes down while datagrams flow both ways.
        c.set_path_up("b", false).unwrap();
        assert!(eventually(Duration::from_secs(10), || c.switches().len() >= 2).await, "no sudden switch");
        assert_eq!(c.wait_up("gw").await.unwrap().path, "a");
        c.set_path_up("b", true).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        phases.push(("sudden b→a", drops()));
        // No path at all for a while: both sides hold up to the bound and
        // drop the oldest beyond it.
        c.set_path_up("a", false).unwrap();
        c.set_path_up("b", false).unwrap();
        assert!(eventually(Duration::from_secs(10), || server_flows(&gw).iter().all(|f| !f.sending)).await, "the gateway holds");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.set_path_up("b", true).unwrap();
        assert_eq!(c.wait_up("gw").await.unwrap().path, "b");
        c.set_path_up("a", true).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let outage = drops();
        phases.push(("no path 300 ms, then b", outage));
        println!("cumulative drops (gateway, agent) after each switch: {phases:?}");
        assert!(outage.0 > phases[1].1 .0 && outage.1 > phases[1].1 .1, "the outage passed the hold bound on both sides: {phases:?}");
        push_task.await.unwrap();
        answer_task.await.unwrap();

        let got_push = at_target.await.unwrap();
        let got_answers = at_server.await.unwrap();
        let (set_push, set_answers) = (exactly_once(&got_push, "push"), exactly_once(&got_answers, "answers"));
        assert!(set_push.iter().chain(&set_answers).all(|n| *n < N));
        let g = &server_flows(&gw)[0];
        let e = exposed_status(&c);
        let ef = &c.udp_status().exposed_flows[0];
        let switches: Vec<_> = c.switches().iter().map(|w| (w.kind, w.duration_ms)).collect();
        println!(
            "push: {} of {N} received, {} dropped by the gateway ({} held then sent over all flows); answers: {} of {N} received, {} dropped by the agent ({} held then sent); switches (kind, ms) {switches:?}",
            set_push.len(),
            g.dropped,
            gw.stats().udp.delayed.load(Ordering::Relaxed),
            set_answers.len(),
            e.dropped,
            e.delayed,
        );
        assert_eq!(set_push.len() as u64 + g.dropped, N, "push: received + counted drops == sent");
        assert_eq!(set_answers.len() as u64 + e.dropped, N, "answers: received + counted drops == sent");
        assert_eq!((g.from_target, g.to_client + g.dropped), (N + 1, N + 1));
        assert_eq!((ef.from_target, ef.sent + ef.dropped, ef.received), (N + 1, N + 1, set_push.len() as u64 + 1));
        assert_eq!((e.flows_opened, e.flows_closed, e.flows_expired), (1, 0, 0), "one flow throughout");
        let us = &gw.stats().udp;
        assert_eq!((us.forged.load(Ordering::Relaxed), us.replayed.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(gw.session_count(), 1, "one session throughout");
        target.send_to(b"still there", flow_addr).await.unwrap();
        assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap(), (b"still there".to_vec(), addr), "answers still come from the agent's address");
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// (d) A gateway-opened flow with no datagram either way for the idle
/// timeout is removed on both sides, whichever side's timeout is shorter;
/// the server's next datagram opens a new flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_udp_client_service_flows_expire_on_both_sides() {
    tokio::time::timeout(LIMIT, async {
        let server = udp_socket("127.0.0.1").await;
        // (agent's idle timeout, gateway's idle timeout, pool)
        for (agent_idle, gw_idle, net) in [("400ms", "30s", 14), ("30s", "400ms", 15)] {
            let shutdown = CancellationToken::new();
            let k = key();
            let gw = udp_gateway(
                net,
                &[("a", &k)],
                &format!("idle_timeout = \"{gw_idle}\""),
                &shutdown,
            )
            .await;
            let (target, _got) = tagged_udp_target("a").await;
            let push_target = tagged_server("a").await;
            let c = udp_agent(
                "a",
                &k,
                &gw,
                target,
                push_target,
                &format!("idle_timeout = \"{agent_idle}\""),
                &shutdown,
            )
            .await;
            let addr = telemetry_address(&c).await;
            server.send_to(b"ping", addr).await.unwrap();
            assert_eq!(
                recv_within(&server, Duration::from_secs(5)).await.unwrap(),
                (b"a got ping".to_vec(), addr)
            );
            assert_eq!(
                (c.udp_status().exposed_flows.len(), server_flows(&gw).len()),
                (1, 1)
            );
            assert!(
                eventually(Duration::from_secs(5), || c
                    .udp_status()
                    .exposed_flows
                    .is_empty()
                    && server_flows(&gw).is_empty())
                .await,
                "agent {agent_idle}, gateway {gw_idle}: the flow stayed: {:?} {:?}",
                c.udp_status().exposed_flows,
                server_flows(&gw)
            );
            let e = exposed_status(&c);
            let us = &gw.stats().udp;
            let gw_counts = (
                us.flows_expired.load(Ordering::Relaxed),
                us.flows_closed.load(Ordering::Relaxed),
            );
            if agent_idle == "400ms" {
                assert_eq!(
                    (e.flows, e.flows_expired, e.flows_closed),
                    (0, 1, 0),
                    "the agent expired it"
                );
                assert_eq!(gw_counts, (0, 1), "the gateway was told");
            } else {
                assert_eq!(
                    (e.flows, e.flows_expired, e.flows_closed),
                    (0, 0, 1),
                    "the gateway expired it and told the agent"
                );
                assert_eq!(gw_counts, (1, 0));
            }
            let st = baton_runtime::admin::status(&c).await;
            assert_eq!(
                st["udp"]["exposed_flows"].as_array().unwrap().len(),
                0,
                "{st}"
            );
            // The server goes on: a new flow.
            server.send_to(b"again", addr).await.unwrap();
            assert_eq!(
                recv_within(&server, Duration::from_secs(5)).await.unwrap(),
                (b"a got again".to_vec(), addr)
            );
            assert_eq!(exposed_status(&c).flows_opened, 2);
            shutdown.cancel();
        }
    })
    .await
    .expect("test took too long");
}

/// When the agent's session is released the service's socket closes (its
/// address and port can be bound again); the agent gets the same address
/// back with its next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_agents_udp_client_service_socket_closes() {
    tokio::time::timeout(LIMIT, async {
        let shutdown = CancellationToken::new();
        let k = key();
        let gw = udp_gateway(16, &[("a", &k)], "", &shutdown).await;
        let (target, _got) = tagged_udp_target("a").await;
        let push_target = tagged_server("a").await;
        let first = CancellationToken::new();
        let a = udp_agent("a", &k, &gw, target, push_target, "", &first).await;
        let addr = telemetry_address(&a).await;
        let server = udp_socket("127.0.0.1").await;
        server.send_to(b"1", addr).await.unwrap();
        assert_eq!(
            recv_within(&server, Duration::from_secs(5))
                .await
                .unwrap()
                .0,
            b"a got 1"
        );
        assert_eq!(server_flows(&gw).len(), 1);
        first.cancel();
        a.wait().await;
        assert!(eventually(Duration::from_secs(5), || gw.session_count() == 0).await);
        assert!(server_flows(&gw).is_empty());
        // Nothing holds the address and port any more.
        let rebound = async {
            loop {
                match UdpSocket::bind(addr).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        drop(
            tokio::time::timeout(Duration::from_secs(5), rebound)
                .await
                .expect("the released service's socket is still bound"),
        );

        let again = udp_agent("a", &k, &gw, target, push_target, "", &shutdown).await;
        assert_eq!(telemetry_address(&again).await, addr);
        server.send_to(b"2", addr).await.unwrap();
        assert_eq!(
            recv_within(&server, Duration::from_secs(5))
                .await
                .unwrap()
                .0,
            b"a got 2"
        );
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// An agent whose `telemetry` is TCP while the gateway's is UDP refuses the
/// gateway's flow; the gateway counts it, asks only once per session, and
/// the TCP client service on the same port is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_for_a_service_the_agent_serves_over_tcp_is_refused_once() {
    tokio::time::timeout(LIMIT, async {
        let shutdown = CancellationToken::new();
        let k = key();
        let gw = udp_gateway(17, &[("a", &k)], "", &shutdown).await;
        let (target, mut got) = tagged_udp_target("a").await;
        let push_target = tagged_server("a").await;
        let c = cs_agent("a", &k, &gw, target, "tcp", push_target, "", &shutdown).await;
        let addr = telemetry_address(&c).await;
        let server = udp_socket("127.0.0.1").await;
        let refused = || gw.stats().udp.flows_refused.load(Ordering::Relaxed);
        server.send_to(b"1", addr).await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || refused() == 1).await,
            "the agent refused the flow"
        );
        assert!(server_flows(&gw).is_empty());
        for i in 0..5u8 {
            server.send_to(&[i], addr).await.unwrap();
        }
        assert!(
            recv_within(&server, Duration::from_millis(300))
                .await
                .is_none(),
            "nothing answers"
        );
        assert!(got.try_recv().is_err(), "nothing reached the target");
        assert_eq!(
            (
                refused(),
                gw.stats().udp.flows_opened.load(Ordering::Relaxed)
            ),
            (1, 1),
            "asked once"
        );
        assert!(server_flows(&gw).is_empty());
        assert!(
            c.udp_status().exposed.is_empty(),
            "the agent has no UDP client service"
        );
        assert_eq!(push(addr, b"still").await, b"a got still");
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}
