//! A gateway made of several workers sharing one port (`workers = N`): here
//! three `Gateway`s in this process, each with its own hand-off socket, as
//! the worker processes of `baton gateway` have. The kernel spreads
//! connections and datagrams over them by address; whatever lands on a
//! worker that does not own its client must reach the owner, across
//! switches, with every byte and datagram intact.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_runtime::config::GatewayConfig;
use baton_runtime::gateway::WorkerSpec;
use baton_runtime::Gateway;
use common::*;
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Every test ends within this, whatever goes wrong.
const LIMIT: Duration = Duration::from_secs(90);
const WORKERS: usize = 3;

struct Workers {
    gws: Vec<Gateway>,
    specs: Vec<WorkerSpec>,
    addr: SocketAddr,
}

impl Workers {
    fn sum(&self, f: impl Fn(&Gateway) -> u64) -> u64 {
        self.gws.iter().map(f).sum()
    }

    /// Every client's sessions are in the worker that owns the client.
    fn sessions_where_they_belong(&self) -> Vec<String> {
        let mut all = Vec::new();
        for (gw, spec) in self.gws.iter().zip(&self.specs) {
            for c in gw.session_clients() {
                assert!(
                    spec.owns_client(&c),
                    "{c}'s session is in worker {}",
                    spec.index
                );
                all.push(c);
            }
        }
        all.sort();
        all
    }
}

/// Starts `WORKERS` workers of one gateway with configuration `body`
/// (everything but `listen`); worker 0 picks the port, the others share it.
async fn workers(body: &str, shutdown: &CancellationToken) -> Workers {
    static GROUP: AtomicUsize = AtomicUsize::new(0);
    let group = format!(
        "test-{}-{}",
        std::process::id(),
        GROUP.fetch_add(1, Ordering::Relaxed)
    );
    let mut gws = Vec::new();
    let mut specs = Vec::new();
    let mut listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for index in 0..WORKERS {
        let cfg = GatewayConfig::from_toml(
            Path::new("workers-gateway.toml"),
            &format!("listen = [\"{listen}\"]\n{body}"),
        )
        .unwrap();
        let spec = WorkerSpec {
            index,
            count: WORKERS,
            group: group.clone(),
        };
        let gw = Gateway::start_worker(cfg, shutdown.clone(), Some(spec.clone()))
            .await
            .unwrap();
        listen = gw.local_addrs()[0];
        gws.push(gw);
        specs.push(spec);
    }
    Workers {
        gws,
        specs,
        addr: listen,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn streams_of_many_clients_cross_switches_on_three_workers() {
    tokio::time::timeout(LIMIT, async {
        const CLIENTS: usize = 6;
        const STREAMS: u64 = 3;
        const BYTES: u64 = 2 << 20;
        let shutdown = CancellationToken::new();
        let (server, mut reports) = verify_server().await;
        let keys: Vec<_> = (0..CLIENTS).map(|i| (format!("m{i}"), key())).collect();
        let w = workers(
            &format!(
                "[services.data]\ntarget = \"{server}\"\n{}",
                clients_section(&keys, "\"data\"")
            ),
            &shutdown,
        )
        .await;
        let mut agents = Vec::new();
        for (id, k) in &keys {
            agents.push(two_path_agent(id, k, w.addr, &service("data"), &shutdown).await);
        }
        // A planned switch of every agent, then a sudden one back.
        exchanges_across_two_switches(&agents, &mut reports, STREAMS, BYTES).await;
        let expected: Vec<_> = keys.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            w.sessions_where_they_belong(),
            expected,
            "one session per client"
        );
        let handed = w.sum(|g| g.stats().handed_off.load(Ordering::Relaxed));
        assert!(
            handed > 0,
            "some connections landed on a worker that passed them on"
        );
        assert!(
            eventually(Duration::from_secs(5), || {
                w.sum(|g| g.stats().taken_over.load(Ordering::Relaxed)) == handed
            })
            .await,
            "every connection passed on was taken over"
        );
        assert!(w.sum(|g| g.stats().sessions_resumed.load(Ordering::Relaxed)) >= CLIENTS as u64);
        shutdown.cancel();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn datagrams_reach_the_worker_of_their_session() {
    tokio::time::timeout(LIMIT, async {
        const CLIENTS: usize = 8;
        const DATAGRAMS: u64 = 40;
        let shutdown = CancellationToken::new();
        // The target echoes every datagram.
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let keys: Vec<_> = (0..CLIENTS).map(|i| (format!("u{i}"), key())).collect();
        let w = workers(
            &format!(
                "[services.dgram]\ntarget = \"{target}\"\nprotocol = \"udp\"\n{}",
                clients_section(&keys, "\"dgram\"")
            ),
            &shutdown,
        )
        .await;
        let svc =
            "[services.dgram]\ngateway = \"gw\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n";
        let mut agents = Vec::new();
        for (id, k) in &keys {
            agents.push(Arc::new(
                two_path_agent(id, k, w.addr, svc, &shutdown).await,
            ));
        }
        let mut tasks = Vec::new();
        for (i, c) in agents.iter().enumerate() {
            let service = c.service_addr("dgram").unwrap();
            tasks.push(tokio::spawn(async move {
                let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let mut got = BTreeSet::new();
                let mut buf = vec![0u8; 2048];
                // Resend what has not come back: the first datagrams wait
                // for the flow to open, and the hold bound may drop some.
                for _round in 0..50 {
                    for n in 0..DATAGRAMS {
                        if !got.contains(&n) {
                            let d = format!("client {i} datagram {n}");
                            app.send_to(d.as_bytes(), service).await.unwrap();
                        }
                    }
                    while let Ok(Ok((len, _))) =
                        tokio::time::timeout(Duration::from_millis(100), app.recv_from(&mut buf))
                            .await
                    {
                        let text = std::str::from_utf8(&buf[..len]).unwrap().to_owned();
                        let n: u64 = text
                            .strip_prefix(&format!("client {i} datagram "))
                            .unwrap_or_else(|| panic!("client {i} got {text:?}"))
                            .parse()
                            .unwrap();
                        got.insert(n);
                    }
                    if got.len() as u64 == DATAGRAMS {
                        break;
                    }
                }
                got.len() as u64
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), DATAGRAMS, "every datagram echoed back");
        }
        let expected: Vec<_> = keys.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(w.sessions_where_they_belong(), expected);
        let flows: usize = w.gws.iter().map(|g| g.udp_flows().len()).sum();
        assert_eq!(
            flows, CLIENTS,
            "one flow per client, in its session's worker"
        );
        assert!(
            w.sum(|g| g.stats().datagrams_passed.load(Ordering::Relaxed)) > 0,
            "some datagrams or probes landed on a worker that passed them on"
        );
        shutdown.cancel();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn client_services_are_served_by_the_worker_of_their_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(LIMIT, async {
        const CLIENTS: usize = 6;
        let shutdown = CancellationToken::new();
        let keys: Vec<_> = (0..CLIENTS).map(|i| (format!("p{i}"), key())).collect();
        let clients: String = keys
            .iter()
            .map(|(id, k)| {
                format!(
                    "[clients.{id}]\nkey = \"{}\"\nexposes = [\"push\"]\n",
                    k.public()
                )
            })
            .collect();
        let w = workers(
            &format!("virtual_pool = \"127.78.1.0/24\"\n[exposed.push]\nport = 7000\n{clients}"),
            &shutdown,
        )
        .await;
        let mut agents = Vec::new();
        for (i, (id, k)) in keys.iter().enumerate() {
            // Each agent's target answers with its own name and what it read.
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let mut got = Vec::new();
                        if s.read_to_end(&mut got).await.is_ok() {
                            let mut reply = format!("target {i} got ").into_bytes();
                            reply.extend_from_slice(&got);
                            let _ = s.write_all(&reply).await;
                            let _ = s.shutdown().await;
                        }
                    });
                }
            });
            let svc = format!("[exposed.push]\ngateway = \"gw\"\ntarget = \"{target}\"\n");
            agents.push(two_path_agent(id, k, w.addr, &svc, &shutdown).await);
        }
        let push = |addr: SocketAddr, msg: String| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(msg.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            String::from_utf8(got).unwrap()
        };
        let mut addrs = Vec::new();
        for c in &agents {
            let listening = eventually(Duration::from_secs(10), || {
                c.exposed()
                    .iter()
                    .any(|e| e.name == "push" && e.address.is_some())
            })
            .await;
            assert!(listening, "{:?}", c.exposed());
            let e = c.exposed().into_iter().find(|e| e.name == "push").unwrap();
            addrs.push(e.address.unwrap());
        }
        let distinct: BTreeSet<_> = addrs.iter().map(|a| a.ip()).collect();
        assert_eq!(distinct.len(), CLIENTS, "one address per client: {addrs:?}");
        for round in 0..2 {
            for (i, a) in addrs.iter().enumerate() {
                let got = push(*a, format!("round {round} to {i}")).await;
                assert_eq!(got, format!("target {i} got round {round} to {i}"));
            }
            // Then every agent moves to its other interface: the pushes follow.
            for c in &agents {
                c.switch("b").await.unwrap();
            }
        }
        let expected: Vec<_> = keys.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(w.sessions_where_they_belong(), expected);
        shutdown.cancel();
    })
    .await
    .expect("test timed out");
}
