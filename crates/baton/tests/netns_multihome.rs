//! A multihomed gateway (seed 003) on real links: SERVER has a second link, `srv2`
//! (10.90.1.2) beside `srv` (10.89.1.2), both through ROUTER, and the gateway listens on
//! one or both. ROUTER can drop everything to and from one of them
//! (`Bed::block_server_link`), which cuts the path to that gateway address over every
//! MOBILE link at once while the other address keeps working.
//!
//! a. the path to the first address is cut: the session roams to the second, byte-exact;
//! b. an address added to the gateway at run time is advertised, then used when the first
//!    is cut;
//! c. `baton goto` moves a live session to the other address, and `baton listen remove`
//!    sends it back (the agent chooses), make before break, no byte lost;
//! d. a host name with two addresses, the first dead: the agent connects through the
//!    second within `retries` × `retry_delay`; when every address fails the user is told,
//!    and the session resumes when one comes back;
//! e. the decision engine scores (interface, gateway address) pairs: a degraded path to one
//!    address moves the session to the other address on the same interface, a degraded
//!    interface moves the interface;
//! f. a gateway on `0.0.0.0` advertises the host's addresses from the kernel, follows them
//!    as they come and go, and sends sessions off an address it is losing.
//!
//! Each prints the pause it caused: the switch record's `duration_ms` and
//! `longest_stall_ms`, and the longest gap the application saw between two reads.
//! Needs root and `ip`, `iptables`, `tc`, `ping`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use baton_netbed::ServerLink;
use serde_json::Value;
use support::*;

/// Each scenario's own limit.
const LIMIT: Duration = Duration::from_secs(120);
const A: &str = "10.89.1.2:7700";
const B: &str = "10.90.1.2:7700";
/// Fast failure detection: keep-alives every 250 ms, the path lost after 1 s of silence.
const FAST: &str = "keepalive = \"250ms\"\ndead_after = \"1s\"\nconnect_timeout = \"2s\"";

fn session(st: &Value) -> &Value {
    &st["sessions"][0]
}

fn on(st: &Value, addr: &str) -> bool {
    session(st)["state"] == "up" && session(st)["gateway_addr"] == addr
}

/// The record's pause, as `describe` prints it, with the gateway addresses.
fn pause(sw: &Value) -> String {
    format!(
        "{} ({} → {})",
        describe(sw),
        sw["gateway_addr_from"].as_str().unwrap_or("?"),
        sw["gateway_addr_to"].as_str().unwrap_or("?")
    )
}

/// a. ROUTER drops everything to and from 10.89.1.2 in the middle of the stream: the agent
/// loses its path, tries the gateway's other address first (the interface is still up, so
/// the address is the suspect) and resumes there, on the same interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_first_address_roams_to_the_second() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: FAST,
            server_link2: true,
            listen: Some(format!("\"{A}\", \"{B}\"")),
            addresses: Some(format!("\"{A}\", \"{B}\"")),
            ..Options::default()
        };
        let mut rig = Rig::start("mh_roam", opts).await;
        assert!(
            on(&rig.status().unwrap(), A),
            "the session starts on the first address"
        );
        let (app, arrivals) = rig.start_timed_exchange(31, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;
        let cut = Instant::now();
        rig.bed.block_server_link(ServerLink::First, true).unwrap();
        let st = rig
            .wait_status(
                Duration::from_secs(15),
                "the session up on the second address",
                |st| on(st, B) && st["switches"].as_array().is_some_and(|v| !v.is_empty()),
            )
            .await;
        let resumed = cut.elapsed();
        assert_eq!(
            session(&st)["interface"],
            "wlan",
            "only the gateway address changed: {st}"
        );
        rig.finish_exchange(app, Duration::from_secs(30)).await;
        let gap = arrivals.longest_gap(cut, cut + resumed + Duration::from_secs(1));

        tokio::time::sleep(Duration::from_secs(2)).await;
        let sw = rig.switches();
        assert_eq!(
            sw.len(),
            1,
            "one roam, and the session stays on the second address: {sw:?}"
        );
        let r = &sw[0];
        println!("mh_roam: {}", pause(r));
        println!(
            "mh_roam: resumed {} ms after the cut; the application's longest gap {} ms",
            resumed.as_millis(),
            gap.as_millis()
        );
        assert_eq!(
            (
                r["gateway_addr_from"].as_str(),
                r["gateway_addr_to"].as_str()
            ),
            (Some(A), Some(B)),
            "{r}"
        );
        assert_eq!(
            (r["from"].as_str(), r["to"].as_str()),
            (Some("wlan"), Some("wlan")),
            "{r}"
        );
        assert_eq!(r["streams"], 1, "{r}");
        // Silence for dead_after (1 s), then one search whose first address works.
        assert!(r["duration_ms"].as_u64().unwrap() < 4000, "{r}");
        let gw = rig.gateway_status();
        assert_eq!(gw["sessions"][0]["gateway_addr"], B, "{gw}");
        assert_eq!(
            gw["stats"]["roams"], 1,
            "the agent told the gateway it roamed: {gw}"
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// b. The gateway starts with one address and the agent knows only that one. SERVER gets
/// its second link while the stream flows, `baton listen add` serves it: the gateway
/// advertises it to the live session; when the first address is cut the session goes on
/// at the address it learned that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_added_at_run_time_is_advertised_and_used() {
    tokio::time::timeout(LIMIT, async {
        let mut rig = Rig::start(
            "mh_advert",
            Options {
                client: FAST,
                ..Options::default()
            },
        )
        .await;
        // The gateway advertises its address once the session is up.
        rig.wait_status(
            Duration::from_secs(5),
            "the gateway's address advertised",
            |st| session(st)["advertised"] == serde_json::json!([A]),
        )
        .await;
        let (app, arrivals) = rig.start_timed_exchange(32, 6 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;

        rig.bed.add_server_link().unwrap();
        let out = rig.baton(&["listen", "add", B]).unwrap();
        println!("mh_advert: baton listen add {B}: {out}");
        assert!(out.contains(&format!("advertised: {A} {B}")), "{out}");
        let st = rig
            .wait_status(
                Duration::from_secs(5),
                "the new address advertised to the agent",
                |st| {
                    session(st)["advertised"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == B))
                },
            )
            .await;
        let learned = session(&st)["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["addr"] == B)
            .cloned()
            .unwrap();
        assert_eq!(learned["origin"], "advertised", "{st}");
        assert!(on(&st, A), "nothing moves yet: {st}");

        let cut = Instant::now();
        rig.bed.block_server_link(ServerLink::First, true).unwrap();
        rig.wait_status(
            Duration::from_secs(15),
            "the session on the advertised address",
            |st| on(st, B),
        )
        .await;
        let resumed = cut.elapsed();
        rig.finish_exchange(app, Duration::from_secs(30)).await;
        let gap = arrivals.longest_gap(cut, cut + resumed + Duration::from_secs(1));

        let sw = rig.switches();
        assert_eq!(sw.len(), 1, "{sw:?}");
        println!("mh_advert: {}", pause(&sw[0]));
        println!(
            "mh_advert: resumed {} ms after the cut; the application's longest gap {} ms",
            resumed.as_millis(),
            gap.as_millis()
        );
        assert_eq!(
            (
                sw[0]["gateway_addr_from"].as_str(),
                sw[0]["gateway_addr_to"].as_str()
            ),
            (Some(A), Some(B)),
            "{}",
            sw[0]
        );
        let gw = rig.gateway_status();
        assert_eq!(gw["listening"], serde_json::json!([A, B]), "{gw}");
        assert_eq!(gw["sessions"][0]["gateway_addr"], B, "{gw}");
    })
    .await
    .expect("scenario within its time limit");
}

/// c. The gateway serves both addresses; the agent is configured with the first only and
/// learns the second from the advertisement. `baton goto m B` moves the live session
/// there, make before break; then `baton listen remove B` (an address the gateway is about
/// to lose) directs it away with a go-to that lets the agent choose: back to A. Both moves
/// are planned switches and the stream is byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_to_moves_a_live_session_without_losing_a_byte() {
    go_to_scenario("mh_goto", "").await;
}

/// c'. The same with a gateway of two worker processes: `baton goto` reaches the worker
/// that holds the client's session, `baton listen remove` every worker, and the status
/// answers for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_to_and_listen_remove_work_on_a_gateway_of_workers() {
    go_to_scenario("mh_goto_workers", "workers = 2").await;
}

async fn go_to_scenario(name: &'static str, gateway: &'static str) {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            server_link2: true,
            listen: Some(format!("\"{A}\", \"{B}\"")),
            gateway,
            ..Options::default()
        };
        let mut rig = Rig::start(name, opts).await;
        rig.wait_status(Duration::from_secs(5), "both addresses advertised", |st| {
            session(st)["advertised"] == serde_json::json!([A, B])
        })
        .await;
        let (app, arrivals) = rig.start_timed_exchange(33, 8 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;

        let t1 = Instant::now();
        let out = rig.baton(&["goto", "m", B]).unwrap();
        let took1 = t1.elapsed();
        println!("{name}: baton goto m {B}: {out}");
        assert!(out.contains(&format!("{A} → {B}")), "{out}");
        rig.wait_status(
            Duration::from_secs(5),
            "the agent on the second address",
            |st| on(st, B),
        )
        .await;
        rig.wait_received(3 * MIB).await;

        let t2 = Instant::now();
        let out = rig.baton(&["listen", "remove", B]).unwrap();
        let took2 = t2.elapsed();
        println!("{name}: baton listen remove {B}: {out}");
        assert!(
            out.contains(&format!("{B} → {A}")),
            "the agent chose the other address: {out}"
        );
        assert!(
            out.contains(&format!("advertised: {A}"))
                && !out.contains(&format!("advertised: {A} {B}")),
            "{out}"
        );
        rig.finish_exchange(app, Duration::from_secs(30)).await;
        // Measured once the windows are past: a gap still open at `until` counts.
        let gap1 = arrivals.longest_gap(t1, t1 + took1 + Duration::from_millis(500));
        let gap2 = arrivals.longest_gap(t2, t2 + took2 + Duration::from_millis(500));

        let sw = rig.switches();
        assert_eq!(sw.len(), 2, "{sw:?}");
        for (r, (from, to), gap) in [(&sw[0], (A, B), gap1), (&sw[1], (B, A), gap2)] {
            println!(
                "{name}: {}; the application's longest gap {} ms",
                pause(r),
                gap.as_millis()
            );
            assert_eq!(r["kind"], "planned", "{r}");
            // Make before break: nothing like the old leg's one-second drain fallback.
            assert!(
                gap < Duration::from_secs(1),
                "the application paused {} ms: {r}",
                gap.as_millis()
            );
            assert!(r["reason"].as_str().unwrap().contains("go-to"), "{r}");
            assert_eq!(
                (
                    r["gateway_addr_from"].as_str(),
                    r["gateway_addr_to"].as_str()
                ),
                (Some(from), Some(to)),
                "{r}"
            );
            assert_eq!(
                (r["from"].as_str(), r["to"].as_str()),
                (Some("wlan"), Some("wlan")),
                "{r}"
            );
        }
        let gw = rig.gateway_status();
        assert_eq!(gw["listening"], serde_json::json!([A]), "{gw}");
        assert_eq!(gw["advertised"], serde_json::json!([A]), "{gw}");
        assert_eq!(gw["sessions"][0]["gateway_addr"], A, "{gw}");
        assert_eq!(gw["stats"]["gotos"], 2, "{gw}");
        if !gateway.is_empty() {
            assert_eq!(gw["workers"], 2, "{gw}");
            assert_eq!(gw["sessions"].as_array().map(Vec::len), Some(1), "{gw}");
        }
        let st = rig.status().unwrap();
        assert_eq!(
            session(&st)["advertised"],
            serde_json::json!([A]),
            "the agent has the new list: {st}"
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// d. `gw.test` has two addresses in MOBILE's /etc/hosts: 10.90.1.2 first, where nothing
/// listens on the gateway's port (every attempt refused at once), then 10.89.1.2. With
/// `retries = 3` and `retry_delay = "400ms"` the agent tries the first three times, 400 ms
/// apart, then connects through the second: within retries × delay. Then ROUTER cuts the
/// second too: every address fails, the agent says so (log, event, status); when the path
/// comes back the session resumes and the stream is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_a_dead_first_address_connects_through_the_next() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: FAST,
            server_link2: true,
            addresses: Some("\"gw.test:7700\"".into()),
            gateway_spec: "retries = 3\nretry_delay = \"400ms\"",
            mobile_hosts: Some("127.0.0.1 localhost\n10.90.1.2 gw.test\n10.89.1.2 gw.test\n".into()),
            ..Options::default()
        };
        let mut rig = Rig::start("mh_dns", opts).await;
        let st = rig.status().unwrap();
        let s = session(&st);
        assert!(on(&st, A), "{st}");
        let addrs = s["addresses"].as_array().unwrap();
        println!("mh_dns: addresses after the first search: {}", serde_json::to_string(addrs).unwrap());
        assert_eq!(addrs[0]["addr"], B, "the resolver's order is kept: {st}");
        assert_eq!(addrs[0]["origin"], "dns gw.test:7700", "{st}");
        assert_eq!((addrs[0]["state"].as_str(), addrs[0]["attempts"].as_u64()), (Some("failed"), Some(3)), "{st}");
        assert_eq!((addrs[1]["addr"].as_str(), addrs[1]["state"].as_str()), (Some(A), Some("current")), "{st}");
        let took = s["last_search_ms"].as_u64().unwrap();
        println!("mh_dns: connected through the second address {took} ms after the search began (3 attempts × 400 ms delay)");
        // Two pauses of 400 ms between the three refused attempts, then the second address.
        assert!((800..=1200 + 300).contains(&took), "within retries × retry_delay: {took} ms");

        let (app, arrivals) = rig.start_timed_exchange(34, 4 * MIB, MIB);
        rig.wait_received(MIB / 2).await;
        let cut = Instant::now();
        rig.bed.block_server_link(ServerLink::First, true).unwrap();
        let st = rig
            .wait_status(Duration::from_secs(15), "every address failed, and said", |st| {
                session(st)["failed_searches"].as_u64().is_some_and(|n| n >= 1)
            })
            .await;
        let told = st["events"].as_array().unwrap().iter().find(|e| e["kind"] == "gateway_unreachable").cloned();
        println!("mh_dns: told {} ms after the cut: {}", cut.elapsed().as_millis(), told.as_ref().map_or("-".into(), |e| e["reason"].to_string()));
        assert!(told.is_some_and(|e| e["urgent"] == true), "a gateway_unreachable event: {st}");
        assert_eq!(session(&st)["state"], "switching", "{st}");
        assert!(rig.daemon_log("client").contains("every address of the gateway failed"), "the log says it");
        tokio::time::sleep(Duration::from_secs(2)).await;
        rig.bed.block_server_link(ServerLink::First, false).unwrap();
        let back = Instant::now();
        let st = rig.wait_status(Duration::from_secs(15), "the session resumed", |st| on(st, A)).await;
        println!("mh_dns: resumed {} ms after the path came back", back.elapsed().as_millis());
        assert_eq!(session(&st)["failed_searches"], 0, "{st}");
        rig.finish_exchange(app, Duration::from_secs(30)).await;
        // Both interfaces were being tried when the path came back: the session may resume
        // on either (and the engine may later bring it back to wlan).
        let sw = rig.switches();
        println!("mh_dns: {}; the application's longest gap {} ms", pause(&sw[0]), arrivals.longest_gap(cut, Instant::now()).as_millis());
        assert_eq!(sw[0]["kind"], "unexpected", "{}", sw[0]);
        assert_eq!((sw[0]["gateway_addr_from"].as_str(), sw[0]["gateway_addr_to"].as_str()), (Some(A), Some(A)), "{}", sw[0]);
        assert!(sw[0]["duration_ms"].as_u64().unwrap() >= 2000, "the pause covers the outage: {}", sw[0]);
    })
    .await
    .expect("scenario within its time limit");
}

/// Every record's pause, printed.
fn print_switches(tag: &str, sw: &[Value]) {
    for r in sw {
        println!("{tag}: {}", pause(r));
    }
}

/// The address of the gateway's session as the gateway sees it.
fn gw_session_addr(rig: &Rig) -> Value {
    rig.gateway_status()["sessions"][0]["gateway_addr"].clone()
}

/// e. The engine's candidates are (interface, gateway address) pairs. MOBILE has wlan and
/// lte (lte metered), the gateway 10.89.1.2 and 10.89.1.2's twin 10.90.1.2. ROUTER drops 50%
/// of what goes to or comes from 10.89.1.2 only (TCP and the probes alike): every
/// interface's path to the current address degrades while the other address stays good,
/// and the engine moves the session to (wlan, 10.90.1.2): same interface, other address, a
/// planned switch whose record names both ends. Then the first address is repaired and wlan
/// itself loses 30%: the engine moves the interface, to lte, and keeps the address. Both
/// moves are byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_moves_to_the_better_interface_and_address_pair() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            // A dwell long enough that a few lucky probes of a lossy wlan cannot bring the
            // session back to it (it is unmetered) before the exchange is over.
            client: "[policy]\nmin_dwell = \"15s\"\naddress_interval = \"1s\"\n[policy.interfaces.lte]\nmetered = true",
            server_link2: true,
            listen: Some(format!("\"{A}\", \"{B}\"")),
            ..Options::default()
        };
        let mut rig = Rig::start("mh_pairs", opts).await;
        // Every pair measured: the other address on both interfaces too.
        let st = rig
            .wait_status(Duration::from_secs(20), "every (interface, address) pair measured", |st| {
                let paths = st["engine"]["paths"].as_array().cloned().unwrap_or_default();
                paths.len() == 4 && paths.iter().all(|p| p["stats"]["samples"].as_u64().unwrap_or(0) >= 3)
            })
            .await;
        for p in st["engine"]["paths"].as_array().unwrap() {
            println!("mh_pairs: {} → {}: {} ({} samples)", p["interface"], p["gateway_addr"], p["health"], p["stats"]["samples"]);
        }
        assert_eq!(st["engine"]["gateway_addr"], A, "{st}");
        let (app, arrivals) = rig.start_timed_exchange(35, 16 * MIB, MIB);
        rig.wait_received(MIB / 2).await;

        // The path to the first address degrades, whatever the interface.
        let lossy: Vec<Vec<&str>> = ["-d", "-s"]
            .iter()
            .map(|dir| vec!["iptables", "-w", "5", "-I", "FORWARD", *dir, "10.89.1.2", "-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", "DROP"])
            .collect();
        for r in &lossy {
            rig.sh(baton_netbed::Host::Router, r);
        }
        let degraded = Instant::now();
        let st = rig.wait_status(Duration::from_secs(30), "the session on (wlan, the second address)", |st| on(st, B)).await;
        let moved = degraded.elapsed();
        assert_eq!(session(&st)["interface"], "wlan", "the interface was good: {st}");
        let decided = st["events"].as_array().unwrap().iter().find(|e| e["kind"] == "switch_decided").cloned().unwrap();
        println!("mh_pairs: decided: {decided}");
        assert_eq!((decided["interface"].as_str(), decided["gateway_addr"].as_str()), (Some("wlan"), Some(B)), "{decided}");
        let gap1 = arrivals.longest_gap(degraded, degraded + moved + Duration::from_secs(1));
        for r in &lossy {
            let mut del = r.clone();
            del[3] = "-D";
            rig.sh(baton_netbed::Host::Router, &del);
        }

        // Now wlan itself degrades: the engine moves the interface and keeps the address.
        tokio::time::sleep(Duration::from_secs(3)).await;
        rig.bed.set_loss(Link::Wlan, 30.0).unwrap();
        let lossy_wlan = Instant::now();
        let st = rig
            .wait_status(Duration::from_secs(30), "the session on (lte, the second address)", |st| {
                session(st)["state"] == "up" && session(st)["interface"] == "lte"
            })
            .await;
        let moved2 = lossy_wlan.elapsed();
        assert_eq!(session(&st)["gateway_addr"], B, "only the interface changed: {st}");
        let gap2 = arrivals.longest_gap(lossy_wlan, lossy_wlan + moved2 + Duration::from_secs(1));
        rig.finish_exchange(app, Duration::from_secs(60)).await;
        rig.bed.set_loss(Link::Wlan, 0.0).unwrap();

        let sw = rig.switches();
        print_switches("mh_pairs", &sw);
        println!("mh_pairs: address degraded → on {B} after {} ms, the application's longest gap {} ms", moved.as_millis(), gap1.as_millis());
        println!("mh_pairs: wlan degraded → on lte after {} ms, the application's longest gap {} ms", moved2.as_millis(), gap2.as_millis());
        assert_eq!(sw.len(), 2, "two moves: {sw:?}");
        let (r1, r2) = (&sw[0], &sw[1]);
        assert!(sw.iter().all(|r| r["kind"] == "planned"), "the engine's moves are planned: {sw:?}");
        assert_eq!((r1["from"].as_str(), r1["to"].as_str()), (Some("wlan"), Some("wlan")), "{r1}");
        assert_eq!((r1["gateway_addr_from"].as_str(), r1["gateway_addr_to"].as_str()), (Some(A), Some(B)), "{r1}");
        assert_eq!((r2["from"].as_str(), r2["to"].as_str()), (Some("wlan"), Some("lte")), "{r2}");
        assert_eq!((r2["gateway_addr_from"].as_str(), r2["gateway_addr_to"].as_str()), (Some(B), Some(B)), "{r2}");
        assert_eq!(gw_session_addr(&rig), B);
        assert_eq!(rig.gateway_status()["stats"]["roams"], 1, "the agent told the gateway of the address move");
    })
    .await
    .expect("scenario within its time limit");
}

/// f. The gateway listens on `0.0.0.0:7700` and follows the host's addresses in the kernel's
/// interface table. The session sees both of SERVER's addresses advertised. An address added
/// to `srv2` at run time is advertised and usable (`baton goto` moves the session there).
/// Then it is deprecated (preferred lifetime 0): the gateway stops advertising it and sends
/// the session a go-to on its own, and the session moves make before break. Last, the
/// address the session is on is removed: the gateway can no longer reach the agent there,
/// the agent finds its path dead and roams. No byte is lost in any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_gateway_follows_its_addresses_and_sends_sessions_off_one_it_loses() {
    const C: &str = "10.90.1.3:7700";
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: FAST,
            server_link2: true,
            listen: Some("\"0.0.0.0:7700\"".into()),
            ..Options::default()
        };
        let mut rig = Rig::start("mh_wild", opts).await;
        rig.wait_status(
            Duration::from_secs(5),
            "both host addresses advertised",
            |st| session(st)["advertised"] == serde_json::json!([A, B]),
        )
        .await;
        let gw = rig.gateway_status();
        println!(
            "mh_wild: gateway: listening {} advertised {} host {}",
            gw["listening"], gw["advertised"], gw["host_addresses"]
        );
        assert_eq!(gw["listening"], serde_json::json!(["0.0.0.0:7700"]), "{gw}");
        let (app, arrivals) = rig.start_timed_exchange(36, 30 * MIB, 2 * MIB);
        rig.wait_received(MIB).await;

        // An address appears on srv2: advertised, then usable.
        let srv = baton_netbed::Host::Server;
        rig.sh(srv, &["ip", "addr", "add", "10.90.1.3/24", "dev", "srv2"]);
        rig.sh(
            srv,
            &["ip", "rule", "add", "from", "10.90.1.3", "lookup", "90"],
        );
        rig.wait_status(Duration::from_secs(5), "the new address advertised", |st| {
            session(st)["advertised"] == serde_json::json!([A, B, C])
        })
        .await;
        let out = rig.baton(&["goto", "m", C]).unwrap();
        println!("mh_wild: baton goto m {C}: {out}");
        rig.wait_status(
            Duration::from_secs(5),
            "the session on the new address",
            |st| on(st, C),
        )
        .await;
        assert_eq!(gw_session_addr(&rig), C);

        // It is deprecated: no longer advertised, and the gateway sends the session away.
        let t_dep = Instant::now();
        rig.sh(
            srv,
            &[
                "ip",
                "addr",
                "change",
                "10.90.1.3/24",
                "dev",
                "srv2",
                "preferred_lft",
                "0",
            ],
        );
        let st = rig
            .wait_status(
                Duration::from_secs(10),
                "the session off the deprecated address",
                |st| session(st)["state"] == "up" && session(st)["gateway_addr"] != C,
            )
            .await;
        let left = t_dep.elapsed();
        assert!(on(&st, A), "the agent chose its first address: {st}");
        assert_eq!(
            session(&st)["advertised"],
            serde_json::json!([A, B]),
            "{st}"
        );
        let gw = rig.gateway_status();
        println!(
            "mh_wild: after the deprecation: advertised {} host {}",
            gw["advertised"], gw["host_addresses"]
        );
        let c_state = gw["host_addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["addr"] == "10.90.1.3")
            .cloned()
            .unwrap();
        assert_eq!(c_state["state"], "deprecated", "{gw}");
        assert!(gw["stats"]["address_losses"].as_u64().unwrap() >= 1, "{gw}");
        assert!(
            rig.daemon_log("gateway")
                .contains("directing its sessions elsewhere (go-to)"),
            "the gateway logs its go-to"
        );
        let gap_dep = arrivals.longest_gap(t_dep, t_dep + left + Duration::from_millis(500));

        // The address in use is removed outright.
        rig.baton(&["goto", "m", B]).unwrap();
        rig.wait_status(
            Duration::from_secs(5),
            "the session on the second link's address",
            |st| on(st, B),
        )
        .await;
        rig.wait_received(12 * MIB).await;
        let t_del = Instant::now();
        rig.sh(srv, &["ip", "addr", "del", "10.90.1.3/24", "dev", "srv2"]);
        rig.sh(srv, &["ip", "addr", "del", "10.90.1.2/24", "dev", "srv2"]);
        let st = rig
            .wait_status(
                Duration::from_secs(15),
                "the session off the removed address",
                |st| on(st, A),
            )
            .await;
        let gone = t_del.elapsed();
        let gap_del = arrivals.longest_gap(t_del, t_del + gone + Duration::from_secs(1));
        rig.finish_exchange(app, Duration::from_secs(60)).await;
        let gw = rig.gateway_status();
        assert_eq!(gw["advertised"], serde_json::json!([A]), "{gw}");
        let st2 = rig.status().unwrap();
        assert_eq!(
            session(&st2)["advertised"],
            serde_json::json!([A]),
            "{st} / {st2}"
        );

        let sw = rig.switches();
        print_switches("mh_wild", &sw);
        println!(
            "mh_wild: deprecated → off it after {} ms, the application's longest gap {} ms",
            left.as_millis(),
            gap_dep.as_millis()
        );
        println!(
            "mh_wild: removed → off it after {} ms, the application's longest gap {} ms",
            gone.as_millis(),
            gap_del.as_millis()
        );
        let dep = sw
            .iter()
            .find(|r| r["gateway_addr_from"] == C && r["gateway_addr_to"] == A)
            .unwrap();
        assert_eq!(
            dep["kind"], "planned",
            "the deprecated address still worked: make before break: {dep}"
        );
        assert!(dep["reason"].as_str().unwrap().contains("go-to"), "{dep}");
        assert!(
            gap_dep < Duration::from_secs(1),
            "the application paused {} ms: {dep}",
            gap_dep.as_millis()
        );
        let del = sw
            .iter()
            .rev()
            .find(|r| r["gateway_addr_from"] == B)
            .unwrap();
        assert_eq!(del["gateway_addr_to"], A, "{del}");
    })
    .await
    .expect("scenario within its time limit");
}
