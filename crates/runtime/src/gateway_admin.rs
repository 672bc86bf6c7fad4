//! The gateway's admin API: JSON lines on a local (Unix) socket, like the
//! client agent's. `baton gateway-status`, `baton goto` and `baton listen`
//! use it.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"goto","client":"m","to":"10.90.1.2:7700"}`
//! (`to` optional: the client agent chooses), `{"cmd":"listen_add","addr":"10.90.1.2:7700"}`,
//! `{"cmd":"listen_remove","addr":"10.89.1.2:7700"}`; `goto` and
//! `listen_remove` take an optional `"wait_ms"` (default 10000), how long to
//! wait for the sessions to move. Responses: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::gateway::Gateway;

/// Where the gateway's admin socket is unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/tmp/baton-gateway.sock";

/// How long a go-to waits for the sessions to move unless told.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// A request to the gateway's admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Addresses served and advertised, sessions, counters.
    Status,
    /// Direct a client agent's sessions to another address of the gateway.
    Goto {
        /// The client agent's id.
        client: String,
        /// `ip:port` to go to; none: the client agent chooses.
        #[serde(default)]
        to: Option<String>,
        /// How long to wait for the sessions to move, in ms.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Serve (and advertise) one more address.
    ListenAdd {
        /// `ip:port`.
        addr: String,
    },
    /// Give up an address, directing its sessions elsewhere first.
    ListenRemove {
        /// `ip:port`, as listed by `status`.
        addr: String,
        /// How long to wait for the sessions to move, in ms.
        #[serde(default)]
        wait_ms: Option<u64>,
    },
}

/// The status document (`baton gateway-status --json`).
pub fn status(gw: &Gateway) -> Value {
    let st = gw.stats();
    json!({
        "ok": true,
        "listening": gw.listening().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "advertised": gw.advertised().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "sessions": gw.sessions(),
        "threads": gw.session_threads(),
        "host_addresses": gw.host_addresses(),
        "stats": {
            "sessions_accepted": st.sessions_accepted.load(Ordering::Relaxed),
            "sessions_resumed": st.sessions_resumed.load(Ordering::Relaxed),
            "roams": st.roams.load(Ordering::Relaxed),
            "gotos": st.gotos.load(Ordering::Relaxed),
            "address_losses": st.address_losses.load(Ordering::Relaxed),
            "handed_off": st.handed_off.load(Ordering::Relaxed),
            "taken_over": st.taken_over.load(Ordering::Relaxed),
            "datagrams_passed": st.datagrams_passed.load(Ordering::Relaxed),
        },
    })
}

fn addr(s: &str) -> Result<SocketAddr, Value> {
    s.parse().map_err(
        |_| json!({"ok": false, "error": format!("invalid address {s:?}: expected ip:port")}),
    )
}

async fn handle(gw: &Gateway, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let wait = |ms: Option<u64>| ms.map_or(DEFAULT_WAIT, Duration::from_millis);
    match req {
        Request::Status => status(gw),
        Request::Goto {
            client,
            to,
            wait_ms,
        } => {
            let to = match to.as_deref().map(addr).transpose() {
                Ok(t) => t,
                Err(e) => return e,
            };
            match gw.goto(&client, to, wait(wait_ms)).await {
                Ok(moves) => json!({"ok": true, "moves": moves}),
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Request::ListenAdd { addr: a } => match addr(&a) {
            Ok(a) => match gw.listen_add(a).await {
                Ok(bound) => {
                    json!({"ok": true, "addr": bound.to_string(), "advertised": gw.advertised()})
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => e,
        },
        Request::ListenRemove { addr: a, wait_ms } => match addr(&a) {
            Ok(a) => match gw.listen_remove(a, wait(wait_ms)).await {
                Ok(moves) => json!({"ok": true, "moves": moves, "advertised": gw.advertised()}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => e,
        },
    }
}

/// Serves the admin API on `path` until `shutdown`. A socket file left by a
/// crashed gateway is replaced; a live one is an error.
pub async fn serve(gw: Gateway, path: PathBuf, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = crate::admin::bind_socket(&path, "gateway").await?;
    info!(socket = %path.display(), "gateway admin API listening");
    crate::admin::serve_api(listener, gw, &path, shutdown).await
}

impl crate::admin::Api for Gateway {
    async fn reply(&self, line: &str) -> Value {
        handle(self, line).await
    }
}

/// Sends one request to the gateway's admin socket at `path`.
pub async fn request(path: &Path, req: &Request) -> std::io::Result<Value> {
    crate::admin::ask(path, req, "the gateway", "baton gateway").await
}

/// The admin socket of worker `index` of a gateway whose admin socket is
/// `base`: `BASE.wINDEX`.
pub fn worker_socket(base: &Path, index: usize) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".w{index}"));
    PathBuf::from(s)
}

/// The worker processes of a gateway as its supervisor knows them.
#[derive(Debug, Default)]
pub struct WorkerProcesses {
    /// Their process ids, by index.
    pids: std::sync::Mutex<Vec<u32>>,
    /// Workers started again after dying.
    restarts: std::sync::atomic::AtomicU64,
}

impl WorkerProcesses {
    /// The workers as started.
    pub fn set_pids(&self, pids: Vec<u32>) {
        *crate::util::lock(&self.pids) = pids;
    }

    /// Worker `index` died and was started again as `pid`.
    pub fn restarted(&self, index: usize, pid: u32) {
        if let Some(p) = crate::util::lock(&self.pids).get_mut(index) {
            *p = pid;
        }
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> usize {
        crate::util::lock(&self.pids).len()
    }
}

/// The admin API of a gateway made of workers (`workers = N`), served by
/// its supervisor: each request goes to the workers' own sockets and their
/// answers are merged, so that the commands work as with one process.
#[derive(Debug, Clone)]
struct Workers {
    sockets: std::sync::Arc<Vec<PathBuf>>,
    processes: std::sync::Arc<WorkerProcesses>,
}

/// Serves the supervisor's admin API on `path` for its workers until
/// `shutdown`.
pub async fn serve_workers(
    path: PathBuf,
    processes: std::sync::Arc<WorkerProcesses>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = crate::admin::bind_socket(&path, "gateway").await?;
    let count = processes.count();
    info!(socket = %path.display(), workers = count, "gateway admin API listening");
    let api = Workers {
        sockets: std::sync::Arc::new((0..count).map(|i| worker_socket(&path, i)).collect()),
        processes,
    };
    crate::admin::serve_api(listener, api, &path, shutdown).await
}

impl crate::admin::Api for Workers {
    async fn reply(&self, line: &str) -> Value {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        if let Request::Goto { client, .. } = &req {
            // Only the client's worker holds its sessions.
            let owner = crate::gateway::owner_of_client(client, self.sockets.len());
            return match request(&self.sockets[owner], &req).await {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": format!("worker {owner}: {e}")}),
            };
        }
        let answers =
            futures_util::future::join_all(self.sockets.iter().map(|p| request(p, &req))).await;
        let mut v = merge(&req, answers);
        if matches!(req, Request::Status) && v["ok"] == json!(true) {
            v["worker_pids"] = json!(*crate::util::lock(&self.processes.pids));
            v["worker_restarts"] = json!(self.processes.restarts.load(Ordering::Relaxed));
        }
        v
    }
}

/// One answer from the workers' answers to the same request. A worker that
/// cannot be reached or refuses makes it an error: a partial status or a
/// change made by some workers only would mislead.
fn merge(req: &Request, answers: Vec<std::io::Result<Value>>) -> Value {
    let mut oks = Vec::with_capacity(answers.len());
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Ok(v) if v["ok"] == json!(true) => oks.push(v),
            Ok(v) => {
                let e = v["error"].as_str().unwrap_or("failed");
                return json!({"ok": false, "error": format!("worker {i}: {e}")});
            }
            Err(e) => return json!({"ok": false, "error": format!("worker {i}: {e}")}),
        }
    }
    let Some(mut out) = oks.first().cloned() else {
        return json!({"ok": false, "error": "no worker"});
    };
    let concat = |key: &str| -> Value {
        Value::Array(
            oks.iter()
                .flat_map(|v| v[key].as_array().cloned().unwrap_or_default())
                .collect(),
        )
    };
    match req {
        Request::Status => {
            out["sessions"] = concat("sessions");
            if let Some(stats) = out["stats"].as_object_mut() {
                for (k, total) in stats.iter_mut() {
                    *total = json!(oks
                        .iter()
                        .filter_map(|v| v["stats"][k].as_u64())
                        .sum::<u64>());
                }
            }
            out["workers"] = json!(oks.len());
        }
        Request::ListenRemove { .. } | Request::Goto { .. } => out["moves"] = concat("moves"),
        Request::ListenAdd { .. } => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(sessions: &[&str], accepted: u64) -> std::io::Result<Value> {
        Ok(json!({
            "ok": true,
            "listening": ["127.0.0.1:7700"],
            "sessions": sessions.iter().map(|c| json!({"client": c})).collect::<Vec<_>>(),
            "stats": {"sessions_accepted": accepted, "handed_off": 1},
        }))
    }

    #[test]
    fn the_workers_statuses_merge_into_one() {
        let v = merge(
            &Request::Status,
            vec![status(&["a"], 2), status(&[], 0), status(&["b", "c"], 5)],
        );
        assert_eq!(v["ok"], true);
        assert_eq!(v["workers"], 3);
        assert_eq!(v["listening"], json!(["127.0.0.1:7700"]));
        let clients: Vec<_> = v["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["client"].clone())
            .collect();
        assert_eq!(clients, vec![json!("a"), json!("b"), json!("c")]);
        assert_eq!(v["stats"]["sessions_accepted"], 7);
        assert_eq!(v["stats"]["handed_off"], 3);
    }

    #[test]
    fn one_worker_failing_fails_the_answer() {
        let refused = Ok(json!({"ok": false, "error": "cannot listen on 10.0.0.1:7700: in use"}));
        let v = merge(
            &Request::ListenAdd {
                addr: "10.0.0.1:7700".into(),
            },
            vec![status(&[], 0), refused],
        );
        assert_eq!(v["ok"], false);
        assert_eq!(
            v["error"],
            "worker 1: cannot listen on 10.0.0.1:7700: in use"
        );
        let gone = Err(std::io::Error::other("cannot reach the gateway"));
        let v = merge(&Request::Status, vec![gone, status(&[], 0)]);
        assert_eq!(v["error"], "worker 0: cannot reach the gateway");
    }

    #[test]
    fn worker_sockets_sit_beside_the_gateways() {
        assert_eq!(
            worker_socket(Path::new("/run/baton/gw.sock"), 11),
            PathBuf::from("/run/baton/gw.sock.w11")
        );
    }
}
