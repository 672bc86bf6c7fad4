//! Client services (server → client) on loopback: a server beside the
//! gateway connects to the address the gateway assigned to a client agent,
//! and reaches a service on the agent's side through it. Each test has its
//! own pool (127.77.N.0/24) so that tests running in parallel never share an
//! address; every agent's push service is on port 7000 there, and so is its
//! UDP `telemetry` service in the tests of UDP client services.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::ClientKey;
use baton_runtime::client::{ExposedState, SwitchKind};
use baton_runtime::config::ClientConfig;
use baton_runtime::udp::{GatewayFlowStatus, Origin};
use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::{Client, Gateway};
use common::*;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const PORT: u16 = 7000;

/// A gateway with the client service `push` (port 7000), `camera` (7001),
/// the pool `127.77.{net}.0/24`, and the given clients: (id, key, exposes).
async fn gateway_with(net: u8, clients: &[(&str, &ClientKey, &str)], shutdown: &CancellationToken) -> Gateway {
    let mut toml = format!(
        "listen = [\"127.0.0.1:0\"]\nvirtual_pool = \"127.77.{net}.0/24\"\n[exposed.push]\nport = {PORT}\n[exposed.camera]\nport = {}\n",
        PORT + 1
    );
    for (id, key, exposes) in clients {
        toml.push_str(&format!("[clients.{id}]\nkey = \"{}\"\nexposes = [{exposes}]\n", key.public()));
    }
    gateway(&toml, shutdown).await
}

/// A client agent exposing `push` (and whatever `more` adds) through `gw`,
/// with the interfaces `a` (127.0.0.2) and `b` (127.0.0.3).
async fn agent(id: &str, key: &ClientKey, gw: &Gateway, target: SocketAddr, more: &str, shutdown: &CancellationToken) -> Client {
    let toml = format!(
        "id = \"{id}\"\nkey_file = \"unused\"\n[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n\
         [gateways.gw]\naddresses = [\"{}\"]\n[exposed.push]\ngateway = \"gw\"\ntarget = \"{target}\"\n{more}",
        gw.local_addrs()[0]
    );
    let cfg = ClientConfig::from_toml(std::path::Path::new("client-services.toml"), &toml).unwrap();
    let c = Client::start(cfg, key.clone(), shutdown.clone()).await.unwrap();
    c.wait_up("gw").await.unwrap();
    c
}

/// Waits for the gateway's answer about `service` and returns it.
async fn answer(c: &Client, service: &str) -> baton_runtime::client::ExposedStatus {
    let find = || c.exposed().into_iter().find(|e| e.name == service).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || find().state != ExposedState::Pending).await,
        "the gateway never answered for {service}"
    );
    find()
}

/// Where the gateway listens for the agent's `push`.
async fn push_address(c: &Client) -> SocketAddr {
    let e = answer(c, "push").await;
    assert_eq!(e.state, ExposedState::Listening, "{e:?}");
    e.address.unwrap()
}

/// A service on the client's side that answers each connection with
/// "NAME got " and everything it read, and reports what it read.
async fn tagged_server(name: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let mut reply = format!("{name} got ").into_bytes();
                    reply.extend_from_slice(&got);
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                    let _ = tx.send(got);
                }
            });
        }
    });
    (addr, rx)
}

/// Pushes `msg` to `addr`, half-closes, and returns the whole answer.
async fn push(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(msg).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    };
    tokio::time::timeout(Duration::from_secs(20), run).await.expect("push stalled")
}

async fn report(rx: &mut mpsc::UnboundedReceiver<std::io::Result<verify::Report>>) -> verify::Report {
    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("no report from the target").unwrap().unwrap()
}

/// (a) A server beside the gateway pushes to the agent's virtual address;
/// the agent's local target gets every byte, and its answer gets back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_the_agents_target_byte_exact_and_back() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(1, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut reports) = verify_server().await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    assert_eq!(addr.port(), PORT);
    assert_eq!(Some(addr.ip()), gw.client_address("a"));
    assert!(addr.ip().to_string().starts_with("127.77.1."), "{addr} is not from the pool");
    // The agent's status document shows it.
    let st = baton_runtime::admin::status(&c).await;
    assert_eq!(st["exposed"][0]["name"], "push");
    assert_eq!(st["exposed"][0]["state"], "listening");
    assert_eq!(st["exposed"][0]["address"], addr.to_string());
    assert_eq!(st["exposed"][0]["target"], target.to_string());

    // Both directions at once, then the server → client direction only
    // after the pusher half-closed.
    for (seed, mode) in [(11, Mode::Concurrent), (12, Mode::AfterClientFin)] {
        let s = TcpStream::connect(addr).await.unwrap();
        let run = verify::exchange(s, seed, 3 * MIB, 2 * MIB, mode);
        let back = tokio::time::timeout(Duration::from_secs(30), run).await.expect("push stalled").unwrap();
        assert!(back.is_exact(Dir::Down), "{mode:?}: {back:?}");
        let there = report(&mut reports).await;
        assert!(there.is_exact(Dir::Up), "{mode:?}: {there:?}");
    }
    let st = baton_runtime::admin::status(&c).await;
    assert_eq!(st["exposed"][0]["connections"], 2);
    assert!(eventually(Duration::from_secs(5), || gw.stream_count() == 0 && c.stream_count() == 0).await);
    shutdown.cancel();
}

/// (b) Two agents with their own keys expose the same port: each has its
/// own address, and each push reaches the agent it was meant for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_the_same_port_each_get_their_own_pushes() {
    let shutdown = CancellationToken::new();
    let (ka, kb) = (key(), key());
    let gw = gateway_with(2, &[("a", &ka, "\"push\""), ("b", &kb, "\"push\"")], &shutdown).await;
    let (ta, mut got_a) = tagged_server("a").await;
    let (tb, mut got_b) = tagged_server("b").await;
    let a = agent("a", &ka, &gw, ta, "", &shutdown).await;
    let b = agent("b", &kb, &gw, tb, "", &shutdown).await;
    let (addr_a, addr_b) = (push_address(&a).await, push_address(&b).await);
    assert_ne!(addr_a.ip(), addr_b.ip());
    assert_eq!((addr_a.port(), addr_b.port()), (PORT, PORT));
    for i in 0..3 {
        let to_a = format!("news {i} for a");
        let to_b = format!("news {i} for b");
        // Interleaved on purpose: the answers must not cross.
        let (ra, rb) = tokio::join!(push(addr_a, to_a.as_bytes()), push(addr_b, to_b.as_bytes()));
        assert_eq!(String::from_utf8(ra).unwrap(), format!("a got {to_a}"));
        assert_eq!(String::from_utf8(rb).unwrap(), format!("b got {to_b}"));
        assert_eq!(got_a.recv().await.unwrap(), to_a.as_bytes());
        assert_eq!(got_b.recv().await.unwrap(), to_b.as_bytes());
    }
    assert!(got_a.try_recv().is_err() && got_b.try_recv().is_err(), "a push reached an agent twice");
    shutdown.cancel();
}

/// (c) A long push stream lives through planned and sudden switches of the
/// agent, byte-exact both ways; the agent's address does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_push_stream_survives_planned_and_sudden_switches() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(3, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut reports) = verify_server().await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    let long = tokio::spawn(async move {
        let s = TcpStream::connect(addr).await.unwrap();
        verify::exchange_paced(s, 42, 16 * MIB, 16 * MIB, Mode::Concurrent, 6 * MIB).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.switch("b").await.unwrap();
    assert_eq!((r[0].kind, r[0].to.as_str(), r[0].streams), (SwitchKind::Planned, "b", 1), "the push stream moved");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.switch("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sudden: a goes down, the session finds b by itself.
    c.set_path_up("a", false).unwrap();
    assert!(eventually(Duration::from_secs(10), || c.switches().len() >= 3).await, "no sudden switch");
    let sw = c.switches()[2].clone();
    assert_eq!((sw.kind, sw.to.as_str(), sw.streams), (SwitchKind::Unexpected, "b", 1));
    c.set_path_up("a", true).unwrap();
    let down = tokio::time::timeout(Duration::from_secs(30), long).await.unwrap().unwrap().expect("no reset, no error");
    assert!(down.is_exact(Dir::Down), "{down:?}");
    let up = report(&mut reports).await;
    assert!(up.is_exact(Dir::Up), "{up:?}");
    assert_eq!(gw.session_count(), 1, "one session throughout");
    assert_eq!(push_address(&c).await, addr);
    shutdown.cancel();
}

/// A push that arrives while the agent has no network waits for it: the
/// gateway announces the stream again when the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_while_the_agent_is_between_networks_waits_for_it() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(4, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, mut got) = tagged_server("a").await;
    let c = agent("a", &k, &gw, target, "", &shutdown).await;
    let addr = push_address(&c).await;
    c.set_path_up("a", false).unwrap();
    c.set_path_up("b", false).unwrap();
    // The server's bytes wait at the gateway meanwhile.
    let pushed = tokio::spawn(push(addr, b"while away"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(got.try_recv().is_err());
    c.set_path_up("b", true).unwrap();
    assert_eq!(pushed.await.unwrap(), b"a got while away");
    assert_eq!(got.recv().await.unwrap(), b"while away");
    shutdown.cancel();
}

/// (d) The gateway refuses client services its configuration does not give
/// the client, and only listens for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_a_client_may_not_expose_are_refused() {
    let shutdown = CancellationToken::new();
    let (ka, kb) = (key(), key());
    // a may expose push but not camera; b nothing at all.
    let gw = gateway_with(5, &[("a", &ka, "\"push\""), ("b", &kb, "")], &shutdown).await;
    let (target, _got) = tagged_server("x").await;
    let camera = format!("[exposed.camera]\ngateway = \"gw\"\ntarget = \"{target}\"\n");
    let a = agent("a", &ka, &gw, target, &camera, &shutdown).await;
    let b = agent("b", &kb, &gw, target, "", &shutdown).await;
    let addr = push_address(&a).await;
    let cam = answer(&a, "camera").await;
    assert_eq!(cam.state, ExposedState::Refused, "{cam:?}");
    assert!(cam.error.as_deref().unwrap().contains("not allowed"), "{cam:?}");
    let refused = answer(&b, "push").await;
    assert_eq!((refused.state, refused.address), (ExposedState::Refused, None), "{refused:?}");
    assert_eq!(gw.client_address("b"), None, "b got no address");
    // Nothing listens for a's camera.
    let e = TcpStream::connect(SocketAddr::new(addr.ip(), PORT + 1)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(push(addr, b"ok").await, b"x got ok");
    let st = baton_runtime::admin::status(&b).await;
    assert_eq!(st["exposed"][0]["state"], "refused");
    shutdown.cancel();
}

/// (d) When the agent's session is released, its address refuses
/// connections and open pushes are closed; the agent gets the same address
/// again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_agents_address_refuses_connections() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(6, &[("a", &k, "\"push\"")], &shutdown).await;
    let (target, _got) = tagged_server("a").await;
    let first = CancellationToken::new();
    let a = agent("a", &k, &gw, target, "", &first).await;
    let addr = push_address(&a).await;
    assert_eq!(push(addr, b"1").await, b"a got 1");
    // A push in progress when the session ends.
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"unfinished").await.unwrap();
    // The agent stops: DISCONNECT, and the gateway releases the session.
    first.cancel();
    a.wait().await;
    assert!(eventually(Duration::from_secs(5), || gw.session_count() == 0).await);
    assert_eq!(gw.client_address("a"), None);
    assert!(closed_within(&mut open, Duration::from_secs(5)).await, "the open push was not closed");
    let refused = async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), refused).await.expect("the released address still accepts");

    // Back (a new session, same client id): the same address.
    let again = agent("a", &k, &gw, target, "", &shutdown).await;
    assert_eq!(push_address(&again).await, addr);
    assert_eq!(push(addr, b"2").await, b"a got 2");
    shutdown.cancel();
}

/// An agent that cannot reach its target resets the stream; the gateway
/// closes the server's connection and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_closes_the_servers_connection() {
    let shutdown = CancellationToken::new();
    let k = key();
    let gw = gateway_with(7, &[("a", &k, "\"push\"")], &shutdown).await;
    // A port where nothing listens.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let a = agent("a", &k, &gw, gone, "", &shutdown).await;
    let addr = push_address(&a).await;
    for _ in 0..3 {
        // The gateway accepts and then resets: so fast on loopback that the
        // reset may already be what connect() reports.
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                let _ = s.write_all(b"anyone there?").await;
                assert!(closed_within(&mut s, Duration::from_secs(10)).await, "the server's connection stayed open");
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert!(eventually(Duration::from_secs(5), || a.exposed()[0].connections == 3).await, "every connection reached the agent");
    assert!(eventually(Duration::from_secs(5), || gw.stream_count() == 0 && a.stream_count() == 0).await);
    assert_eq!(gw.session_count(), 1);
    shutdown.cancel();
}

// ---------------------------------------------------------------------
// UDP client services
// ---------------------------------------------------------------------
//
// The gateway's `telemetry` is a UDP client service on port 7000, the same
// port as the TCP `push`: servers beside the gateway send datagrams to an
// agent's address there, and each server address is a flow the gateway
// opens. Sockets get 4 MiB buffers so that the kernel never drops a
// datagram on loopback: every loss these tests see must be one baton
// counted.

/// Every UDP test ends within this, whatever goes wrong.
const LIMIT: Duration = Duration::from_secs(90);

async fn udp_socket(ip: &str) -> Arc<UdpSocket> {
    let s = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
    let r = SockRef::from(&s);
    r.set_recv_buffer_size(4 << 20).unwrap();
    r.set_send_buffer_size(4 << 20).unwrap();
    Arc::new(s)
}

async fn recv_within(s: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = tokio::time::timeout(limit, s.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some((buf, from))
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

/// A gateway with the TCP client service `push` and the UDP client service
/// `telemetry`, both on port 7000, the pool `127.77.{net}.0/24`, `[udp]`
/// settings `udp`, and the given clients: (id, key), each allowed both.
async fn udp_gateway(net: u8, clients: &[(&str, &ClientKey)], udp: &str, shutdown: &CancellationToken) -> Gateway {
    let mut toml = format!(
        "listen = [\"127.0.0.1:0\"]\nvirtual_pool = \"127.77.{net}.0/24\"\n[udp]\n{udp}\n[exposed.push]\nport = {PORT}\n\
         [exposed.telemetry]\nport = {PORT}\nprotocol = \"udp\"\n"
    );
    for (id, key) in clients {
        toml.push_str(&format!("[clients.{id}]\nkey = \"{}\"\nexposes = [\"push\", \"telemetry\"]\n", key.public()));
    }
    gateway(&toml, shutdown).await
}

/// A client agent exposing `telemetry` (UDP, to `target`) and `push` (TCP,
/// to `push_target`) through `gw`, with `[udp]` settings `udp`.
async fn udp_agent(
    id: &str,
    key: &ClientKey,
    gw: &Gateway,
    target: SocketAddr,
    push_target: SocketAddr,
    udp: &str,
    shutdown: &CancellationToken,
) -> Client {
    let more = format!("[exposed.telemetry]\ngateway = \"gw\"\ntarget = \"{target}\"\nprotocol = \"udp\"\n[udp]\n{udp}\n");
    agent(id, key, gw, push_target, &more, shutdown).await
}

/// Where the gateway listens for the agent's `telemetry`.
async fn telemetry_address(c: &Client) -> SocketAddr {
    let e = answer(c, "telemetry").await;
    assert_eq!(e.state, ExposedState::Listening, "{e:?}");
    e.address.unwrap()
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
    c.udp_status().exposed.into_iter().find(|e| e.service == "telemetry").unwrap()
}

fn server_flows(gw: &Gateway) -> Vec<GatewayFlowStatus> {
    gw.udp_flows().into_iter().filter(|f| f.opened_by == Origin::Gateway).collect()
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
        let (push_target, _) = tagged_server("a").await;
        let c = udp_agent("a", &k, &gw, target, push_target, "", &shutdown).await;
        let addr = telemetry_address(&c).await;
        assert_eq!((addr.port(), Some(addr.ip())), (PORT, gw.client_address("a")));
        assert_eq!(push_address(&c).await, addr, "TCP and UDP client services share the agent's address and port");

        let servers = [udp_socket("127.0.0.1").await, udp_socket("127.0.0.1").await];
        // Sizes from empty to large, not only the numbered ones.
        for (i, size) in [0usize, 1, 1472, 30_000].into_iter().enumerate() {
            let d: Vec<u8> = (0..size).map(|k| (i * 31 + k * 7) as u8).collect();
            servers[i % 2].send_to(&d, addr).await.unwrap();
            let (back, from) = recv_within(&servers[i % 2], Duration::from_secs(10)).await.expect("an answer within 10s");
            assert_eq!(from, addr, "answers come from the address the server sent to");
            assert!(back == [b"a got ".as_slice(), &d].concat(), "{size}-byte datagram: answer changed");
            assert!(got.recv().await.unwrap() == d, "{size}-byte datagram changed on its way to the target");
        }
        for n in 0..N {
            // The two servers take turns: each must get its own answers.
            let s = &servers[(n % 2) as usize];
            s.send_to(&numbered(n), addr).await.unwrap();
            let (back, from) = recv_within(s, Duration::from_secs(10)).await.expect("an answer within 10s");
            assert_eq!(from, addr);
            assert_eq!(back.get(..6), Some(&b"a got "[..]));
            assert_eq!(number_of(&back[6..]), Some(n), "answer to datagram {n}");
            assert_eq!(number_of(&got.recv().await.unwrap()), Some(n), "datagram {n} at the target");
        }
        assert!(recv_within(&servers[0], Duration::from_millis(200)).await.is_none(), "no answer twice");
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
            assert!(f.flow >= 1 << 31, "gateway flow ids have the top bit: {}", f.flow);
            assert_eq!((f.service.as_str(), f.state), ("telemetry", "open"));
            assert_eq!((f.from_target, f.to_client, f.from_client, f.dropped), (per_server, per_server, per_server, 0));
        }
        let e = exposed_status(&c);
        println!("agent: {e:?}");
        assert_eq!((e.flows, e.flows_opened, e.flows_refused), (2, 2, 0));
        assert_eq!((e.received, e.from_target, e.sent, e.dropped), (2 * per_server, 2 * per_server, 2 * per_server, 0));
        let st = baton_runtime::admin::status(&c).await;
        assert_eq!(st["udp"]["exposed_flows"].as_array().unwrap().len(), 2, "{st}");
        let tele = st["exposed"].as_array().unwrap().iter().find(|e| e["name"] == "telemetry").unwrap().clone();
        assert_eq!((tele["protocol"].as_str(), tele["state"].as_str()), (Some("udp"), Some("listening")));
        let us = &gw.stats().udp;
        assert_eq!((us.forged.load(Ordering::Relaxed), us.replayed.load(Ordering::Relaxed)), (0, 0));
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
        let (push_target, _) = tagged_server("x").await;
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
                let (d, from) = recv_within(&server, Duration::from_secs(10)).await.expect("both answer within 10s");
                answers.push((from, String::from_utf8(d).unwrap()));
            }
            answers.sort();
            let mut want = vec![(addr_a, format!("a got {to_a}")), (addr_b, format!("b got {to_b}"))];
            want.sort();
            assert_eq!(answers, want);
            assert_eq!(got_a.recv().await.unwrap(), to_a.as_bytes());
            assert_eq!(got_b.recv().await.unwrap(), to_b.as_bytes());
        }
        assert!(recv_within(&server, Duration::from_millis(200)).await.is_none());
        assert!(got_a.try_recv().is_err() && got_b.try_recv().is_err(), "a datagram reached an agent twice");
        let (ea, eb) = (exposed_status(&a), exposed_status(&b));
        assert_eq!((ea.flows_opened, ea.received, eb.flows_opened, eb.received), (1, 50, 1, 50));
        let flows = server_flows(&gw);
        assert_eq!(flows.len(), 2, "one flow per agent: {flows:?}");
        assert!(flows.iter().all(|f| f.from_target == 50 && f.to_client == 50 && f.target == server.local_addr().unwrap()));
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}

/// Receives numbered datagrams until `quiet` passes without one; returns
/// the numbers in arrival order and where the last came from. Panics on a
/// changed datagram.
async fn collect(s: Arc<UdpSocket>, quiet: Duration) -> (Vec<u64>, Option<SocketAddr>) {
    let mut got = Vec::new();
    let mut last_from = None;
    while let Some((d, from)) = recv_within(&s, quiet).await {
        last_from = Some(from);
        if d == b"hello" {
            continue;
        }
        got.push(number_of(&d).unwrap_or_else(|| panic!("datagram changed: {} bytes", d.len())));
    }
    (got, last_from)
}

fn exactly_once(got: &[u64], what: &str) -> BTreeSet<u64> {
    let set: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "{what}: duplicates");
    set
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
        let (push_target, _) = tagged_server("a").await;
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

        let (got_push, _) = at_target.await.unwrap();
        let (got_answers, answers_from) = at_server.await.unwrap();
        let (set_push, set_answers) = (exactly_once(&got_push, "push"), exactly_once(&got_answers, "answers"));
        assert!(set_push.iter().chain(&set_answers).all(|n| *n < N));
        assert_eq!(answers_from, Some(addr), "answers still come from the agent's address");
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
            let gw = udp_gateway(net, &[("a", &k)], &format!("idle_timeout = \"{gw_idle}\""), &shutdown).await;
            let (target, _got) = tagged_udp_target("a").await;
            let (push_target, _) = tagged_server("a").await;
            let c = udp_agent("a", &k, &gw, target, push_target, &format!("idle_timeout = \"{agent_idle}\""), &shutdown).await;
            let addr = telemetry_address(&c).await;
            server.send_to(b"ping", addr).await.unwrap();
            assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap(), (b"a got ping".to_vec(), addr));
            assert_eq!((c.udp_status().exposed_flows.len(), server_flows(&gw).len()), (1, 1));
            assert!(
                eventually(Duration::from_secs(5), || c.udp_status().exposed_flows.is_empty() && server_flows(&gw).is_empty()).await,
                "agent {agent_idle}, gateway {gw_idle}: the flow stayed: {:?} {:?}",
                c.udp_status().exposed_flows,
                server_flows(&gw)
            );
            let e = exposed_status(&c);
            let us = &gw.stats().udp;
            let gw_counts = (us.flows_expired.load(Ordering::Relaxed), us.flows_closed.load(Ordering::Relaxed));
            if agent_idle == "400ms" {
                assert_eq!((e.flows, e.flows_expired, e.flows_closed), (0, 1, 0), "the agent expired it");
                assert_eq!(gw_counts, (0, 1), "the gateway was told");
            } else {
                assert_eq!((e.flows, e.flows_expired, e.flows_closed), (0, 0, 1), "the gateway expired it and told the agent");
                assert_eq!(gw_counts, (1, 0));
            }
            let st = baton_runtime::admin::status(&c).await;
            assert_eq!(st["udp"]["exposed_flows"].as_array().unwrap().len(), 0, "{st}");
            // The server goes on: a new flow.
            server.send_to(b"again", addr).await.unwrap();
            assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap(), (b"a got again".to_vec(), addr));
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
        let (push_target, _) = tagged_server("a").await;
        let first = CancellationToken::new();
        let a = udp_agent("a", &k, &gw, target, push_target, "", &first).await;
        let addr = telemetry_address(&a).await;
        let server = udp_socket("127.0.0.1").await;
        server.send_to(b"1", addr).await.unwrap();
        assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap().0, b"a got 1");
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
        drop(tokio::time::timeout(Duration::from_secs(5), rebound).await.expect("the released service's socket is still bound"));

        let again = udp_agent("a", &k, &gw, target, push_target, "", &shutdown).await;
        assert_eq!(telemetry_address(&again).await, addr);
        server.send_to(b"2", addr).await.unwrap();
        assert_eq!(recv_within(&server, Duration::from_secs(5)).await.unwrap().0, b"a got 2");
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
        let (push_target, _) = tagged_server("a").await;
        // No `protocol`: TCP on the agent's side.
        let more = format!("[exposed.telemetry]\ngateway = \"gw\"\ntarget = \"{target}\"\n");
        let c = agent("a", &k, &gw, push_target, &more, &shutdown).await;
        let addr = telemetry_address(&c).await;
        let server = udp_socket("127.0.0.1").await;
        let refused = || gw.stats().udp.flows_refused.load(Ordering::Relaxed);
        server.send_to(b"1", addr).await.unwrap();
        assert!(eventually(Duration::from_secs(5), || refused() == 1).await, "the agent refused the flow");
        assert!(server_flows(&gw).is_empty());
        for i in 0..5u8 {
            server.send_to(&[i], addr).await.unwrap();
        }
        assert!(recv_within(&server, Duration::from_millis(300)).await.is_none(), "nothing answers");
        assert!(got.try_recv().is_err(), "nothing reached the target");
        assert_eq!((refused(), gw.stats().udp.flows_opened.load(Ordering::Relaxed)), (1, 1), "asked once");
        assert!(server_flows(&gw).is_empty());
        assert!(c.udp_status().exposed.is_empty(), "the agent has no UDP client service");
        assert_eq!(push(addr, b"still").await, b"a got still");
        shutdown.cancel();
    })
    .await
    .expect("test took too long");
}
