//! The gateway's session threads (`threads = N`): every connection of a
//! session (control, legs, the connections to its targets) is served on
//! the thread its client id hashes to, so that a session's tasks never
//! wake each other across threads; sessions of different clients spread
//! over the threads. (Debug builds also check, on every control
//! connection, leg and client service stream, that it runs on its
//! session's thread.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use baton_runtime::verify::{self, Dir, Mode};
use baton_runtime::Client;
use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Every test ends within this, whatever goes wrong.
const LIMIT: Duration = Duration::from_secs(90);
const THREADS: usize = 3;

/// A client agent with interfaces `a` (127.0.0.2, preferred) and `b`
/// (127.0.0.3), its session up on `a`.
async fn agent(
    id: &str,
    key: &baton_proto::ClientKey,
    gw: std::net::SocketAddr,
    services: &str,
    shutdown: &CancellationToken,
) -> Client {
    let more = format!(
        "[interfaces.a]\nsource = \"127.0.0.2\"\npriority = 1\n[interfaces.b]\nsource = \"127.0.0.3\"\npriority = 2\n{services}"
    );
    let c = client(id, key, gw, &more, shutdown).await;
    assert_eq!(c.wait_up("gw").await.unwrap().path, "a");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_thread_across_switches() {
    tokio::time::timeout(LIMIT, async {
        const CLIENTS: usize = 8;
        const STREAMS: u64 = 3;
        const BYTES: u64 = 1 << 20;
        let shutdown = CancellationToken::new();
        let (server, mut reports) = verify_server().await;
        let keys: Vec<_> = (0..CLIENTS).map(|i| (format!("t{i}"), key())).collect();
        let clients: String = keys
            .iter()
            .map(|(id, k)| {
                format!(
                    "[clients.{id}]\nkey = \"{}\"\nservices = [\"data\"]\n",
                    k.public()
                )
            })
            .collect();
        let gw = gateway(
            &format!(
                "listen = [\"127.0.0.1:0\"]\nthreads = {THREADS}\n[services.data]\ntarget = \"{server}\"\n{clients}"
            ),
            &shutdown,
        )
        .await;
        assert_eq!(gw.session_threads(), THREADS);
        let addr = gw.local_addrs()[0];
        let mut agents = Vec::new();
        for (id, k) in &keys {
            agents.push(agent(id, k, addr, &service("data"), &shutdown).await);
        }
        let threads_before: Vec<_> = gw.sessions().iter().map(|s| (s.client.clone(), s.thread)).collect();
        assert_eq!(threads_before.len(), CLIENTS);
        let used: BTreeSet<_> = threads_before.iter().map(|(_, t)| *t).collect();
        assert!(used.len() >= 2, "{CLIENTS} clients on one thread: {threads_before:?}");
        assert!(used.iter().all(|t| *t < THREADS), "{threads_before:?}");

        let mut exchanges = Vec::new();
        for (i, c) in agents.iter().enumerate() {
            for s in 0..STREAMS {
                let at = c.service_addr("data").unwrap();
                let seed = (i as u64) * 100 + s;
                exchanges.push(tokio::spawn(async move {
                    let conn = TcpStream::connect(at).await.unwrap();
                    verify::exchange_paced(conn, seed, BYTES, BYTES, Mode::Concurrent, 2 << 20)
                        .await
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A planned switch of every agent, then a sudden one back: new
        // control connections and legs, accepted on any thread, must end
        // up on their session's.
        for c in &agents {
            c.switch("b").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for c in &agents {
            c.set_path_up("b", false).unwrap();
        }
        for c in &agents {
            assert!(eventually(Duration::from_secs(10), || c.switches().len() >= 2).await);
            assert_eq!(c.wait_up("gw").await.unwrap().path, "a");
        }
        for e in exchanges {
            let down = e.await.unwrap().expect("no reset, no error");
            assert!(down.is_exact(Dir::Down), "{down:?}");
        }
        for _ in 0..CLIENTS as u64 * STREAMS {
            let up = reports.recv().await.unwrap().unwrap();
            assert!(up.is_exact(Dir::Up), "{up:?}");
        }
        let threads_after: Vec<_> = gw.sessions().iter().map(|s| (s.client.clone(), s.thread)).collect();
        assert_eq!(threads_after, threads_before, "each session stayed on its thread");
        assert!(gw.stats().sessions_resumed.load(std::sync::atomic::Ordering::Relaxed) >= CLIENTS as u64);
        shutdown.cancel();
    })
    .await
    .expect("test timed out");
}
