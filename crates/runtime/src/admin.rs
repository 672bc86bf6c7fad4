//! The client agent's admin API: JSON lines on a local (Unix) socket. One
//! request per line, one response per line. `baton status` and `baton
//! switch` use it; scripts may too.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"switch","to":"lte"}`,
//! `{"cmd":"set_interface","name":"wlan","up":false}`.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{Client, LinkState};

/// Where the client agent's admin socket is unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/tmp/baton-client.sock";

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

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
    /// Mark an interface up or down (down cuts its connections at once).
    SetInterface {
        /// Interface name.
        name: String,
        /// Up or down.
        up: bool,
    },
}

/// The status document (`baton status --json`).
pub fn status(client: &Client) -> Value {
    let sessions: Vec<Value> = client
        .gateway_names()
        .into_iter()
        .map(|g| {
            let (state, info) = match client.link_state(&g) {
                Some(LinkState::Up(i)) => ("up", Some(i)),
                Some(LinkState::Switching(i)) => ("switching", Some(i)),
                Some(LinkState::Failed(e)) => return json!({"gateway": g, "state": "failed", "error": e.to_string()}),
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
    let current = client.current_path();
    json!({
        "ok": true,
        "current_interface": current,
        "interfaces": client.paths(),
        "sessions": sessions,
        "streams": client.streams(),
        "switches": client.switches(),
    })
}

async fn handle(client: &Client, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req {
        Request::Status => status(client),
        Request::Switch { to } => match client.switch(&to).await {
            Ok(records) => json!({"ok": true, "switches": records}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Request::SetInterface { name, up } => match client.set_path_up(&name, up) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e}),
        },
    }
}

/// Serves the admin API on `path` until `shutdown`. An old socket file left
/// by a crashed agent is replaced; a live one is an error.
pub async fn serve(client: Client, path: PathBuf, shutdown: CancellationToken) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("admin socket {} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create admin socket {}: {e}", path.display())))?;
    info!(socket = %path.display(), "admin API listening");
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let client = client.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = if line.len() > MAX_REQUEST {
                    json!({"ok": false, "error": "request too long"})
                } else {
                    handle(&client, &line).await
                };
                let mut text = reply.to_string();
                text.push('\n');
                if w.write_all(text.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Sends one request to the admin socket at `path` and returns the reply.
pub async fn request(path: &Path, req: &Request) -> std::io::Result<Value> {
    let conn = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot reach the client agent at {}: {e} (is `baton client` running? --admin PATH)", path.display()))
    })?;
    let (r, mut w) = conn.into_split();
    let mut text = serde_json::to_string(req).map_err(std::io::Error::other)?;
    text.push('\n');
    w.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines.next_line().await?.ok_or_else(|| std::io::Error::other("the agent closed the admin connection"))?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
