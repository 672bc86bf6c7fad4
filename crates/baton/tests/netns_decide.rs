//! The decision engine on real links: the `baton` binary in network namespaces (crate
//! `baton-netbed`), the client agent in MOBILE following the kernel's interface table (wlan,
//! route metric 100, preferred; lte, metric 200), the gateway and a verifying server in
//! SERVER. The engine probes both paths over UDP; the tests degrade a link (loss, delay)
//! and check what the engine does about it, by its events (`baton events`), its view of the
//! interfaces and the switch records (`baton status --json`), while an application in MOBILE
//! runs a paced exchange through baton, both directions checked byte by byte.
//!
//! Every scenario uses short periods (check 200 ms, search 500 ms, window 3 s) so that it
//! takes seconds. Needs root and `ip`, `iptables`, `tc`, `ping` (`.ci/run` installs them).
//! Set `BATON_LOG=...` to change the daemons' log filter; their logs and the events are
//! printed when a test fails.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Each scenario's own limit.
const LIMIT: Duration = Duration::from_secs(120);

/// The engine's periods in every scenario, followed by the scenario's own keys.
fn policy(extra: &str) -> String {
    format!(
        "[policy]\ncheck_interval = \"200ms\"\nsearch_interval = \"500ms\"\nwindow = \"3s\"\nmin_samples = 3\n{extra}\n"
    )
}

/// The rig's defaults with the agent's events followed: every scenario checks them.
fn followed() -> Options {
    Options {
        events: true,
        ..Options::default()
    }
}

fn assert_record(sw: &Value, kind: &str, from: &str, to: &str) {
    assert_eq!(sw["kind"], kind, "{sw}");
    assert_eq!(sw["gateway"], "gw", "{sw}");
    assert_eq!(sw["from"], from, "{sw}");
    assert_eq!(sw["to"], to, "{sw}");
    assert_eq!(sw["streams"], 1, "the live stream moved: {sw}");
}

fn at(e: &Value) -> u64 {
    e["at_unix_ms"].as_u64().unwrap()
}

/// Sleeps `span` while checking, every 100 ms, that the path stays on `on` with no switch
/// decided or recorded. Returns the last status.
async fn hold(rig: &mut Rig, span: Duration, on: &str, why: &str) -> Value {
    let end = Instant::now() + span;
    loop {
        let st = rig.status().unwrap();
        assert_eq!(
            st["current_interface"],
            on,
            "{}: {why}: {}",
            rig.name,
            describe_engine(&st)
        );
        assert_eq!(
            st["switches"].as_array().map_or(0, Vec::len),
            0,
            "{}: {why}: {:#}",
            rig.name,
            st["switches"]
        );
        assert!(
            rig.events_of("switch_decided").is_empty(),
            "{}: {why}; events:\n{}",
            rig.name,
            describe_events(&rig.events())
        );
        rig.check_alive();
        if Instant::now() >= end {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 1 and 2. wlan degraded to 30 % loss each way (about half the probes' round trips lost,
/// past the critical 20 %): the engine switches to lte by itself within 10 s, no byte lost.
/// Then wlan is restored, and lte is the dearer link (`cost = 5`): once wlan is good again
/// and scores better, the engine still holds lte until `min_dwell` (10 s) after the switch,
/// and then moves back, within `min_dwell` + 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_wlan_switches_to_lte_and_back_after_dwell() {
    const DWELL_MS: u64 = 10_000;
    const BOUND_MS: u64 = 10_000;
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client_tables: policy(&format!("min_dwell = \"{DWELL_MS}ms\"\n[policy.interfaces.lte]\ncost = 5\n")),
            ..followed()
        };
        let mut rig = Rig::start("decide_loss", opts).await;
        // Both paths measured and good before anything happens.
        rig.wait_health(Duration::from_secs(10), "wlan", "good").await;
        let st = rig.wait_health(Duration::from_secs(10), "lte", "good").await;
        println!("decide_loss: before: {}", describe_engine(&st));
        let app = rig.start_exchange(21, 6 * MIB, 200 * KIB);
        rig.wait_received(200 * KIB).await;

        // 1. Degrade wlan.
        let skip = rig.events().len();
        let degraded = unix_ms();
        rig.bed.set_loss(Link::Wlan, 30.0).unwrap();
        let decided = rig
            .wait_event(Duration::from_millis(BOUND_MS + 5_000), "switch_decided", skip, |e| e["interface"] == "lte")
            .await;
        let done = rig.wait_event(Duration::from_secs(15), "switch_done", skip, |e| e["interface"] == "lte").await;
        let to_decision = at(&decided) - degraded;
        let to_done = at(&done) - degraded;
        println!(
            "decide_loss: wlan at 30% loss → switch to lte decided after {to_decision} ms, done after {to_done} ms ({})",
            decided["reason"].as_str().unwrap_or("")
        );
        assert!(to_decision < BOUND_MS, "the switch took {to_decision} ms, bound {BOUND_MS} ms");
        assert_eq!(decided["urgent"], true, "past the critical loss: {decided}");
        assert!(decided["reason"].as_str().unwrap().starts_with("critical: "), "{decided}");
        let st = rig.status().unwrap();
        assert_eq!(st["current_interface"], "lte", "{}", describe_engine(&st));
        println!("decide_loss: on lte: {}", describe_engine(&st));

        // 2. wlan restored: better (lte costs 5 × 20 points), but the dwell holds lte.
        rig.bed.set_loss(Link::Wlan, 0.0).unwrap();
        let switched = at(&done);
        let skip = rig.events().len();
        let mut better_seen: Option<u64> = None;
        let back = loop {
            let st = rig.status().unwrap();
            let now = unix_ms();
            if st["current_interface"] == "lte" && better_seen.is_none() {
                let (w, l) = (iface(&st, "wlan").unwrap(), iface(&st, "lte").unwrap());
                if w["health"] == "good" && w["score"].as_f64().zip(l["score"].as_f64()).is_some_and(|(w, l)| l - w > 50.0) {
                    better_seen = Some(now - switched);
                    println!("decide_loss: wlan good and better {} ms after the switch: {}", now - switched, describe_engine(&st));
                }
            }
            if let Some(e) = rig.events().into_iter().skip(skip).find(|e| e["kind"] == "switch_decided") {
                break e;
            }
            assert!(now - switched < DWELL_MS + 5_000, "no switch back within min_dwell + 5 s: {}", describe_engine(&st));
            rig.check_alive();
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let back_after = at(&back) - switched;
        println!(
            "decide_loss: back to {} {back_after} ms after the switch to lte (min_dwell {DWELL_MS} ms): {}",
            back["interface"],
            back["reason"].as_str().unwrap_or("")
        );
        assert_eq!(back["interface"], "wlan", "{back}");
        assert_eq!(back["urgent"], false, "{back}");
        assert!(back["reason"].as_str().unwrap().starts_with("better path"), "{back}");
        let better_seen = better_seen.expect("wlan was seen good and better while the dwell held lte");
        assert!(better_seen < DWELL_MS, "wlan good and better at {better_seen} ms: the dwell was not what held lte");
        assert!(back_after >= DWELL_MS, "back to wlan after {back_after} ms, before min_dwell ({DWELL_MS} ms)");
        assert!(back_after <= DWELL_MS + 3_000, "back to wlan after {back_after} ms, min_dwell {DWELL_MS} ms + 3 s");
        rig.wait_event(Duration::from_secs(15), "switch_done", skip, |e| e["interface"] == "wlan").await;

        rig.finish_exchange(app, Duration::from_secs(60)).await;
        let sw = rig.switches();
        for s in &sw {
            println!("decide_loss: {}", describe(s));
        }
        assert_eq!(sw.len(), 2, "{sw:#?}");
        assert_record(&sw[0], "planned", "wlan", "lte");
        assert_record(&sw[1], "planned", "lte", "wlan");
        assert_eq!(rig.events_of("switch_decided").len(), 2, "{}", describe_events(&rig.events()));
        assert!(rig.events_of("switch_failed").is_empty(), "{}", describe_events(&rig.events()));
        assert_eq!(rig.status().unwrap()["current_interface"], "wlan");
    })
    .await
    .expect("scenario within its time limit");
}

/// 3. Manual mode: wlan's round trip grows by 200 ms (100 ms each way; warning limit 150 ms,
/// critical 1 s), so lte scores far better and wlan goes past the warning limit: the engine
/// proposes lte and does not move. `baton decline` keeps
/// wlan, and lte is not proposed again during `min_dwell` (5 s); when it is, `baton approve`
/// makes the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_proposes_and_waits_for_the_user() {
    const DWELL: Duration = Duration::from_secs(5);
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            // The top-level key, which overrides `policy.mode`.
            client: "mode = \"manual\"",
            client_tables: policy(
                "mode = \"auto\"\nmin_dwell = \"5s\"\nwarning = { rtt = \"150ms\" }\n",
            ),
            ..followed()
        };
        let mut rig = Rig::start("decide_manual", opts).await;
        rig.wait_health(Duration::from_secs(10), "lte", "good")
            .await;
        let st = rig.status().unwrap();
        assert_eq!(st["engine"]["mode"], "manual");
        assert_eq!(
            rig.baton(&["approve"]).unwrap_err(),
            "baton: no switch is proposed"
        );
        let app = rig.start_exchange(22, 5 * MIB, 200 * KIB);
        rig.wait_received(200 * KIB).await;

        let skip = rig.events().len();
        let degraded = unix_ms();
        rig.bed.set_delay(Link::Wlan, 100).unwrap();
        let proposal = rig
            .wait_event(Duration::from_secs(10), "proposal", skip, |_| true)
            .await;
        println!(
            "decide_manual: wlan +200 ms round trip → proposal of {} after {} ms: {}",
            proposal["interface"],
            at(&proposal) - degraded,
            proposal["reason"].as_str().unwrap_or("")
        );
        assert_eq!(proposal["interface"], "lte", "{proposal}");
        // Either the mean round trip reached the warning limit first, or lte's score got
        // better than wlan's by more than the hysteresis first (the mean still counted the
        // fast probes from before the delay).
        let reason = proposal["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("warning: round trip") || reason.starts_with("better path"),
            "{proposal}"
        );
        // No switch while the user has not answered.
        let st = hold(
            &mut rig,
            Duration::from_secs(3),
            "wlan",
            "a proposal unanswered",
        )
        .await;
        assert_eq!(st["engine"]["proposal"], "lte", "{}", describe_engine(&st));
        assert_eq!(
            iface(&st, "wlan").unwrap()["health"],
            "warning",
            "{}",
            describe_engine(&st)
        );

        // Declined: the path stays, and lte is not proposed again for min_dwell.
        let skip = rig.events().len();
        let line = rig.baton(&["decline"]).unwrap();
        let declined_at = Instant::now();
        println!("decide_manual: baton decline: {line}");
        rig.wait_event(Duration::from_secs(5), "declined", skip, |e| {
            e["interface"] == "lte"
        })
        .await;
        let st = hold(
            &mut rig,
            DWELL - Duration::from_millis(1500),
            "wlan",
            "a declined proposal",
        )
        .await;
        assert_eq!(
            st["engine"]["proposal"],
            Value::Null,
            "{}",
            describe_engine(&st)
        );
        let again: Vec<Value> = rig
            .events()
            .into_iter()
            .skip(skip)
            .filter(|e| e["kind"] == "proposal")
            .collect();
        assert!(
            again.is_empty(),
            "proposed again within min_dwell: {again:?}"
        );

        // After min_dwell, proposed again; approved, the switch is made.
        let again = rig
            .wait_event(DWELL + Duration::from_secs(5), "proposal", skip, |e| {
                e["interface"] == "lte"
            })
            .await;
        println!(
            "decide_manual: proposed again {} ms after the decline",
            declined_at.elapsed().as_millis()
        );
        assert!(
            declined_at.elapsed() >= DWELL - Duration::from_millis(300),
            "proposed again before min_dwell"
        );
        assert!(rig.switches().is_empty());
        let skip = rig.events().len();
        let line = rig.baton(&["approve"]).unwrap();
        println!("decide_manual: baton approve: {line}");
        assert_eq!(line, "switching to lte");
        let decided = rig
            .wait_event(Duration::from_secs(5), "switch_decided", skip, |_| true)
            .await;
        assert_eq!(decided["interface"], "lte", "{decided}");
        assert_eq!(decided["reason"], "approved by the user", "{decided}");
        rig.wait_event(Duration::from_secs(15), "switch_done", skip, |e| {
            e["interface"] == "lte"
        })
        .await;
        println!(
            "decide_manual: on lte {} ms after the second proposal",
            unix_ms() - at(&again)
        );
        assert_eq!(rig.status().unwrap()["current_interface"], "lte");

        rig.finish_exchange(app, Duration::from_secs(60)).await;
        let sw = rig.switches();
        for s in &sw {
            println!("decide_manual: {}", describe(s));
        }
        assert_eq!(sw.len(), 1, "{sw:#?}");
        assert_record(&sw[0], "planned", "wlan", "lte");
        assert_eq!(
            rig.events_of("switch_decided").len(),
            1,
            "{}",
            describe_events(&rig.events())
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// Degrades wlan to 30 % loss with nowhere to go; waits for the engine's `kind` event about
/// wlan (urgent), then holds 3 s without a switch, with `kind` said at most once per level
/// (warning, critical); then restores wlan, waits for `recovered` and finishes the exchange
/// exact.
async fn degrade_the_only_link(
    rig: &mut Rig,
    kind: &str,
    app: tokio::task::JoinHandle<std::io::Result<baton_runtime::verify::Report>>,
) -> Vec<Value> {
    let skip = rig.events().len();
    let degraded = unix_ms();
    rig.bed.set_loss(Link::Wlan, 30.0).unwrap();
    let first = rig
        .wait_event(Duration::from_secs(10), kind, skip, |_| true)
        .await;
    println!(
        "{}: wlan at 30% loss → {kind} after {} ms: {}",
        rig.name,
        at(&first) - degraded,
        first["reason"].as_str().unwrap_or("")
    );
    assert_eq!(first["interface"], "wlan", "{first}");
    assert_eq!(first["urgent"], true, "{first}");
    let st = hold(
        rig,
        Duration::from_secs(3),
        "wlan",
        "no other interface to go to",
    )
    .await;
    println!("{}: after 3 s: {}", rig.name, describe_engine(&st));
    assert_eq!(st["sessions"][0]["interface"], "wlan");
    assert_eq!(
        iface(&st, "wlan").unwrap()["health"],
        "critical",
        "{}",
        describe_engine(&st)
    );
    let told: Vec<Value> = rig
        .events()
        .into_iter()
        .skip(skip)
        .filter(|e| e["kind"] == kind)
        .collect();
    // Said once per level: at most a warning-level then a critical-level one.
    assert!(told.len() <= 2, "{}", describe_events(&told));
    assert!(
        told.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .starts_with("critical: "),
        "{}",
        describe_events(&told)
    );
    assert!(
        told.iter()
            .all(|e| e["interface"] == "wlan" && e["urgent"] == true),
        "{}",
        describe_events(&told)
    );

    // Restored: once the lost probes leave the window, the engine says so.
    let restored = unix_ms();
    rig.bed.set_loss(Link::Wlan, 0.0).unwrap();
    let recovered = rig
        .wait_event(Duration::from_secs(10), "recovered", skip, |_| true)
        .await;
    println!(
        "{}: wlan restored → recovered after {} ms",
        rig.name,
        at(&recovered) - restored
    );
    assert_eq!(recovered["interface"], "wlan", "{recovered}");
    rig.finish_exchange(app, Duration::from_secs(60)).await;
    assert!(rig.switches().is_empty(), "{:#?}", rig.switches());
    let events: Vec<Value> = rig.events().into_iter().skip(skip).collect();
    println!("{}: events:\n{}", rig.name, describe_events(&events));
    assert!(
        events
            .iter()
            .all(|e| e["kind"] != "switch_decided" && e["kind"] != "proposal"),
        "{}",
        describe_events(&events)
    );
    events
}

/// The single-link scenarios hold a link at 30 % loss each way for seconds. At that loss
/// TCP's retransmission back-off alone can leave the control connection silent for the
/// default 4 s `dead_after` (about 1 run in 20), and the agent then reconnects on the same
/// link: the liveness check at work, not the engine these scenarios are about. A longer
/// `dead_after` keeps them on the engine's decisions.
const SLOW_DEATH: &str = "dead_after = \"20s\"\n";

/// 4. One interface only (lte is `never_use`): wlan degraded, the engine reports that the
/// only link is going (`link_going`) and does not switch; the stream survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_interface_reports_link_going_and_stays() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: SLOW_DEATH,
            client_tables: policy("[policy.interfaces.lte]\nnever_use = true\n"),
            ..followed()
        };
        let mut rig = Rig::start("decide_single", opts).await;
        let st = rig
            .wait_health(Duration::from_secs(10), "wlan", "good")
            .await;
        let lte = iface(&st, "lte").unwrap();
        assert_eq!(lte["usable"], false, "{lte}");
        assert_eq!(
            lte["stats"]["samples"], 0,
            "a never_use interface is not probed: {lte}"
        );
        let app = rig.start_exchange(23, 2 * MIB, 200 * KIB);
        rig.wait_received(200 * KIB).await;
        let events = degrade_the_only_link(&mut rig, "link_going", app).await;
        assert!(
            events
                .iter()
                .all(|e| e["kind"] != "warning" && e["kind"] != "search"),
            "{}",
            describe_events(&events)
        );
        // lte never carried anything, not even after the degradation.
        let st = rig.status().unwrap();
        assert_eq!(
            iface(&st, "lte").unwrap()["stats"]["samples"],
            0,
            "{}",
            describe_engine(&st)
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// 4'. Two interfaces but lte down: wlan degraded, the engine warns that the connection may
/// soon be unavailable (`warning`, urgent, "no other interface") and does not switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_link_down_warns_and_stays() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options {
            client: SLOW_DEATH,
            client_tables: policy(""),
            ..followed()
        };
        let mut rig = Rig::start("decide_nolte", opts).await;
        rig.bed.link_down(Link::Lte).unwrap();
        let st = rig
            .wait_status(Duration::from_secs(10), "lte unusable", |st| {
                iface(st, "lte").is_some_and(|i| i["usable"] == false)
            })
            .await;
        assert_eq!(st["current_interface"], "wlan");
        rig.wait_health(Duration::from_secs(10), "wlan", "good")
            .await;
        let app = rig.start_exchange(24, 2 * MIB, 200 * KIB);
        rig.wait_received(200 * KIB).await;
        let events = degrade_the_only_link(&mut rig, "warning", app).await;
        let warning = events.iter().find(|e| e["kind"] == "warning").unwrap();
        assert!(
            warning["reason"]
                .as_str()
                .unwrap()
                .contains("no other interface"),
            "{warning}"
        );
    })
    .await
    .expect("scenario within its time limit");
}

/// wlan goes down for 2 s (the agent moves to lte on the kernel's event), then comes back
/// as good as before, its default route restored with metric 100. The configuration says
/// nothing of costs, so the preference is the kernel's route metric (wlan 100, lte 200).
/// Checks that the engine learns wlan's metric again, and that the agent is back on wlan
/// within `min_dwell` (5 s) + 5 s of wlan's return.
async fn blip(name: &str, extra: &str) {
    let opts = Options {
        client_tables: policy(&format!("min_dwell = \"5s\"\n{extra}")),
        ..followed()
    };
    let mut rig = Rig::start(name, opts).await;
    rig.wait_health(Duration::from_secs(10), "lte", "good")
        .await;
    let app = rig.start_exchange(25, 4 * MIB, 200 * KIB);
    rig.wait_received(200 * KIB).await;
    rig.bed.link_down(Link::Wlan).unwrap();
    rig.wait_status(Duration::from_secs(10), "the session on lte", |st| {
        st["current_interface"] == "lte" && st["sessions"][0]["state"] == "up"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let skip = rig.events().len();
    let up = Instant::now();
    rig.bed.link_up(Link::Wlan).unwrap();
    let routes = String::from_utf8_lossy(
        &rig.bed
            .exec(
                baton_netbed::Host::Mobile,
                &["ip", "route", "show", "default"],
            )
            .unwrap()
            .stdout,
    )
    .into_owned();
    println!(
        "{name}: default routes after link up:\n{}",
        routes.trim_end()
    );
    let deadline = up + Duration::from_secs(10);
    let (mut back, mut metric_seen) = (None, None);
    while Instant::now() < deadline {
        let st = rig.status().unwrap();
        if metric_seen.is_none() && iface(&st, "wlan").is_some_and(|i| i["route_metric"] == 100) {
            metric_seen = Some(up.elapsed());
        }
        if let Some(e) = rig
            .events()
            .into_iter()
            .skip(skip)
            .find(|e| e["kind"] == "switch_decided")
        {
            back = Some(e);
            break;
        }
        rig.check_alive();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = rig.status().unwrap();
    println!(
        "{name}: {} ms after wlan came back: {}",
        up.elapsed().as_millis(),
        describe_engine(&st)
    );
    rig.finish_exchange(app, Duration::from_secs(60)).await;
    let wlan = iface(&st, "wlan").unwrap().clone();
    assert!(
        metric_seen.is_some() || back.is_some(),
        "the engine never saw wlan's default-route metric again (route_metric {} while the kernel has `{}`): \
         wlan ranks after lte and scores {} against lte's {}",
        wlan["route_metric"],
        routes.lines().find(|l| l.contains("wlan")).unwrap_or("no wlan route"),
        wlan["score"],
        iface(&st, "lte").unwrap()["score"]
    );
    let back = back.unwrap_or_else(|| {
        panic!(
            "still on {} 10 s after wlan came back as good as lte (scores {} against {}); events:\n{}",
            st["current_interface"],
            wlan["score"],
            iface(&st, "lte").unwrap()["score"],
            describe_events(&rig.events())
        )
    });
    println!(
        "{name}: back to {} {} ms after wlan came back: {}",
        back["interface"],
        up.elapsed().as_millis(),
        back["reason"]
    );
    assert_eq!(back["interface"], "wlan", "{back}");
}

/// Known to fail, intermittently (reported, not fixed here; failed in 2 of 3 runs): with
/// `min_gain = 1` one rank of preference (5 points) is enough to move back, but the engine
/// may never learn that wlan has its default route again. The link comes up with its address before the route is back; the agent's
/// path table takes the later route change (metric 100) without telling the engine, whose
/// copy keeps `route_metric: null`, which ranks wlan after lte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_learns_the_metric_of_a_returning_link() {
    tokio::time::timeout(LIMIT, blip("decide_metric", "min_gain = 1\n"))
        .await
        .expect("scenario within its time limit");
}

/// Known to fail (reported, not fixed here), even once the metric is learnt: with the
/// default weights and `min_gain` the agent never returns to the preferred link after a
/// blip. The weights' documentation says the `preference` points exist "so that between
/// equal links the preferred one wins", but one rank is 5 points and a switch needs
/// `min_gain` = 10, so the agent stays on lte while the kernel's routing table prefers wlan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_the_preferred_link_after_a_blip() {
    tokio::time::timeout(LIMIT, blip("decide_blip", ""))
        .await
        .expect("scenario within its time limit");
}

/// Known to fail (reported, not fixed here): `never_use` is the engine's rule only. lte is
/// `never_use = true` ("never switch to it, not even when asked"); wlan goes down for 3 s.
/// Expected: the session waits for wlan (held, no record to lte) and resumes on it. The
/// agent's own reconnection after a lost path tries every usable interface in route-metric
/// order and knows nothing of the policy, so it moves the session to lte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_use_is_not_used_when_the_path_is_lost() {
    tokio::time::timeout(LIMIT, async {
        let opts = Options { client_tables: policy("[policy.interfaces.lte]\nnever_use = true\n"), ..followed() };
        let mut rig = Rig::start("decide_never", opts).await;
        let app = rig.start_exchange(26, 2 * MIB, 200 * KIB);
        rig.wait_received(200 * KIB).await;
        rig.bed.link_down(Link::Wlan).unwrap();
        let mut on_lte = Vec::new();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            let st = rig.status().unwrap();
            if st["current_interface"] == "lte" || st["sessions"][0]["interface"] == "lte" {
                on_lte.push(format!("current_interface {} session {}", st["current_interface"], st["sessions"][0]));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rig.bed.link_up(Link::Wlan).unwrap();
        rig.wait_status(Duration::from_secs(15), "the session up again", |st| st["sessions"][0]["state"] == "up").await;
        rig.finish_exchange(app, Duration::from_secs(60)).await;
        let sw = rig.switches();
        for s in &sw {
            println!("decide_never: {}", describe(s));
        }
        println!("decide_never: events:\n{}", describe_events(&rig.events()));
        assert!(
            on_lte.is_empty(),
            "the never_use interface carried the session in {} of the status polls while wlan was down, first: {}",
            on_lte.len(),
            on_lte[0]
        );
        assert!(sw.iter().all(|s| s["to"] != "lte"), "a switch to the never_use interface: {sw:#?}");
    })
    .await
    .expect("scenario within its time limit");
}
