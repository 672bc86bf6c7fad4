//! Handover on real links: the `baton` binary in network namespaces (crate `baton-netbed`),
//! the client agent in MOBILE following the kernel's interface table (no `[interfaces]`
//! table), the gateway and a verifying server in SERVER. In every scenario an application in
//! MOBILE runs a long paced exchange through baton, both directions checked byte by byte, and
//! the links change under it: a planned switch, a link going down, the address replaced, a
//! full minute with no link at all, an outage longer than TCP's own retransmission limit.
//!
//! Needs root and `ip`, `iptables`, `tc`, `ping` (`.ci/run` installs them). Set
//! `BATON_LOG=...` to change the daemons' log filter; their logs are printed when a test fails.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_netbed::{Bed, Host};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each scenario's own limit; the slowest (60 s without a link) takes about 70 s.
const LIMIT: Duration = Duration::from_secs(150);

fn assert_record(sw: &Value, kind: &str, from: &str, to: &[&str]) {
    assert_eq!(sw["kind"], kind, "{sw}");
    assert_eq!(sw["gateway"], "gw", "{sw}");
    assert_eq!(sw["from"], from, "{sw}");
    assert!(
        to.iter().any(|t| sw["to"] == *t),
        "switch to one of {to:?} expected: {sw}"
    );
    assert_eq!(sw["streams"], 1, "the live stream moved: {sw}");
}

/// a. `baton switch lte`, then `baton switch wlan`, while the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switch_to_lte_and_back() {
    tokio::time::timeout(LIMIT, async {
        let mut rig = Rig::start("planned", Options::default()).await;
        let app = rig.start_exchange(11, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let line = rig.switch("lte");
        println!("planned: baton switch lte: {line}");
        assert!(line.starts_with("gw: wlan → lte"), "{line}");
        let st = rig.status().unwrap();
        assert_eq!(st["current_interface"], "lte");
        assert_eq!(st["sessions"][0]["interface"], "lte");
        rig.wait_received(3 * MIB).await;
        let line = rig.switch("wlan");
        println!("planned: baton switch wlan: {line}");
        assert!(line.starts_with("gw: lte → wlan"), "{line}");
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        let sw = rig.switches();
        assert_eq!(sw.len(), 2, "two switches: {sw:?}");
        assert_record(&sw[0], "planned", "wlan", &["lte"]);
        assert_record(&sw[1], "planned", "lte", &["wlan"]);
        for s in &sw {
            println!("planned: {}", describe(s));
            assert_eq!(s["reason"], "requested by the user");
        }
        assert_eq!(rig.status().unwrap()["current_interface"], "wlan");
    })
    .await
    .expect("scenario within its time limit");
}

/// a'. The planned switch on links with real delays (wlan 10 ms, lte 40 ms one way):
/// byte-exact, recorded as planned, and the record does not under-report the pause the
/// application saw. The pause itself is a speed goal, measured by the handover benchmark
/// (`baton-bench handover`), not asserted here: these machines are shared and noisy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switch_on_delayed_links_drains_old_legs() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options { delays: Some((10, 40)), ..Options::default() };
        let mut rig = Rig::start("planned_delay", opts).await;
        let lte_rtt = rig.bed.ping_rtt(Link::Lte).unwrap();
        let (app, arrivals) = rig.start_timed_exchange(16, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let at = Instant::now();
        let line = rig.switch("lte");
        println!("planned_delay: baton switch lte: {line}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let gap = arrivals.longest_gap(at, at + Duration::from_secs(2));
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        let sw = rig.switches();
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_record(&sw[0], "planned", "wlan", &["lte"]);
        println!("planned_delay: {}", describe(&sw[0]));
        let target = lte_rtt + Duration::from_millis(20);
        println!(
            "planned_delay: the application's longest pause in server→mobile data: {} ms (lte round trip {} ms, target ≤ {} ms)",
            gap.as_millis(),
            lte_rtt.as_millis(),
            target.as_millis()
        );
        let mut problems = Vec::new();
        let recorded = Duration::from_millis(sw[0]["longest_stall_ms"].as_u64().unwrap());
        if recorded + Duration::from_millis(30) < gap {
            problems.push(format!("the record's longest_stall_ms ({} ms) under-reports the pause the application saw ({} ms)", recorded.as_millis(), gap.as_millis()));
        }
        assert!(problems.is_empty(), "planned switch on delayed links:\n- {}", problems.join("\n- "));
    })
    .await
    .expect("scenario within its time limit");
}

/// b. `ip link set wlan down` in the middle of the stream: the agent sees the link go,
/// switches to lte by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wlan_link_down_switches_to_lte() {
    tokio::time::timeout(LIMIT, async {
        let mut rig = Rig::start("linkdown", Options::default()).await;
        let app = rig.start_exchange(12, 5 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        // The agent fetched the gateway's TCP Fast Open cookie for lte when it
        // first probed it, so the leg that moves there opens in one round trip.
        let lte_source = format!("source {}", rig.bed.mobile_addr(Link::Lte));
        let has_cookie = |bed: &Bed| {
            let out = bed.exec(Host::Mobile, &["ip", "tcp_metrics", "show"]).unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.contains("fo_cookie") && l.ends_with(&lte_source))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_cookie(&rig.bed) {
            assert!(Instant::now() < deadline, "no fast open cookie for lte");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fast_opened = |bed: &Bed| bed.tcp_ext_counter(Host::Server, "TCPFastOpenPassive").unwrap();
        let fast_before = fast_opened(&rig.bed);
        let cut = Instant::now();
        rig.bed.link_down(Link::Wlan).unwrap();
        let st = rig
            .wait_status(
                Duration::from_secs(15),
                "an unexpected switch recorded",
                |st| {
                    st["switches"].as_array().is_some_and(|v| !v.is_empty())
                        && st["sessions"][0]["state"] == "up"
                },
            )
            .await;
        println!(
            "linkdown: switch recorded {} ms after the link went down",
            cut.elapsed().as_millis()
        );
        assert_eq!(st["current_interface"], "lte");
        let wlan = st["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "wlan")
            .cloned();
        assert!(
            wlan.is_none_or(|w| w["up"] == false),
            "wlan is not usable any more: {st}"
        );
        rig.finish_exchange(app, Duration::from_secs(30)).await;
        let fast_after = fast_opened(&rig.bed);
        assert!(
            fast_after > fast_before,
            "the stream's leg on lte came by fast open (gateway's TCPFastOpenPassive {fast_before} → {fast_after})"
        );

        tokio::time::sleep(Duration::from_secs(2)).await;
        let sw = rig.switches();
        assert_eq!(
            sw.len(),
            1,
            "one switch, and the session stays on lte: {sw:?}"
        );
        assert_record(&sw[0], "unexpected", "wlan", &["lte"]);
        println!("linkdown: {}", describe(&sw[0]));
        // The agent acts on the kernel's link event, not on missed keep-alives (4 s).
        assert!(sw[0]["duration_ms"].as_u64().unwrap() < 3000, "{}", sw[0]);
    })
    .await
    .expect("scenario within its time limit");
}

/// c. wlan's address is replaced (10.81.1.2 → 10.81.1.7, as a DHCP renumbering): every
/// connection bound to the old address breaks; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wlan_readdressed_session_continues() {
    tokio::time::timeout(LIMIT, async {
        let mut rig = Rig::start("readdress", Options::default()).await;
        let app = rig.start_exchange(13, 5 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let old = rig.bed.mobile_addr(Link::Wlan);
        rig.bed.readdress(Link::Wlan, 7).unwrap();
        let new = rig.bed.mobile_addr(Link::Wlan);
        println!("readdress: wlan {old} → {new}");
        let st = rig
            .wait_status(Duration::from_secs(15), "a switch recorded", |st| {
                st["switches"].as_array().is_some_and(|v| !v.is_empty())
                    && st["sessions"][0]["state"] == "up"
            })
            .await;
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        // wlan works as well as before on its new address: nothing should move the session
        // again (a wlan that looked lossy after renumbering once sent it to lte).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sw = rig.switches();
        assert_eq!(sw.len(), 1, "one switch for one renumbering: {sw:?}");
        println!(
            "readdress: {}; session now on {}",
            describe(&sw[0]),
            st["sessions"][0]["interface"]
        );
        // wlan is still up with a default route, so the agent may resume on its new address
        // or fall back to lte; either way the record says what happened.
        assert_record(&sw[0], "unexpected", "wlan", &["wlan", "lte"]);
        assert_eq!(
            sw[0]["to"], st["sessions"][0]["interface"],
            "the record names the interface in use"
        );
        assert!(sw[0]["duration_ms"].as_u64().unwrap() < 3000, "{}", sw[0]);
        // The session id survived: it was resumed, not replaced.
        let after = rig.status().unwrap();
        assert_eq!(
            after["sessions"][0]["session_id"],
            st["sessions"][0]["session_id"]
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// d. Both links down for 60 s (far past `dead_after`, 4 s), then lte up: the session and the
/// stream resume, exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_links_down_for_a_minute_then_lte() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: "switch_timeout = \"150s\"",
            gateway: "switch_timeout = \"150s\"",
            ..Options::default()
        };
        let mut rig = Rig::start("nolink60", opts).await;
        let session = rig.status().unwrap()["sessions"][0]["session_id"].clone();
        let app = rig.start_exchange(14, 4 * MIB, MIB);
        rig.wait_received(MIB / 2).await;
        rig.bed.link_down(Link::Wlan).unwrap();
        rig.bed.link_down(Link::Lte).unwrap();
        let cut = Instant::now();
        let held = rig
            .wait_status(Duration::from_secs(10), "the session switching", |st| {
                st["sessions"][0]["state"] == "switching"
            })
            .await;
        let received_at_cut = held["streams"][0]["received"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed())).await;
        // Nothing moved in a minute without a link; the stream is still there, held.
        let st = rig.status().unwrap();
        assert_eq!(st["sessions"][0]["state"], "switching", "{st}");
        assert_eq!(
            st["streams"].as_array().unwrap().len(),
            1,
            "the stream is held: {st}"
        );
        assert_eq!(
            st["streams"][0]["received"].as_u64().unwrap(),
            received_at_cut,
            "no data without a link"
        );
        rig.bed.link_up(Link::Lte).unwrap();
        let up = Instant::now();
        let st = rig
            .wait_status(
                Duration::from_secs(20),
                "the session resumed on lte",
                |st| {
                    st["sessions"][0]["state"] == "up"
                        && st["switches"].as_array().is_some_and(|v| !v.is_empty())
                },
            )
            .await;
        println!(
            "nolink60: resumed {} ms after lte came up, {:.1} s after the cut",
            up.elapsed().as_millis(),
            cut.elapsed().as_secs_f64()
        );
        assert_eq!(st["sessions"][0]["interface"], "lte");
        assert_eq!(
            st["sessions"][0]["session_id"], session,
            "the same session resumed"
        );
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        // The links go down one after the other: the agent may move to lte in the instant
        // between the two (a record wlan → lte), then lose lte too. The last record is the
        // minute without a link, ending on lte.
        let sw = rig.switches();
        for s in &sw {
            println!("nolink60: {}", describe(s));
        }
        assert!((1..=2).contains(&sw.len()), "{sw:?}");
        assert_eq!(sw[0]["from"], "wlan", "{}", sw[0]);
        let last = sw.last().unwrap();
        assert_record(
            last,
            "unexpected",
            if sw.len() == 1 { "wlan" } else { "lte" },
            &["lte"],
        );
        assert!(sw.iter().all(|s| s["kind"] == "unexpected"), "{sw:?}");
        assert!(
            last["duration_ms"].as_u64().unwrap() >= 59_000,
            "the pause covers the outage: {last}"
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// One end of a plain TCP connection kept busy: writes 1 KiB every 20 ms and reads what
/// comes, until an error. Returns when and how it failed.
async fn busy_tcp(
    s: tokio::net::TcpStream,
    stop: tokio_util::sync::CancellationToken,
) -> Option<(Instant, io::Error)> {
    let (mut r, mut w) = s.into_split();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => {
                    return (
                        Instant::now(),
                        io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the peer"),
                    )
                }
                Ok(_) => {}
                Err(e) => return (Instant::now(), e),
            }
        }
    };
    let writer = async move {
        let chunk = vec![7u8; 1024];
        loop {
            if let Err(e) = w.write_all(&chunk).await {
                return (Instant::now(), e);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        e = reader => Some(e),
        e = writer => Some(e),
        _ = stop.cancelled() => None,
    }
}

/// e. An outage longer than TCP's retransmission limit: with `tcp_retries2 = 3` in MOBILE
/// and SERVER, a plain TCP connection between them dies during a blackout at ROUTER, while
/// the baton stream (whose legs die the same way) completes exact afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_tcp_rto_kills_tcp_not_baton() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: "connect_timeout = \"2s\"",
            ..Options::default()
        };
        let mut rig = Rig::start("rto", opts).await;
        for host in [Host::Mobile, Host::Server] {
            // Per namespace: /proc/sys/net is the opener's namespace's.
            rig.bed
                .in_ns(host, || {
                    std::fs::write("/proc/sys/net/ipv4/tcp_retries2", "3")
                })
                .unwrap()
                .unwrap();
        }
        // A plain TCP connection MOBILE → SERVER, busy both ways.
        let plain_addr = SocketAddr::from((rig.bed.server_addr(), 9100));
        let listener = listen_in(&rig.bed, Host::Server, plain_addr);
        let mobile_end = connect_in(&rig.bed, Host::Mobile, plain_addr);
        let (server_end, _) = listener.accept().await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let plain_m = tokio::spawn(busy_tcp(mobile_end, stop.clone()));
        let plain_s = tokio::spawn(busy_tcp(server_end, stop.clone()));

        let app = rig.start_exchange(15, 4 * MIB, MIB);
        rig.wait_received(MIB / 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !plain_m.is_finished() && !plain_s.is_finished(),
            "the plain connection works before the outage"
        );

        // Blackout: ROUTER forwards nothing; the links stay up, so only timers can tell.
        let rules = |op: &'static str, dev: &'static str| {
            [
                ["iptables", op, "FORWARD", "-i", dev, "-j", "DROP"],
                ["iptables", op, "FORWARD", "-o", dev, "-j", "DROP"],
            ]
        };
        for dev in ["rwlan", "rlte"] {
            for r in rules("-I", dev) {
                rig.sh(Host::Router, &r);
            }
        }
        let cut = Instant::now();
        const OUTAGE: Duration = Duration::from_secs(15);
        tokio::time::sleep(OUTAGE).await;
        // wlan comes back first, lte 3 s later (past the agent's 2 s connect timeout): the
        // session resumes on wlan, the interface whose control connection timed out.
        for r in rules("-D", "rwlan") {
            rig.sh(Host::Router, &r);
        }
        println!(
            "rto: blackout of {:.1} s at ROUTER ended on wlan",
            cut.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        for r in rules("-D", "rlte") {
            rig.sh(Host::Router, &r);
        }

        // The plain connection: an error on at least one end, during the outage (a live
        // connection would have recovered by now).
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let (m, s) = (plain_m.await.unwrap(), plain_s.await.unwrap());
        let mut died = Vec::new();
        for (end, r) in [("mobile", &m), ("server", &s)] {
            match r {
                Some((at, e)) => {
                    println!(
                        "rto: plain TCP, {end} end: {e} ({:?}) {:.2} s after the cut",
                        e.kind(),
                        at.duration_since(cut).as_secs_f64()
                    );
                    died.push((end, *at, e.kind()));
                }
                None => println!("rto: plain TCP, {end} end: no error"),
            }
        }
        assert!(
            !died.is_empty(),
            "the plain TCP connection survived a {OUTAGE:?} outage with tcp_retries2=3"
        );
        let (end, at, kind) = died.iter().min_by_key(|d| d.1).copied().unwrap();
        assert!(
            at < cut + OUTAGE,
            "the plain TCP connection ({end} end) failed only after the outage"
        );
        assert_eq!(
            kind,
            io::ErrorKind::TimedOut,
            "it gave up retransmitting ({end} end)"
        );

        // baton's legs died the same way; the stream resumes on new ones.
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        // One outage, one switch; and the session stays put afterwards (no switch loop).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sw = rig.switches();
        for s in sw.iter().take(5) {
            println!("rto: {}", describe(s));
        }
        println!("rto: {} switch record(s)", sw.len());
        assert!(!sw.is_empty(), "the outage is recorded");
        assert_record(&sw[0], "unexpected", "wlan", &["wlan"]);
        assert!(
            sw[0]["duration_ms"].as_u64().unwrap() >= 4000,
            "the pause covers the outage: {}",
            sw[0]
        );
        assert_eq!(
            sw.len(),
            1,
            "one blackout, one switch; then the session must stay up: {:#?}",
            &sw[..sw.len().min(4)]
        );
        assert_eq!(rig.status().unwrap()["sessions"][0]["state"], "up");
    })
    .await
    .expect("scenario within its time limit");
}

/// f. MOBILE as a connectivity box: the agent listens on its LAN address
/// (10.88.1.1) and serves an application on a second LAN host, which has no
/// route to the server of its own. The stream survives a planned switch and
/// wlan going down, byte-exact both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectivity_box_serves_a_lan_host_across_switches() {
    tokio::time::timeout(LIMIT, async {
        let mut rig = Rig::start(
            "lanbox",
            Options {
                lan: true,
                ..Options::default()
            },
        )
        .await;
        assert_eq!(rig.app_host, Host::Lan);
        // Without the box the LAN host cannot reach the server network.
        let direct = rig.bed.in_ns(Host::Lan, || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((rig.bed.server_addr(), 7700)),
                Duration::from_secs(1),
            )
        });
        assert!(
            direct.unwrap().is_err(),
            "the LAN host must depend on the box"
        );

        let app = rig.start_exchange(21, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let line = rig.switch("lte");
        assert!(line.starts_with("gw: wlan → lte"), "{line}");
        rig.wait_received(2 * MIB).await;
        rig.switch("wlan");
        rig.wait_received(3 * MIB).await;
        rig.bed.link_down(Link::Wlan).unwrap();
        rig.wait_status(Duration::from_secs(15), "the unexpected switch", |st| {
            st["switches"].as_array().is_some_and(|v| v.len() == 3)
                && st["sessions"][0]["state"] == "up"
        })
        .await;
        rig.finish_exchange(app, Duration::from_secs(40)).await;
        let sw = rig.switches();
        assert_record(&sw[0], "planned", "wlan", &["lte"]);
        assert_record(&sw[2], "unexpected", "wlan", &["lte"]);
        // The agent saw the LAN host as the application's address.
        let log = std::fs::read_to_string(rig.dir.join("client.log")).unwrap_or_default();
        assert!(
            log.contains(&rig.bed.lan_host_addr().to_string()),
            "the agent logs the LAN application's address"
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// h. A gateway of three worker processes (`workers = 3`): whichever worker the kernel
/// hands the agent's connections to, they reach the worker that holds its session, across a
/// planned switch and a link going down; `baton gateway-status` answers for all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_of_three_workers_keeps_the_session_across_switches() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            gateway: "workers = 3",
            ..Options::default()
        };
        let mut rig = Rig::start("workers", opts).await;
        let app = rig.start_exchange(18, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let line = rig.switch("lte");
        assert!(line.starts_with("gw: wlan → lte"), "{line}");
        rig.wait_received(3 * MIB).await;
        rig.bed.link_down(Link::Lte).unwrap();
        rig.wait_status(Duration::from_secs(15), "back on wlan", |st| {
            st["current_interface"] == "wlan" && st["sessions"][0]["state"] == "up"
        })
        .await;
        rig.finish_exchange(app, Duration::from_secs(30)).await;

        let gs = rig.gateway_status();
        assert_eq!(gs["workers"], 3, "{gs}");
        let sessions = gs["sessions"].as_array().unwrap();
        assert_eq!(
            sessions.len(),
            1,
            "one session over the three workers: {gs}"
        );
        assert_eq!(sessions[0]["client"], "m", "{gs}");
        assert!(
            gs["stats"]["sessions_resumed"].as_u64().unwrap() >= 1,
            "{gs}"
        );
        let sw = rig.switches();
        assert_eq!(sw.len(), 2, "{sw:?}");
        assert_record(&sw[0], "planned", "wlan", &["lte"]);
        assert_record(&sw[1], "unexpected", "lte", &["wlan"]);

        // The worker holding the session dies: the supervisor starts it again, and the
        // agent, whose session is gone with it, opens a new one that carries new streams.
        let owner = baton_runtime::gateway::owner_of_client("m", 3);
        let pid = gs["worker_pids"][owner].as_u64().unwrap();
        assert!(pid > 0, "{gs}");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let gs = loop {
            let gs = rig.gateway_status();
            if gs["worker_restarts"] == 1 && gs["sessions"].as_array().is_some_and(|s| s.len() == 1)
            {
                break gs;
            }
            assert!(
                Instant::now() < deadline,
                "no new session after the worker's restart: {gs}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_ne!(gs["worker_pids"][owner].as_u64().unwrap(), pid, "{gs}");
        rig.wait_status(Duration::from_secs(15), "a new session up", |st| {
            st["sessions"][0]["state"] == "up"
        })
        .await;
        let app = rig.start_exchange(19, 2 * MIB, 2 * MIB);
        rig.finish_exchange(app, Duration::from_secs(30)).await;
    })
    .await
    .expect("scenario within its time limit");
}
