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

use common::*;
use tokio_util::sync::CancellationToken;

/// Every test ends within this, whatever goes wrong.
const LIMIT: Duration = Duration::from_secs(90);
const THREADS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_thread_across_switches() {
    tokio::time::timeout(LIMIT, async {
        const CLIENTS: usize = 8;
        const STREAMS: u64 = 3;
        const BYTES: u64 = 1 << 20;
        let shutdown = CancellationToken::new();
        let (server, mut reports) = verify_server().await;
        let keys: Vec<_> = (0..CLIENTS).map(|i| (format!("t{i}"), key())).collect();
        let clients = clients_section(&keys, "\"data\"");
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
            agents.push(two_path_agent(id, k, addr, &service("data"), &shutdown).await);
        }
        let threads_before: Vec<_> = gw.sessions().iter().map(|s| (s.client.clone(), s.thread)).collect();
        assert_eq!(threads_before.len(), CLIENTS);
        let used: BTreeSet<_> = threads_before.iter().map(|(_, t)| *t).collect();
        assert!(used.len() >= 2, "{CLIENTS} clients on one thread: {threads_before:?}");
        assert!(used.iter().all(|t| *t < THREADS), "{threads_before:?}");

        // A planned switch of every agent, then a sudden one back: new
        // control connections and legs, accepted on any thread, must end
        // up on their session's.
        exchanges_across_two_switches(&agents, &mut reports, STREAMS, BYTES).await;
        let threads_after: Vec<_> = gw.sessions().iter().map(|s| (s.client.clone(), s.thread)).collect();
        assert_eq!(threads_after, threads_before, "each session stayed on its thread");
        assert!(gw.stats().sessions_resumed.load(std::sync::atomic::Ordering::Relaxed) >= CLIENTS as u64);
        shutdown.cancel();
    })
    .await
    .expect("test timed out");
}
