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

/// Writes one line of a table: each cell but the last padded to its width in `widths` and
/// followed by a space, so that titles and rows written with the same widths line up; the
/// last cell is not padded (no trailing blanks).
fn line(out: &mut String, widths: &[usize], cells: &[impl AsRef<str>]) {
    debug_assert_eq!(
        widths.len() + 1,
        cells.len(),
        "a width for every cell but the last"
    );
    for (cell, width) in cells.iter().zip(widths) {
        let _ = write!(out, "{:<width$} ", cell.as_ref());
    }
    if let Some(last) = cells.last() {
        out.push_str(last.as_ref());
    }
    out.push('\n');
}

/// The fields `keys` of `v`, as [`s`] prints them.
fn cells(v: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| s(&v[*k])).collect()
}

/// A table whose cells are plain fields of its rows: after a blank line, the `titles`, then
/// the fields `keys` of each row (nothing when there are no rows).
fn table(out: &mut String, widths: &[usize], titles: &[&str], keys: &[&str], rows: &[Value]) {
    if rows.is_empty() {
        return;
    }
    out.push('\n');
    line(out, widths, titles);
    for r in rows {
        line(out, widths, &cells(r, keys));
    }
}

/// Renders the status document as text.
pub(crate) fn render(st: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "current interface: {}", s(&st["current_interface"]));
    let _ = writeln!(
        out,
        "mode: {}   proposal: {}",
        s(&st["engine"]["mode"]),
        s(&st["engine"]["proposal"])
    );
    let eng = st["engine"]["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !eng.is_empty() {
        const W: &[usize] = &[16, 9, 9, 8, 7, 10, 8, 5];
        out.push('\n');
        line(
            &mut out,
            W,
            &[
                "INTERFACE",
                "KIND",
                "HEALTH",
                "RTT ms",
                "LOSS %",
                "JITTER ms",
                "SCORE",
                "COST",
                "METERED",
            ],
        );
        for i in &eng {
            let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
            let row = [
                s(&i["name"]),
                s(&i["kind"]),
                s(&i["health"]),
                ms(&i["stats"]["rtt_ms"]),
                i["stats"]["loss"]
                    .as_f64()
                    .map_or("-".to_owned(), |l| format!("{:.1}", l * 100.0)),
                ms(&i["stats"]["jitter_ms"]),
                i["score"]
                    .as_f64()
                    .map_or("-".to_owned(), |x| format!("{x:.0}")),
                s(&i["attributes"]["cost"]),
                s(&i["attributes"]["metered"]),
            ];
            line(&mut out, W, &row);
        }
    }
    const IFACES: &[usize] = &[16, 5, 9, 11, 16];
    out.push('\n');
    line(
        &mut out,
        IFACES,
        &[
            "INTERFACE",
            "UP",
            "KIND",
            "METRIC",
            "DEVICE",
            "SOURCE / ADDRESSES",
        ],
    );
    for i in st["interfaces"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = i["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let up = if i["up"] == true { "yes" } else { "no" };
        let shown = if addrs.is_empty() {
            s(&i["source"])
        } else {
            addrs.join(" ")
        };
        line(
            &mut out,
            IFACES,
            &[
                s(&i["name"]),
                up.into(),
                s(&i["kind"]),
                s(&i["priority"]),
                s(&i["device"]),
                shown,
            ],
        );
    }
    const SESSIONS: &[usize] = &[16, 11, 17, 16, 8];
    out.push('\n');
    line(
        &mut out,
        SESSIONS,
        &[
            "GATEWAY",
            "STATE",
            "SESSION",
            "INTERFACE",
            "STREAMS",
            "ADDRESS",
        ],
    );
    for g in st["sessions"].as_array().into_iter().flatten() {
        let mut row = cells(
            g,
            &["gateway", "state", "session_id", "interface", "streams"],
        );
        row.push(
            g.get("gateway_addr")
                .map(s)
                .or_else(|| g.get("error").map(s))
                .unwrap_or_default(),
        );
        line(&mut out, SESSIONS, &row);
    }
    for g in st["sessions"].as_array().into_iter().flatten() {
        let addrs = g["addresses"].as_array().cloned().unwrap_or_default();
        if addrs.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} ADDRESSES (failed searches in a row: {})",
            s(&g["gateway"]),
            s(&g["failed_searches"])
        );
        for a in &addrs {
            let mut row = cells(a, &["addr", "origin", "state", "attempts"]);
            row.push(a["error"].as_str().unwrap_or("").to_owned());
            out.push_str("  ");
            line(&mut out, &[24, 24, 8, 3], &row);
        }
    }
    let streams = st["streams"].as_array().cloned().unwrap_or_default();
    if !streams.is_empty() {
        const W: &[usize] = &[7, 16, 16, 13, 13, 10, 5];
        out.push('\n');
        line(
            &mut out,
            W,
            &[
                "STREAM",
                "GATEWAY",
                "SERVICE",
                "SENT B",
                "RECEIVED B",
                "RESENT B",
                "LEGS",
                "COMPRESS",
            ],
        );
        for t in streams.iter().take(50) {
            let mut row = cells(
                t,
                &[
                    "id", "gateway", "service", "sent", "received", "resent", "legs",
                ],
            );
            row.push(match t["compress"].as_str() {
                Some("none") | None => "-".to_owned(),
                Some(c) => format!(
                    "{c} {:.2}:1",
                    t["compression_ratio"].as_f64().unwrap_or(1.0)
                ),
            });
            line(&mut out, W, &row);
        }
    }
    let exposed = st["exposed"].as_array().cloned().unwrap_or_default();
    if !exposed.is_empty() {
        const W: &[usize] = &[16, 16, 11, 24, 22];
        out.push('\n');
        line(
            &mut out,
            W,
            &[
                "CLIENT SERVICE",
                "GATEWAY",
                "STATE",
                "GATEWAY ADDRESS",
                "TARGET",
                "CONNECTIONS",
            ],
        );
        for e in &exposed {
            // A refusal shows its reason where the address would be.
            let at = if e["address"].is_null() {
                "error"
            } else {
                "address"
            };
            line(
                &mut out,
                W,
                &cells(
                    e,
                    &["name", "gateway", "state", at, "target", "connections"],
                ),
            );
        }
    }
    let switches = st["switches"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nSWITCHES ({})", switches.len());
    const SWITCHES: &[usize] = &[11, 16, 22, 9, 9, 9, 8];
    if !switches.is_empty() {
        line(
            &mut out,
            SWITCHES,
            &[
                "KIND",
                "GATEWAY",
                "FROM → TO",
                "PAUSE ms",
                "STALL ms",
                "RESENT B",
                "STREAMS",
                "REASON",
            ],
        );
    }
    for w in switches.iter().rev().take(20) {
        // A roam to another gateway address shows the addresses too.
        let moved = if w["gateway_addr_from"] != w["gateway_addr_to"] {
            format!(
                "{}@{} → {}@{}",
                s(&w["from"]),
                s(&w["gateway_addr_from"]),
                s(&w["to"]),
                s(&w["gateway_addr_to"])
            )
        } else {
            format!("{} → {}", s(&w["from"]), s(&w["to"]))
        };
        let mut row = cells(w, &["kind", "gateway"]);
        row.push(moved);
        row.extend(cells(
            w,
            &[
                "duration_ms",
                "longest_stall_ms",
                "bytes_resent",
                "streams",
                "reason",
            ],
        ));
        line(&mut out, SWITCHES, &row);
    }
    let events = st["events"].as_array().cloned().unwrap_or_default();
    if !events.is_empty() {
        let _ = writeln!(out, "\nRECENT EVENTS");
        for e in events.iter().rev().take(10) {
            line(
                &mut out,
                &[14, 18, 10],
                &cells(e, &["at_unix_ms", "kind", "interface", "reason"]),
            );
        }
    }
    // Services count what they send before what they receive, client services (the other
    // way round) what they receive first: each table reads in the direction of its datagrams.
    const UDP: &[usize] = &[16, 16, 6, 9, 9, 8, 8, 8];
    table(
        &mut out,
        UDP,
        &[
            "UDP SERVICE",
            "GATEWAY",
            "FLOWS",
            "SENT",
            "RECEIVED",
            "DELAYED",
            "DROPPED",
            "EXPIRED",
            "LISTEN",
        ],
        &[
            "service",
            "gateway",
            "flows",
            "sent",
            "received",
            "delayed",
            "dropped",
            "flows_expired",
            "listen",
        ],
        st["udp"]["services"].as_array().map_or(&[], Vec::as_slice),
    );
    table(
        &mut out,
        UDP,
        &[
            "UDP CLIENT SVC",
            "GATEWAY",
            "FLOWS",
            "RECEIVED",
            "SENT",
            "DELAYED",
            "DROPPED",
            "EXPIRED",
            "TARGET",
        ],
        &[
            "service",
            "gateway",
            "flows",
            "received",
            "sent",
            "delayed",
            "dropped",
            "flows_expired",
            "target",
        ],
        st["udp"]["exposed"].as_array().map_or(&[], Vec::as_slice),
    );
    out
}

/// Renders the gateway's status document as text.
pub(crate) fn render_gateway(st: &Value) -> String {
    let list = |v: &Value| {
        v.as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect::<Vec<_>>()
            .join(" ")
    };
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
    if let Some(n) = st["threads"].as_u64() {
        let each = if st["workers"].is_u64() {
            " (each worker)"
        } else {
            ""
        };
        let _ = writeln!(out, "session threads: {n}{each}");
    }
    if let Some(n) = st["workers"].as_u64() {
        let _ = writeln!(
            out,
            "workers: {n}   connections passed on: {}   datagrams passed on: {}",
            s(&st["stats"]["handed_off"]),
            s(&st["stats"]["datagrams_passed"])
        );
    }
    if let Some(host) = st["host_addresses"].as_array() {
        let each: Vec<String> = host
            .iter()
            .map(|a| {
                format!(
                    "{} ({}, {})",
                    s(&a["addr"]),
                    s(&a["interface"]),
                    s(&a["state"])
                )
            })
            .collect();
        let _ = writeln!(out, "host:       {}", each.join(" "));
    }
    const W: &[usize] = &[16, 17, 24, 24, 8];
    out.push('\n');
    line(
        &mut out,
        W,
        &["CLIENT", "SESSION", "ADDRESS", "PEER", "STREAMS", "THREAD"],
    );
    for g in st["sessions"].as_array().into_iter().flatten() {
        line(
            &mut out,
            W,
            &cells(
                g,
                &[
                    "client",
                    "session_id",
                    "gateway_addr",
                    "peer",
                    "streams",
                    "thread",
                ],
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// Titles and cells share their widths: each table's columns line up, and a line ends
    /// without blanks.
    #[test]
    fn columns_line_up() {
        let st = json!({
            "current_interface": "wlan",
            "sessions": [{"gateway": "gw", "state": "down", "streams": 0, "error": "no route"}],
            "switches": [{"kind": "roam", "gateway": "gw", "from": "lte", "to": "lte", "gateway_addr_from": "a",
                "gateway_addr_to": "b", "duration_ms": 300, "longest_stall_ms": 200, "bytes_resent": 0, "streams": 1,
                "reason": "address lost"}],
            "udp": {
                "services": [{"service": "dns", "gateway": "gw", "flows": 2, "sent": 10, "received": 20, "delayed": 1,
                    "dropped": 0, "flows_expired": 3, "listen": "127.0.0.1:53"}],
                "exposed": [{"service": "game", "gateway": "gw", "flows": 1, "sent": 5, "received": 6, "delayed": 0,
                    "dropped": 2, "flows_expired": 0, "target": "127.0.0.1:9000"}],
            },
        });
        let text = super::render(&st);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "GATEWAY          STATE       SESSION           INTERFACE        STREAMS  ADDRESS",
            "gw               down        -                 -                0        no route",
            "KIND        GATEWAY          FROM → TO              PAUSE ms  STALL ms  RESENT B  STREAMS  REASON",
            "roam        gw               lte@a → lte@b          300       200       0         1        address lost",
            "UDP SERVICE      GATEWAY          FLOWS  SENT      RECEIVED  DELAYED  DROPPED  EXPIRED  LISTEN",
            "dns              gw               2      10        20        1        0        3        127.0.0.1:53",
            "UDP CLIENT SVC   GATEWAY          FLOWS  RECEIVED  SENT      DELAYED  DROPPED  EXPIRED  TARGET",
            "game             gw               1      6         5         0        2        0        127.0.0.1:9000",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
        }
    }
}
