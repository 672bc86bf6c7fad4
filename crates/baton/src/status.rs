//! `baton status` as a table for humans.

use std::fmt::Write as _;

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders the status document as text.
pub(crate) fn render(st: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "current interface: {}", s(&st["current_interface"]));
    let _ = writeln!(out, "mode: {}   proposal: {}", s(&st["engine"]["mode"]), s(&st["engine"]["proposal"]));
    let eng = st["engine"]["interfaces"].as_array().cloned().unwrap_or_default();
    if !eng.is_empty() {
        let _ = writeln!(out, "\nINTERFACE        KIND      HEALTH    RTT ms   LOSS %  JITTER ms  SCORE    COST  METERED");
        for i in &eng {
            let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
            let _ = writeln!(
                out,
                "{:<16} {:<9} {:<9} {:<8} {:<7} {:<10} {:<8} {:<5} {}",
                s(&i["name"]),
                s(&i["kind"]),
                s(&i["health"]),
                ms(&i["stats"]["rtt_ms"]),
                i["stats"]["loss"].as_f64().map_or("-".to_owned(), |l| format!("{:.1}", l * 100.0)),
                ms(&i["stats"]["jitter_ms"]),
                i["score"].as_f64().map_or("-".to_owned(), |x| format!("{x:.0}")),
                s(&i["attributes"]["cost"]),
                s(&i["attributes"]["metered"])
            );
        }
    }
    let _ = writeln!(out, "\nINTERFACE        UP    KIND      METRIC      DEVICE           SOURCE / ADDRESSES");
    for i in st["interfaces"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = i["addresses"].as_array().into_iter().flatten().map(s).collect();
        let _ = writeln!(
            out,
            "{:<16} {:<5} {:<9} {:<11} {:<16} {}",
            s(&i["name"]),
            if i["up"] == true { "yes" } else { "no" },
            s(&i["kind"]),
            s(&i["priority"]),
            s(&i["device"]),
            if addrs.is_empty() { s(&i["source"]) } else { addrs.join(" ") }
        );
    }
    let _ = writeln!(out, "\nGATEWAY          STATE       SESSION           INTERFACE        STREAMS  ADDRESS");
    for g in st["sessions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:<17} {:<16} {:<8} {}",
            s(&g["gateway"]),
            s(&g["state"]),
            s(&g["session_id"]),
            s(&g["interface"]),
            s(&g["streams"]),
            g.get("gateway_addr").map(s).or_else(|| g.get("error").map(s)).unwrap_or_default()
        );
    }
    for g in st["sessions"].as_array().into_iter().flatten() {
        let addrs = g["addresses"].as_array().cloned().unwrap_or_default();
        if addrs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} ADDRESSES (failed searches in a row: {})", s(&g["gateway"]), s(&g["failed_searches"]));
        for a in &addrs {
            let _ = writeln!(
                out,
                "  {:<24} {:<24} {:<8} {:<3} {}",
                s(&a["addr"]),
                s(&a["origin"]),
                s(&a["state"]),
                s(&a["attempts"]),
                a["error"].as_str().unwrap_or("")
            );
        }
    }
    let streams = st["streams"].as_array().cloned().unwrap_or_default();
    if !streams.is_empty() {
        let _ = writeln!(out, "\nSTREAM  GATEWAY          SERVICE          SENT B        RECEIVED B    RESENT B   LEGS  COMPRESS");
        for t in streams.iter().take(50) {
            let compress = match t["compress"].as_str() {
                Some("none") | None => "-".to_owned(),
                Some(c) => format!("{c} {:.2}:1", t["compression_ratio"].as_f64().unwrap_or(1.0)),
            };
            let _ = writeln!(
                out,
                "{:<7} {:<16} {:<16} {:<13} {:<13} {:<10} {:<5} {}",
                s(&t["id"]),
                s(&t["gateway"]),
                s(&t["service"]),
                s(&t["sent"]),
                s(&t["received"]),
                s(&t["resent"]),
                s(&t["legs"]),
                compress
            );
        }
    }
    let exposed = st["exposed"].as_array().cloned().unwrap_or_default();
    if !exposed.is_empty() {
        let _ = writeln!(out, "\nCLIENT SERVICE   GATEWAY          STATE       GATEWAY ADDRESS          TARGET                 CONNECTIONS");
        for e in &exposed {
            // A refusal shows its reason where the address would be.
            let at = if e["address"].is_null() { e["error"].clone() } else { e["address"].clone() };
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:<11} {:<24} {:<22} {}",
                s(&e["name"]),
                s(&e["gateway"]),
                s(&e["state"]),
                s(&at),
                s(&e["target"]),
                s(&e["connections"])
            );
        }
    }
    let switches = st["switches"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nSWITCHES ({})", switches.len());
    if !switches.is_empty() {
        let _ = writeln!(out, "KIND        GATEWAY          FROM → TO              PAUSE ms  STALL ms  RESENT B  STREAMS  REASON");
    }
    for w in switches.iter().rev().take(20) {
        // A roam to another gateway address shows the addresses too.
        let moved = if w["gateway_addr_from"] != w["gateway_addr_to"] {
            format!("{}@{} → {}@{}", s(&w["from"]), s(&w["gateway_addr_from"]), s(&w["to"]), s(&w["gateway_addr_to"]))
        } else {
            format!("{} → {}", s(&w["from"]), s(&w["to"]))
        };
        let _ = writeln!(
            out,
            "{:<11} {:<16} {:<22} {:<9} {:<9} {:<9} {:<8} {}",
            s(&w["kind"]),
            s(&w["gateway"]),
            moved,
            s(&w["duration_ms"]),
            s(&w["longest_stall_ms"]),
            s(&w["bytes_resent"]),
            s(&w["streams"]),
            s(&w["reason"])
        );
    }
    let events = st["events"].as_array().cloned().unwrap_or_default();
    if !events.is_empty() {
        let _ = writeln!(out, "\nRECENT EVENTS");
        for e in events.iter().rev().take(10) {
            let _ = writeln!(out, "{:<14} {:<18} {:<10} {}", s(&e["at_unix_ms"]), s(&e["kind"]), s(&e["interface"]), s(&e["reason"]));
        }
    }
    let udp_services = st["udp"]["services"].as_array().cloned().unwrap_or_default();
    if !udp_services.is_empty() {
        let _ = writeln!(out, "\nUDP SERVICE      GATEWAY          FLOWS  SENT      RECEIVED  DELAYED  DROPPED  EXPIRED  LISTEN");
        for u in &udp_services {
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:<6} {:<9} {:<9} {:<8} {:<8} {:<8} {}",
                s(&u["service"]),
                s(&u["gateway"]),
                s(&u["flows"]),
                s(&u["sent"]),
                s(&u["received"]),
                s(&u["delayed"]),
                s(&u["dropped"]),
                s(&u["flows_expired"]),
                s(&u["listen"])
            );
        }
    }
    let udp_exposed = st["udp"]["exposed"].as_array().cloned().unwrap_or_default();
    if !udp_exposed.is_empty() {
        let _ = writeln!(out, "\nUDP CLIENT SVC   GATEWAY          FLOWS  RECEIVED  SENT      DELAYED  DROPPED  EXPIRED  TARGET");
        for u in &udp_exposed {
            let _ = writeln!(
                out,
                "{:<16} {:<16} {:<6} {:<9} {:<9} {:<8} {:<8} {:<8} {}",
                s(&u["service"]),
                s(&u["gateway"]),
                s(&u["flows"]),
                s(&u["received"]),
                s(&u["sent"]),
                s(&u["delayed"]),
                s(&u["dropped"]),
                s(&u["flows_expired"]),
                s(&u["target"])
            );
        }
    }
    out
}

/// Renders the gateway's status document as text.
pub(crate) fn render_gateway(st: &Value) -> String {
    let list = |v: &Value| v.as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    let _ = writeln!(out, "listening:  {}", list(&st["listening"]));
    let _ = writeln!(out, "advertised: {}", list(&st["advertised"]));
    let _ = writeln!(
        out,
        "roams: {}   go-tos: {}   addresses lost: {}",
        s(&st["stats"]["roams"]),
        s(&st["stats"]["gotos"]),
        s(&st["stats"]["address_losses"])
    );
    if let Some(host) = st["host_addresses"].as_array() {
        let each: Vec<String> = host
            .iter()
            .map(|a| format!("{} ({}, {})", s(&a["addr"]), s(&a["interface"]), s(&a["state"])))
            .collect();
        let _ = writeln!(out, "host:       {}", each.join(" "));
    }
    let _ = writeln!(out, "\nCLIENT           SESSION           ADDRESS                  PEER                     STREAMS");
    for g in st["sessions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:<17} {:<24} {:<24} {}",
            s(&g["client"]),
            s(&g["session_id"]),
            s(&g["gateway_addr"]),
            s(&g["peer"]),
            s(&g["streams"])
        );
    }
    out
}
