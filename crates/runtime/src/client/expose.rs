//! Client services at the client agent (server → client: push,
//! publish/subscribe).
//!
//! On every control connection the agent declares the services of
//! `[exposed]` that go through this gateway ([`Message::Expose`]); the
//! gateway answers where it listens for each, on the address it assigned to
//! this agent, or why not ([`Message::Exposed`]). When a server connects
//! there, the gateway announces the stream ([`Message::Incoming`]); the agent
//! connects to the service's target and dials the stream's leg like any
//! other (the agent always dials, so this works behind NAT), and from there
//! the stream is relayed, and moved on switches, like the streams local
//! applications open. A target that cannot be reached resets the stream,
//! and the gateway closes the server's connection.
//!
//! A UDP client service (`protocol = "udp"`) is declared the same way; its
//! flows are the UDP side's business (see [`crate::udp`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

use baton_proto::{Message, RefuseReason, ResetCode, StreamId};
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{relay, ClientStream, Core, Link, Shared};
use crate::config::Protocol;
use crate::stream::{StreamEnd, StreamShared, ToSession};
use crate::util::lock;

/// A client service as `baton status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ExposedStatus {
    /// The service's name (as the gateway knows it).
    pub name: String,
    /// The gateway that listens for it.
    pub gateway: String,
    /// Where the service really runs, on this side.
    pub target: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// `pending` (not yet answered by the gateway), `listening`, or `refused`.
    pub state: ExposedState,
    /// Where the gateway listens for it: the address it assigned to this
    /// agent and the service's port.
    pub address: Option<SocketAddr>,
    /// Why the gateway refused it.
    pub error: Option<String>,
    /// Connections the gateway's side made to it so far (TCP; a UDP client
    /// service's flows are counted in the UDP status).
    pub connections: u64,
}

/// Whether the gateway listens for a client service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExposedState {
    /// Declared; no answer from the gateway yet (or the session is new).
    Pending,
    /// The gateway listens at `address`.
    Listening,
    /// The gateway refused it (see `error`).
    Refused,
}

/// The client services of one gateway's session, as known from the
/// configuration and the gateway's answers.
pub(super) fn initial(config: &crate::config::ClientConfig, gateway: &str) -> Vec<ExposedStatus> {
    config
        .exposed
        .iter()
        .filter(|(_, e)| e.gateway == gateway)
        .map(|(name, e)| ExposedStatus {
            name: name.clone(),
            gateway: gateway.to_owned(),
            target: e.target.to_string(),
            protocol: e.protocol,
            state: ExposedState::Pending,
            address: None,
            error: None,
            connections: 0,
        })
        .collect()
}

/// The declaration sent on each control connection, if there is anything
/// to declare.
pub(super) fn declaration(link: &Link) -> Option<Message> {
    let services: Vec<String> = lock(&link.exposed).iter().map(|e| e.name.clone()).collect();
    (!services.is_empty()).then_some(Message::Expose { services })
}

/// The session is gone: what the gateway said about it no longer holds.
pub(super) fn forget(link: &Link) {
    for e in lock(&link.exposed).iter_mut() {
        e.state = ExposedState::Pending;
        e.address = None;
        e.error = None;
    }
}

/// Handles the gateway's answer to the declaration.
pub(super) fn on_exposed(link: &Link, entries: Vec<(String, Result<SocketAddr, RefuseReason>)>) {
    let mut exposed = lock(&link.exposed);
    for (name, result) in entries {
        let Some(e) = exposed.iter_mut().find(|e| e.name == name) else {
            debug!(gateway = %link.gateway, service = %name, "gateway answered for a client service not declared");
            continue;
        };
        match result {
            Ok(addr) => {
                if e.address != Some(addr) {
                    info!(gateway = %link.gateway, service = %name, address = %addr, "client service listening at the gateway");
                }
                (e.state, e.address, e.error) = (ExposedState::Listening, Some(addr), None);
            }
            Err(reason) => {
                if e.state != ExposedState::Refused {
                    warn!(gateway = %link.gateway, service = %name, "client service refused by the gateway: {reason}");
                }
                (e.state, e.address, e.error) =
                    (ExposedState::Refused, None, Some(reason.to_string()));
            }
        }
    }
}

/// A server connected to a client service at the gateway: connect to the
/// target, then relay.
pub(super) fn on_incoming(
    shared: &Arc<Shared>,
    link: &Link,
    core: &Arc<Core>,
    stream: StreamId,
    service: String,
) {
    if !stream.is_gateway_opened() {
        // Ids below the gateway's bit are this agent's: never take one from the gateway.
        warn!(gateway = %link.gateway, %stream, "gateway announced a stream with a client-side id; ignored");
        return;
    }
    if lock(&core.streams).contains_key(&stream) || lock(&core.finished).find(stream).is_some() {
        // Announced again after a reconnect: already being served, or done.
        return;
    }
    let exposed = shared
        .config
        .exposed
        .get(&service)
        .filter(|e| e.gateway == link.gateway);
    let target = exposed
        .filter(|e| e.protocol == Protocol::Tcp)
        .map(|e| e.target.clone());
    let Some(target) = target else {
        if exposed.is_some() {
            warn!(gateway = %link.gateway, service = %service, "connection for a udp client service: refused (exposed.{service}.protocol differs at the gateway)");
        } else {
            warn!(gateway = %link.gateway, service = %service, "connection for a client service this agent does not expose: refused");
        }
        let _ = core
            .to_session
            .send(ToSession::Control(Message::StreamReset {
                stream,
                code: ResetCode::Refused,
            }));
        return;
    };
    if let Some(e) = lock(&link.exposed).iter_mut().find(|e| e.name == service) {
        e.connections += 1;
    }
    // Registered before the target answers, so that what the gateway says
    // about the stream meanwhile (its server's half-close, acks) waits in
    // the stream's queues instead of being lost.
    let (st, inbox) = StreamShared::new(stream, shared.limits, core.released.child_token());
    let cs = Arc::new(ClientStream {
        shared: st.clone(),
        service: service.clone(),
        releg_busy: AtomicBool::new(false),
        generation: AtomicU32::new(0),
        leg_opened: Mutex::new(None),
    });
    lock(&core.streams).insert(stream, cs.clone());
    let (shared2, core2) = (shared.clone(), core.clone());
    let link_thread = link.thread;
    // Connected and relayed on the session's thread, with its other streams.
    shared.tasks.spawn_on(async move {
        let timeout = shared2.config.connect_timeout;
        let connect = tokio::time::timeout(timeout, TcpStream::connect((target.host.as_str(), target.port)));
        let conn = tokio::select! {
            r = connect => match r {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            },
            _ = st.abort.cancelled() => Err("reset by the gateway".to_owned()),
        };
        let conn = match conn {
            Ok(c) => c,
            Err(why) => {
                warn!(service = %service, %stream, "client service connection refused: cannot reach {target}: {why}");
                lock(&core2.streams).remove(&stream);
                let reset = Message::StreamReset { stream, code: ResetCode::Refused };
                let _ = core2.to_session.send(ToSession::Control(reset));
                return;
            }
        };
        debug_assert_eq!(
            crate::shards::current_index(super::SESSION_THREAD),
            Some(link_thread)
        );
        let _ = baton_os::tune_relay(&conn);
        debug!(service = %service, %stream, "client service stream open");
        match relay(&shared2, &core2, &cs, inbox, conn).await {
            StreamEnd::Finished => debug!(service = %service, %stream, "client service stream finished"),
            other => info!(service = %service, %stream, "client service stream closed: {other}"),
        }
    }, shared.thread_of(link));
}
