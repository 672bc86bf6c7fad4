//! The client agent's admin API: JSON lines on a local (Unix) socket. One
//! request per line, one response per line. `baton status` and `baton
//! switch` use it; scripts may too.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"switch","to":"lte"}`,
//! `{"cmd":"mode","mode":"manual"}`, `{"cmd":"approve"}`, `{"cmd":"decline"}`,
//! `{"cmd":"set_interface","name":"wlan","up":false}`,
//! `{"cmd":"roam","gateway":"gw","to":"10.90.1.2:7700"}` (both optional), and `{"cmd":"events"}`,
//! which answers with one line per event for as long as the connection stays.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{Client, LinkState};

/// Where the client agent's admin socket is unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/tmp/baton-client.sock";

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// A daemon's admin API (the agent's here, the gateway's in `gateway_admin`), answered
/// line by line by [`serve_api`].
pub(crate) trait Api: Clone + Send + Sync + 'static {
    /// The reply to one request line.
    fn reply(&self, line: &str) -> impl Future<Output = Value> + Send;

    /// Answers a request that takes the connection over (a stream of lines until the peer
    /// leaves) and returns true; false for the requests that [`Api::reply`] answers.
    fn take_over(&self, _line: &str, _w: &mut OwnedWriteHalf) -> impl Future<Output = bool> + Send {
        async { false }
    }
}

impl Api for Client {
    async fn reply(&self, line: &str) -> Value {
        handle(self, line).await
    }

    async fn take_over(&self, line: &str, w: &mut OwnedWriteHalf) -> bool {
        if !matches!(serde_json::from_str::<Request>(line), Ok(Request::Events)) {
            return false;
        }
        stream_events(self, w).await;
        true
    }
}

/// A request to the admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole status.
    Status,
    /// Planned switch of every session to an interface.
    Switch {
        /// Interface name.
        to: String,
    },
    /// Set the decision mode.
    Mode {
        /// `auto`, `manual` or `user`.
        mode: String,
    },
    /// Approve the pending proposal.
    Approve,
    /// Decline the pending proposal.
    Decline,
    /// Stream events (one JSON line each) until the connection closes.
    Events,
    /// Mark an interface up or down (down cuts its connections at once).
    SetInterface {
        /// Interface name.
        name: String,
        /// Up or down.
        up: bool,
    },
    /// Planned move to another address of the gateway (seed 003's roam).
    Roam {
        /// The gateway; required when there are several and `to` is given.
        #[serde(default)]
        gateway: Option<String>,
        /// `ip:port` of the gateway to move to; none: the next address.
        #[serde(default)]
        to: Option<String>,
    },
}

/// The status document (`baton status --json`).
pub async fn status(client: &Client) -> Value {
    let sessions: Vec<Value> = client
        .gateway_names()
        .into_iter()
        .map(|g| {
            let (state, info) = match client.link_state(&g) {
                Some(LinkState::Up(i)) => ("up", Some(i)),
                Some(LinkState::Switching(i)) => ("switching", Some(i)),
                Some(LinkState::Failed(e)) => {
                    return json!({"gateway": g, "state": "failed", "error": e.to_string()})
                }
                _ => ("connecting", None),
            };
            match info {
                Some(i) => json!({
                    "gateway": g, "state": state, "session_id": format!("{:016x}", i.id),
                    "gateway_addr": i.gateway_addr.to_string(), "interface": i.path,
                    "streams": client.stream_count_for(&g),
                }),
                None => json!({"gateway": g, "state": state}),
            }
        })
        .collect();
    let mut sessions = sessions;
    for v in &mut sessions {
        // The gateway's addresses and how the last search fared (client/roam.rs).
        let book = v["gateway"]
            .as_str()
            .and_then(|g| client.gateway_addresses(g));
        if let (Some(Ok(Value::Object(extra))), Some(obj)) =
            (book.map(serde_json::to_value), v.as_object_mut())
        {
            obj.extend(extra);
        }
    }
    let current = client.current_path();
    json!({
        "ok": true,
        "current_interface": current,
        "interfaces": client.paths(),
        "sessions": sessions,
        "streams": client.streams(),
        "exposed": client.exposed(),
        "udp": client.udp_status(),
        "switches": client.switches(),
        "engine": client.engine_status().await,
        "events": client.recent_events(),
    })
}

fn answer(r: Result<String, String>) -> Value {
    match r {
        Ok(m) => json!({"ok": true, "message": m}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

async fn handle(client: &Client, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req {
        Request::Status => status(client).await,
        Request::Mode { mode } => match mode.parse::<baton_policy::Mode>() {
            Ok(m) => answer(client.set_mode(m).await),
            Err(_) => {
                json!({"ok": false, "error": format!("unknown mode {mode:?}: auto, manual or user")})
            }
        },
        Request::Approve => answer(client.approve().await),
        Request::Decline => answer(client.decline().await),
        Request::Events => {
            json!({"ok": false, "error": "events are streamed: open a connection for them"})
        }
        Request::Switch { to } => match client.switch(&to).await {
            Ok(records) => json!({"ok": true, "switches": records}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Request::SetInterface { name, up } => match client.set_path_up(&name, up) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Request::Roam { gateway, to } => roam(client, gateway, to).await,
    }
}

/// Binds an admin socket at `path`. A socket file left by a crashed `owner`
/// (agent or gateway) is replaced; a live one is an error.
pub(crate) async fn bind_socket(path: &Path, owner: &str) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "admin socket {} is in use by another {owner}",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot create admin socket {}: {e}", path.display()),
        )
    })
}

/// Serves the admin API on `path` until `shutdown`. An old socket file left
/// by a crashed agent is replaced; a live one is an error.
pub async fn serve(
    client: Client,
    path: PathBuf,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = bind_socket(&path, "agent").await?;
    info!(socket = %path.display(), "admin API listening");
    serve_api(listener, client, &path, shutdown).await
}

/// Answers admin connections on `listener` with `api` until `shutdown`, then removes the
/// socket file at `path`. Each connection is served by a task of its own: one request per
/// line, one reply line each; a line longer than [`MAX_REQUEST`] is refused, and a
/// connection ends after 64 times that much, so that no peer holds a task for ever.
pub(crate) async fn serve_api(
    listener: UnixListener,
    api: impl Api,
    path: &Path,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, typically: a pause instead of a busy loop.
                    warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let api = api.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if api.take_over(&line, &mut w).await {
                    return;
                }
                let reply = if line.len() > MAX_REQUEST {
                    json!({"ok": false, "error": "request too long"})
                } else {
                    api.reply(&line).await
                };
                let mut text = reply.to_string();
                text.push('\n');
                if w.write_all(text.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

async fn stream_events(client: &Client, w: &mut OwnedWriteHalf) {
    let mut rx = client.subscribe_events();
    loop {
        let line = match rx.recv().await {
            Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                json!({"kind": "lagged", "missed": n}).to_string()
            }
            Err(_) => return,
        };
        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Sends `{"cmd":"events"}` and calls `each` with every event line until the
/// agent closes the connection.
pub async fn follow_events(path: &Path, mut each: impl FnMut(Value)) -> std::io::Result<()> {
    let conn = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach the client agent at {}: {e}", path.display()),
        )
    })?;
    let (r, mut w) = conn.into_split();
    w.write_all(b"{\"cmd\":\"events\"}\n").await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        if let Ok(v) = serde_json::from_str(&line) {
            each(v);
        }
    }
    Ok(())
}

/// Sends one request to the admin socket at `path` and returns the reply.
pub async fn request(path: &Path, req: &Request) -> std::io::Result<Value> {
    ask(path, req, "the client agent", "baton client").await
}

/// Sends one request line to the admin socket at `path` of `daemon` (started by `command`,
/// named in the error that it cannot be reached) and returns its reply line.
pub(crate) async fn ask(
    path: &Path,
    req: &impl Serialize,
    daemon: &str,
    command: &str,
) -> std::io::Result<Value> {
    let conn = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach {daemon} at {}: {e} (is `{command}` running? --admin PATH)",
                path.display()
            ),
        )
    })?;
    let (r, mut w) = conn.into_split();
    let mut text = serde_json::to_string(req).map_err(std::io::Error::other)?;
    text.push('\n');
    w.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or_else(|| std::io::Error::other(format!("{daemon} closed the admin connection")))?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// `{"cmd":"roam"}`: a planned move to another address of the gateway.
async fn roam(client: &Client, gateway: Option<String>, to: Option<String>) -> Value {
    let to = match to
        .as_deref()
        .map(str::parse::<std::net::SocketAddr>)
        .transpose()
    {
        Ok(t) => t,
        Err(_) => {
            return json!({"ok": false, "error": format!("invalid address {:?}: expected ip:port", to.unwrap_or_default())})
        }
    };
    match client
        .roam(gateway.as_deref(), to, "requested by the user")
        .await
    {
        Ok(records) => json!({"ok": true, "switches": records}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}
