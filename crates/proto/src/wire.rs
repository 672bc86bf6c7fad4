//! The wire format: connection preface, control frames and leg preambles.
//!
//! Every connection from a client agent to a gateway starts with an 8-byte
//! [`Preface`] naming the protocol version and what the connection is for.
//! After it, a control connection carries [`Frame`]s: a 3-byte header
//! (type, big-endian length), the payload, and once the session is keyed a
//! 32-byte authentication tag (HMAC-SHA256). A leg carries one `LegOpen` frame from the
//! client agent, one `LegReply` frame from the gateway, and then in each
//! direction the stream offset of the leg's first byte ([`LEG_START_LEN`]
//! bytes, big-endian) followed by the application's bytes, unchanged.
//!
//! Decoding never panics and every length is checked against a bound before
//! anything is allocated: the inputs come from the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};

use crate::datagram::FlowId;
use crate::stream::{Offset, StreamId};

/// Protocol version spoken by this build.
pub const VERSION: u8 = 1;

/// Length of the start offset that opens each direction of a leg.
pub const LEG_START_LEN: usize = 8;
/// Length of the connection preface.
pub const PREFACE_LEN: usize = 8;
/// Length of a frame header: type (1) and payload length (2).
pub const FRAME_HEADER_LEN: usize = 3;
/// Largest payload a frame may carry. Checked before allocating.
pub const MAX_PAYLOAD: usize = 4096;
/// Length of the authentication tag that follows a keyed frame.
pub const TAG_LEN: usize = 32;
/// Longest client or service name.
pub const MAX_NAME: usize = 64;
/// Most acknowledgements in one Acks frame (fits [`MAX_PAYLOAD`]).
pub const MAX_ACKS: usize = 250;
/// Longest human-readable reason carried in a refusal.
pub const MAX_REASON: usize = 512;
/// Most gateway addresses in one [`Message::Addresses`] (fits [`MAX_PAYLOAD`]).
pub const MAX_ADDRESSES: usize = 64;
/// Most client services one client agent may expose through one gateway
/// (bounds [`Message::Expose`] and [`Message::Exposed`] to one frame).
pub const MAX_EXPOSED: usize = 32;

const MAGIC: &[u8; 5] = b"BATON";

/// What a connection is for, announced in its preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// The session's control connection.
    Control,
    /// A leg carrying one relayed stream.
    Leg,
}

/// The first bytes of every connection: magic, version, kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    /// Protocol version of the sender.
    pub version: u8,
    /// What the connection carries.
    pub kind: ConnKind,
}

impl Preface {
    /// The preface this build sends for a connection of `kind`.
    pub fn new(kind: ConnKind) -> Self {
        Self {
            version: VERSION,
            kind,
        }
    }

    /// Encodes the preface.
    pub fn encode(&self) -> [u8; PREFACE_LEN] {
        let mut out = [0u8; PREFACE_LEN];
        out[..5].copy_from_slice(MAGIC);
        out[5] = self.version;
        out[6] = match self.kind {
            ConnKind::Control => b'C',
            ConnKind::Leg => b'L',
        };
        out
    }

    /// Parses a preface. The version is returned as sent, so that the caller
    /// can answer a mismatch with a refusal rather than a silent close.
    pub fn decode(bytes: &[u8; PREFACE_LEN]) -> Result<Self, WireError> {
        if &bytes[..5] != MAGIC || bytes[7] != 0 {
            return Err(WireError::BadPreface);
        }
        let kind = match bytes[6] {
            b'C' => ConnKind::Control,
            b'L' => ConnKind::Leg,
            _ => return Err(WireError::BadPreface),
        };
        Ok(Self {
            version: bytes[5],
            kind,
        })
    }
}

/// Errors found while decoding bytes from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The connection did not start with baton's preface: not a baton peer,
    /// or a scanner.
    #[error("not a baton connection (bad preface)")]
    BadPreface,
    /// A frame announced a payload longer than [`MAX_PAYLOAD`].
    #[error("frame too long: {0} bytes")]
    TooLong(usize),
    /// The payload ended before the message did.
    #[error("truncated message")]
    Truncated,
    /// Bytes left over after the message: a peer bug or tampering.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// A frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A field held a value outside its range.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// The authentication tag did not verify: forged, replayed or corrupted.
    #[error("authentication failed")]
    BadTag,
}

/// How a stream's bytes travel on its legs. Offsets always count the
/// application's bytes, so a compressed stream resumes at exact offsets:
/// each direction of each leg is a compressed stream of its own that starts
/// at the leg's start offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Compression {
    /// The application's bytes, unchanged.
    #[default]
    None = 0,
    /// Zstandard, flushed at each write so nothing waits for more input.
    Zstd = 1,
}

/// Why a gateway refused a session, a stream or a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The client id is not configured on the gateway.
    UnknownClient,
    /// The client could not prove it holds the key configured for its id.
    BadProof,
    /// The gateway holds its configured maximum of sessions.
    CapacityFull,
    /// The client speaks a protocol version the gateway does not.
    Version,
    /// The service is not among those listed for this client.
    ServiceNotAllowed,
    /// The leg named a session the gateway does not hold (expired or never existed).
    UnknownSession,
    /// The leg named a stream or generation that is not acceptable (replay, take-over).
    BadStream,
    /// The gateway could not connect to the service's target.
    TargetUnreachable,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The gateway cannot listen for a client service (its address is not
    /// on the host, or the port is taken by another program).
    ListenFailed,
    /// A reason this build does not know (sent by a newer peer).
    Other(u8),
}

impl RefuseReason {
    fn code(self) -> u8 {
        match self {
            Self::UnknownClient => 1,
            Self::BadProof => 2,
            Self::CapacityFull => 3,
            Self::Version => 4,
            Self::ServiceNotAllowed => 5,
            Self::UnknownSession => 6,
            Self::BadStream => 7,
            Self::TargetUnreachable => 8,
            Self::ShuttingDown => 9,
            Self::ListenFailed => 10,
            Self::Other(c) => c,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => Self::UnknownClient,
            2 => Self::BadProof,
            3 => Self::CapacityFull,
            4 => Self::Version,
            5 => Self::ServiceNotAllowed,
            6 => Self::UnknownSession,
            7 => Self::BadStream,
            8 => Self::TargetUnreachable,
            9 => Self::ShuttingDown,
            10 => Self::ListenFailed,
            c => Self::Other(c),
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::UnknownClient => "unknown client",
            Self::BadProof => "bad proof of key",
            Self::CapacityFull => "capacity full",
            Self::Version => "unsupported protocol version",
            Self::ServiceNotAllowed => "service not allowed for this client",
            Self::UnknownSession => "unknown session",
            Self::BadStream => "stream or generation not acceptable",
            Self::TargetUnreachable => "target unreachable",
            Self::ShuttingDown => "gateway shutting down",
            Self::ListenFailed => "gateway cannot listen for the service",
            Self::Other(c) => return write!(f, "reason {c}"),
        };
        f.write_str(s)
    }
}

/// Why a stream was reset, carried on the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetCode {
    /// The application (or the server) reset its connection.
    Peer,
    /// The session ended before the stream did.
    SessionEnded,
    /// Bytes needed to resume the stream are gone.
    Unrecoverable,
    /// The receiving end could not open the stream: a client agent that
    /// cannot reach the target of a client service it exposes.
    Refused,
    /// A code this build does not know.
    Other(u8),
}

impl ResetCode {
    fn code(self) -> u8 {
        match self {
            Self::Peer => 1,
            Self::SessionEnded => 2,
            Self::Unrecoverable => 3,
            Self::Refused => 4,
            Self::Other(c) => c,
        }
    }
    fn from_code(c: u8) -> Self {
        match c {
            1 => Self::Peer,
            2 => Self::SessionEnded,
            3 => Self::Unrecoverable,
            4 => Self::Refused,
            c => Self::Other(c),
        }
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Client → gateway, first on a control connection: who I am, my
    /// ephemeral X25519 key, and the session to resume (0 for a new one).
    /// The resume request takes effect only once the Auth checks out.
    Hello {
        client_id: String,
        ephemeral: [u8; 32],
        resume: u64,
    },
    /// Gateway → client: the gateway's ephemeral key and the session id it
    /// will use if the proof checks out.
    Challenge {
        session_id: u64,
        ephemeral: [u8; 32],
    },
    /// Client → gateway: Ed25519 signature over the handshake transcript.
    Auth { signature: [u8; 64] },
    /// Gateway → client, keyed: the session is up.
    Accepted {
        session_id: u64,
        keepalive_ms: u32,
        inactivity_ms: u32,
    },
    /// Gateway → client: no. Sent before keys exist, so not keyed; a forged
    /// refusal can do no more than closing the connection could.
    Refused {
        reason: RefuseReason,
        detail: String,
    },
    /// Keep-alive, either way, keyed.
    Ping { seq: u64 },
    /// Answer to a [`Message::Ping`], keyed.
    Pong { seq: u64 },
    /// Orderly end of the session, keyed.
    Disconnect,
    /// Acknowledges a [`Message::Disconnect`], keyed.
    DisconnectAck,
    /// A stream is reset, keyed.
    StreamReset { stream: StreamId, code: ResetCode },
    /// The sender's application finished writing this direction at `offset`
    /// (half-close). Carried here rather than as a FIN on the leg, so that a
    /// leg that ends because it is replaced is never mistaken for it. Keyed.
    StreamFin { stream: StreamId, offset: Offset },
    /// The receiver has delivered each stream's bytes up to the offset: the
    /// sender may drop them from its replay buffer. Keyed.
    Acks { entries: Vec<(StreamId, Offset)> },
    /// Gateway → client: the leg of this stream broke on the gateway's side;
    /// open a new one. Keyed.
    Releg { stream: StreamId },
    /// Client → gateway, keyed: the client services this agent serves
    /// (server → client, seed 000's "client services"). Sent on every
    /// control connection; the gateway answers [`Message::Exposed`].
    Expose { services: Vec<String> },
    /// Gateway → client, keyed: for each service of an [`Message::Expose`],
    /// where the gateway listens for it (on the address it assigned to this
    /// client agent) or why it does not.
    Exposed {
        entries: Vec<(String, Result<SocketAddr, RefuseReason>)>,
    },
    /// Gateway → client, keyed: a connection arrived for a client service.
    /// The gateway opened `stream` (an id from its own space, see
    /// [`StreamId::GATEWAY`]); the client agent connects to the service's
    /// target and dials a leg for the stream, or resets it.
    Incoming { stream: StreamId, service: String },
    /// Client → gateway on a leg: which stream this leg carries and from
    /// which offset the client needs the gateway's bytes. `service` is set
    /// only when the stream is new (generation 0). `handover` marks a
    /// planned switch: the old leg stays good, so each sender may go on
    /// from where it stopped on it instead of rewinding to `received`; the
    /// receiver drains the old leg up to the new leg's start offset.
    LegOpen {
        session_id: u64,
        stream: StreamId,
        generation: u32,
        received: Offset,
        service: String,
        handover: bool,
        /// How the stream's bytes travel on its legs, chosen when it opens.
        compression: Compression,
    },
    /// Gateway → client on a leg: accepted with the offset from which the
    /// gateway needs the client's bytes, or refused.
    LegReply {
        result: Result<Offset, RefuseReason>,
        detail: String,
    },
    /// Gateway → client, keyed: every address at which the gateway accepts
    /// client agents now (seed 003's dynamic computer addresses), sent once
    /// the session is up and again whenever the set changes. The list
    /// replaces the previous one; at most [`MAX_ADDRESSES`].
    Addresses { list: Vec<SocketAddr> },
    /// Gateway → client, keyed: move the session to another address of the
    /// gateway, make before break (seed 003's "Go To"). `None` lets the
    /// client choose the next address it knows.
    GoTo { addr: Option<SocketAddr> },
    /// Client → gateway, keyed: the session moved from one gateway address
    /// to another (seed 003's "Roam"). Sent on the new control connection,
    /// since after a failure the old one is gone.
    Roam { from: SocketAddr, to: SocketAddr },
    /// A UDP flow of `service` starts (or, after a reconnect, goes on); its
    /// datagrams follow over UDP. Client → gateway for a UDP service (a
    /// flow id of the agent's space); gateway → client for a UDP client
    /// service, when a server sends to it (an id with [`FlowId::GATEWAY`]
    /// set). Keyed.
    FlowOpen { flow: FlowId, service: String },
    /// The answer to a [`Message::FlowOpen`], the other way: the flow may
    /// send (its socket to the target is ready), or it is refused. Keyed.
    FlowReply {
        flow: FlowId,
        result: Result<(), RefuseReason>,
        detail: String,
    },
    /// Either way: the flow is gone on the sender's side (idle, or never
    /// known there). Keyed.
    FlowClose { flow: FlowId, why: FlowEnd },
}

/// Why a UDP flow ended, carried in [`Message::FlowClose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowEnd {
    /// No datagram either way for the idle timeout.
    Idle,
    /// A datagram named a flow the sender does not hold (expired there).
    Unknown,
    /// A code this build does not know.
    Other(u8),
}

impl FlowEnd {
    fn code(self) -> u8 {
        match self {
            Self::Idle => 1,
            Self::Unknown => 2,
            Self::Other(c) => c,
        }
    }
    fn from_code(c: u8) -> Self {
        match c {
            1 => Self::Idle,
            2 => Self::Unknown,
            c => Self::Other(c),
        }
    }
}

mod ty {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const CHALLENGE: u8 = 0x02;
    pub(super) const AUTH: u8 = 0x03;
    pub(super) const ACCEPTED: u8 = 0x04;
    pub(super) const REFUSED: u8 = 0x05;
    pub(super) const PING: u8 = 0x10;
    pub(super) const PONG: u8 = 0x11;
    pub(super) const DISCONNECT: u8 = 0x12;
    pub(super) const DISCONNECT_ACK: u8 = 0x13;
    pub(super) const STREAM_RESET: u8 = 0x14;
    pub(super) const STREAM_FIN: u8 = 0x15;
    pub(super) const ACKS: u8 = 0x16;
    pub(super) const RELEG: u8 = 0x17;
    pub(super) const EXPOSE: u8 = 0x18;
    pub(super) const EXPOSED: u8 = 0x19;
    pub(super) const INCOMING: u8 = 0x1A;
    pub(super) const LEG_OPEN: u8 = 0x20;
    pub(super) const LEG_REPLY: u8 = 0x21;
    // Multihomed gateway (seed 003): 0x40..0x4F.
    pub(super) const ADDRESSES: u8 = 0x40;
    pub(super) const GO_TO: u8 = 0x41;
    pub(super) const ROAM: u8 = 0x42;
    pub(super) const FLOW_OPEN: u8 = 0x30;
    pub(super) const FLOW_REPLY: u8 = 0x31;
    pub(super) const FLOW_CLOSE: u8 = 0x32;
}

/// A frame header, parsed and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub ty: u8,
    /// Payload length, at most [`MAX_PAYLOAD`].
    pub len: usize,
}

impl FrameHeader {
    /// Parses a header and checks its length bound.
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<Self, WireError> {
        let len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLong(len));
        }
        Ok(Self { ty: bytes[0], len })
    }
}

impl Message {
    /// The frame type byte of this message.
    pub fn ty(&self) -> u8 {
        match self {
            Self::Hello { .. } => ty::HELLO,
            Self::Challenge { .. } => ty::CHALLENGE,
            Self::Auth { .. } => ty::AUTH,
            Self::Accepted { .. } => ty::ACCEPTED,
            Self::Refused { .. } => ty::REFUSED,
            Self::Ping { .. } => ty::PING,
            Self::Pong { .. } => ty::PONG,
            Self::Disconnect => ty::DISCONNECT,
            Self::DisconnectAck => ty::DISCONNECT_ACK,
            Self::StreamReset { .. } => ty::STREAM_RESET,
            Self::StreamFin { .. } => ty::STREAM_FIN,
            Self::Acks { .. } => ty::ACKS,
            Self::Releg { .. } => ty::RELEG,
            Self::Expose { .. } => ty::EXPOSE,
            Self::Exposed { .. } => ty::EXPOSED,
            Self::Incoming { .. } => ty::INCOMING,
            Self::LegOpen { .. } => ty::LEG_OPEN,
            Self::LegReply { .. } => ty::LEG_REPLY,
            Self::Addresses { .. } => ty::ADDRESSES,
            Self::GoTo { .. } => ty::GO_TO,
            Self::Roam { .. } => ty::ROAM,
            Self::FlowOpen { .. } => ty::FLOW_OPEN,
            Self::FlowReply { .. } => ty::FLOW_REPLY,
            Self::FlowClose { .. } => ty::FLOW_CLOSE,
        }
    }

    /// Appends header and payload (no tag) to `out`.
    ///
    /// # Panics
    ///
    /// If a string field exceeds its bound: messages built by this process
    /// are validated when built (names come from checked configuration).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u8(self.ty());
        out.put_u16(0);
        match self {
            Self::Hello {
                client_id,
                ephemeral,
                resume,
            } => {
                put_str(out, client_id, MAX_NAME);
                out.put_slice(ephemeral);
                out.put_u64(*resume);
            }
            Self::Challenge {
                session_id,
                ephemeral,
            } => {
                out.put_u64(*session_id);
                out.put_slice(ephemeral);
            }
            Self::Auth { signature } => out.put_slice(signature),
            Self::Accepted {
                session_id,
                keepalive_ms,
                inactivity_ms,
            } => {
                out.put_u64(*session_id);
                out.put_u32(*keepalive_ms);
                out.put_u32(*inactivity_ms);
            }
            Self::Refused { reason, detail } => {
                out.put_u8(reason.code());
                put_str(out, truncate(detail, MAX_REASON), MAX_REASON);
            }
            Self::Ping { seq } | Self::Pong { seq } => out.put_u64(*seq),
            Self::Disconnect | Self::DisconnectAck => {}
            Self::StreamReset { stream, code } => {
                out.put_u64(stream.0);
                out.put_u8(code.code());
            }
            Self::StreamFin { stream, offset } => {
                out.put_u64(stream.0);
                out.put_u64(offset.0);
            }
            Self::Acks { entries } => {
                assert!(entries.len() <= MAX_ACKS, "too many acks for one frame");
                out.put_u16(entries.len() as u16);
                for (s, o) in entries {
                    out.put_u64(s.0);
                    out.put_u64(o.0);
                }
            }
            Self::Releg { stream } => out.put_u64(stream.0),
            Self::Expose { services } => {
                assert!(
                    services.len() <= MAX_EXPOSED,
                    "too many exposed services for one frame"
                );
                out.put_u8(services.len() as u8);
                for s in services {
                    put_str(out, s, MAX_NAME);
                }
            }
            Self::Exposed { entries } => {
                assert!(
                    entries.len() <= MAX_EXPOSED,
                    "too many exposed services for one frame"
                );
                out.put_u8(entries.len() as u8);
                for (name, result) in entries {
                    put_str(out, name, MAX_NAME);
                    match result {
                        Ok(addr) => {
                            out.put_u8(0);
                            put_addr(out, addr);
                        }
                        Err(reason) => out.put_u8(reason.code()),
                    }
                }
            }
            Self::Incoming { stream, service } => {
                out.put_u64(stream.0);
                put_str(out, service, MAX_NAME);
            }
            Self::LegOpen {
                session_id,
                stream,
                generation,
                received,
                service,
                handover,
                compression,
            } => {
                out.put_u64(*session_id);
                out.put_u64(stream.0);
                out.put_u32(*generation);
                out.put_u64(received.0);
                put_str(out, service, MAX_NAME);
                out.put_u8(u8::from(*handover));
                out.put_u8(*compression as u8);
            }
            Self::LegReply { result, detail } => {
                match result {
                    Ok(off) => {
                        out.put_u8(0);
                        out.put_u64(off.0);
                    }
                    Err(reason) => {
                        out.put_u8(reason.code());
                        out.put_u64(0);
                    }
                }
                put_str(out, truncate(detail, MAX_REASON), MAX_REASON);
            }
            Self::Addresses { list } => {
                assert!(
                    list.len() <= MAX_ADDRESSES,
                    "too many addresses for one frame"
                );
                out.put_u8(list.len() as u8);
                list.iter().for_each(|a| put_addr(out, a));
            }
            Self::GoTo { addr: None } => out.put_u8(0),
            Self::GoTo { addr: Some(a) } => {
                out.put_u8(1);
                put_addr(out, a);
            }
            Self::Roam { from, to } => {
                put_addr(out, from);
                put_addr(out, to);
            }
            Self::FlowOpen { flow, service } => {
                out.put_u32(flow.0);
                put_str(out, service, MAX_NAME);
            }
            Self::FlowReply {
                flow,
                result,
                detail,
            } => {
                out.put_u32(flow.0);
                out.put_u8(match result {
                    Ok(()) => 0,
                    Err(reason) => reason.code(),
                });
                put_str(out, truncate(detail, MAX_REASON), MAX_REASON);
            }
            Self::FlowClose { flow, why } => {
                out.put_u32(flow.0);
                out.put_u8(why.code());
            }
        }
        let len = out.len() - start - FRAME_HEADER_LEN;
        assert!(
            len <= MAX_PAYLOAD,
            "message built by this process exceeds the frame bound"
        );
        out[start + 1..start + 3].copy_from_slice(&(len as u16).to_be_bytes());
    }

    /// Decodes the payload of a frame of type `ty`. Never panics.
    pub fn decode(ty: u8, payload: &[u8]) -> Result<Self, WireError> {
        let mut r = payload;
        let msg = match ty {
            ty::HELLO => Self::Hello {
                client_id: get_name(&mut r)?,
                ephemeral: get_array(&mut r)?,
                resume: get_u64(&mut r)?,
            },
            ty::CHALLENGE => Self::Challenge {
                session_id: get_u64(&mut r)?,
                ephemeral: get_array(&mut r)?,
            },
            ty::AUTH => Self::Auth {
                signature: get_array(&mut r)?,
            },
            ty::ACCEPTED => Self::Accepted {
                session_id: get_u64(&mut r)?,
                keepalive_ms: get_u32(&mut r)?,
                inactivity_ms: get_u32(&mut r)?,
            },
            ty::REFUSED => Self::Refused {
                reason: RefuseReason::from_code(get_u8(&mut r)?),
                detail: get_str(&mut r, MAX_REASON)?,
            },
            ty::PING => Self::Ping {
                seq: get_u64(&mut r)?,
            },
            ty::PONG => Self::Pong {
                seq: get_u64(&mut r)?,
            },
            ty::DISCONNECT => Self::Disconnect,
            ty::DISCONNECT_ACK => Self::DisconnectAck,
            ty::STREAM_RESET => Self::StreamReset {
                stream: StreamId(get_u64(&mut r)?),
                code: ResetCode::from_code(get_u8(&mut r)?),
            },
            ty::STREAM_FIN => Self::StreamFin {
                stream: StreamId(get_u64(&mut r)?),
                offset: Offset(get_u64(&mut r)?),
            },
            ty::ACKS => {
                let n = get_u16(&mut r)? as usize;
                if n > MAX_ACKS {
                    return Err(WireError::TooLong(n));
                }
                need(r, n * 16)?;
                let entries = (0..n)
                    .map(|_| (StreamId(r.get_u64()), Offset(r.get_u64())))
                    .collect();
                Self::Acks { entries }
            }
            ty::RELEG => Self::Releg {
                stream: StreamId(get_u64(&mut r)?),
            },
            ty::EXPOSE => {
                let n = get_u8(&mut r)? as usize;
                if n > MAX_EXPOSED {
                    return Err(WireError::TooLong(n));
                }
                let services = (0..n).map(|_| get_name(&mut r)).collect::<Result<_, _>>()?;
                Self::Expose { services }
            }
            ty::EXPOSED => {
                let n = get_u8(&mut r)? as usize;
                if n > MAX_EXPOSED {
                    return Err(WireError::TooLong(n));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = get_name(&mut r)?;
                    let result = match get_u8(&mut r)? {
                        0 => Ok(get_socket_addr(&mut r)?),
                        code => Err(RefuseReason::from_code(code)),
                    };
                    entries.push((name, result));
                }
                Self::Exposed { entries }
            }
            ty::INCOMING => Self::Incoming {
                stream: StreamId(get_u64(&mut r)?),
                service: get_name(&mut r)?,
            },
            ty::LEG_OPEN => Self::LegOpen {
                session_id: get_u64(&mut r)?,
                stream: StreamId(get_u64(&mut r)?),
                generation: get_u32(&mut r)?,
                received: Offset(get_u64(&mut r)?),
                service: get_str(&mut r, MAX_NAME)?,
                handover: match get_u8(&mut r)? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Invalid("handover flag")),
                },
                compression: match get_u8(&mut r)? {
                    0 => Compression::None,
                    1 => Compression::Zstd,
                    _ => return Err(WireError::Invalid("compression")),
                },
            },
            ty::LEG_REPLY => {
                let code = get_u8(&mut r)?;
                let off = get_u64(&mut r)?;
                let result = if code == 0 {
                    Ok(Offset(off))
                } else {
                    Err(RefuseReason::from_code(code))
                };
                Self::LegReply {
                    result,
                    detail: get_str(&mut r, MAX_REASON)?,
                }
            }
            ty::ADDRESSES => {
                let n = get_u8(&mut r)? as usize;
                if n > MAX_ADDRESSES {
                    return Err(WireError::TooLong(n));
                }
                let list = (0..n).map(|_| get_addr(&mut r)).collect::<Result<_, _>>()?;
                Self::Addresses { list }
            }
            ty::GO_TO => match get_u8(&mut r)? {
                0 => Self::GoTo { addr: None },
                1 => Self::GoTo {
                    addr: Some(get_addr(&mut r)?),
                },
                _ => return Err(WireError::Invalid("go-to flag")),
            },
            ty::ROAM => Self::Roam {
                from: get_addr(&mut r)?,
                to: get_addr(&mut r)?,
            },
            ty::FLOW_OPEN => Self::FlowOpen {
                flow: FlowId(get_u32(&mut r)?),
                service: get_name(&mut r)?,
            },
            ty::FLOW_REPLY => {
                let flow = FlowId(get_u32(&mut r)?);
                let code = get_u8(&mut r)?;
                let result = if code == 0 {
                    Ok(())
                } else {
                    Err(RefuseReason::from_code(code))
                };
                Self::FlowReply {
                    flow,
                    result,
                    detail: get_str(&mut r, MAX_REASON)?,
                }
            }
            ty::FLOW_CLOSE => Self::FlowClose {
                flow: FlowId(get_u32(&mut r)?),
                why: FlowEnd::from_code(get_u8(&mut r)?),
            },
            other => return Err(WireError::UnknownType(other)),
        };
        if !r.is_empty() {
            return Err(WireError::Trailing(r.len()));
        }
        Ok(msg)
    }
}

/// Checks that `name` is usable as a client or service name: 1 to
/// [`MAX_NAME`] bytes of ASCII letters, digits, `.`, `_` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    assert!(
        s.len() <= max && max <= u16::MAX as usize,
        "string field over its bound"
    );
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// A socket address: family (4 or 6), the address, the port.
fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

fn get_socket_addr(r: &mut &[u8]) -> Result<SocketAddr, WireError> {
    let ip = match get_u8(r)? {
        4 => IpAddr::V4(Ipv4Addr::from(get_array::<4>(r)?)),
        6 => IpAddr::V6(Ipv6Addr::from(get_array::<16>(r)?)),
        _ => return Err(WireError::Invalid("address family")),
    };
    Ok(SocketAddr::new(ip, get_u16(r)?))
}

fn need(r: &[u8], n: usize) -> Result<(), WireError> {
    if r.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

fn get_u8(r: &mut &[u8]) -> Result<u8, WireError> {
    need(r, 1)?;
    Ok(r.get_u8())
}

fn get_u16(r: &mut &[u8]) -> Result<u16, WireError> {
    need(r, 2)?;
    Ok(r.get_u16())
}

fn get_u32(r: &mut &[u8]) -> Result<u32, WireError> {
    need(r, 4)?;
    Ok(r.get_u32())
}

fn get_u64(r: &mut &[u8]) -> Result<u64, WireError> {
    need(r, 8)?;
    Ok(r.get_u64())
}

fn get_array<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], WireError> {
    need(r, N)?;
    let mut out = [0u8; N];
    r.copy_to_slice(&mut out);
    Ok(out)
}

fn get_str(r: &mut &[u8], max: usize) -> Result<String, WireError> {
    need(r, 2)?;
    let len = r.get_u16() as usize;
    if len > max {
        return Err(WireError::TooLong(len));
    }
    need(r, len)?;
    let s =
        std::str::from_utf8(&r[..len]).map_err(|_| WireError::Invalid("string is not UTF-8"))?;
    let s = s.to_owned();
    r.advance(len);
    Ok(s)
}

/// A gateway address (advertised, go-to, roam): a socket address whose port is never 0.
fn get_addr(r: &mut &[u8]) -> Result<SocketAddr, WireError> {
    match get_socket_addr(r)? {
        a if a.port() == 0 => Err(WireError::Invalid("port 0")),
        a => Ok(a),
    }
}

fn get_name(r: &mut &[u8]) -> Result<String, WireError> {
    let s = get_str(r, MAX_NAME)?;
    if !valid_name(&s) {
        return Err(WireError::Invalid("name"));
    }
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(m: Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let hdr = FrameHeader::decode(buf[..3].try_into().unwrap()).unwrap();
        assert_eq!(hdr.len, buf.len() - 3);
        assert_eq!(Message::decode(hdr.ty, &buf[3..]).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello {
            client_id: "laptop-7".into(),
            ephemeral: [7; 32],
            resume: 9,
        });
        roundtrip(Message::StreamFin {
            stream: StreamId(3),
            offset: Offset(1 << 40),
        });
        roundtrip(Message::Acks {
            entries: vec![(StreamId(1), Offset(2)); MAX_ACKS],
        });
        roundtrip(Message::Acks { entries: vec![] });
        roundtrip(Message::Releg {
            stream: StreamId(8),
        });
        roundtrip(Message::Expose {
            services: vec!["push".into(); MAX_EXPOSED],
        });
        roundtrip(Message::Expose { services: vec![] });
        let longest = "p".repeat(MAX_NAME);
        roundtrip(Message::Exposed {
            entries: (0..MAX_EXPOSED)
                .map(|i| {
                    let addr = if i % 2 == 0 {
                        "[fd00::7]:7000"
                    } else {
                        "127.0.10.3:7000"
                    };
                    let result = if i % 3 == 0 {
                        Err(RefuseReason::ServiceNotAllowed)
                    } else {
                        Ok(addr.parse().unwrap())
                    };
                    (longest.clone(), result)
                })
                .collect(),
        });
        roundtrip(Message::Incoming {
            stream: StreamId(StreamId::GATEWAY | 5),
            service: "push".into(),
        });
        roundtrip(Message::StreamReset {
            stream: StreamId(4),
            code: ResetCode::Refused,
        });
        roundtrip(Message::Challenge {
            session_id: 99,
            ephemeral: [1; 32],
        });
        roundtrip(Message::Auth { signature: [3; 64] });
        roundtrip(Message::Accepted {
            session_id: 5,
            keepalive_ms: 10,
            inactivity_ms: 20,
        });
        roundtrip(Message::Refused {
            reason: RefuseReason::CapacityFull,
            detail: "full".into(),
        });
        roundtrip(Message::Ping { seq: 1 });
        roundtrip(Message::Pong { seq: u64::MAX });
        roundtrip(Message::Disconnect);
        roundtrip(Message::DisconnectAck);
        roundtrip(Message::StreamReset {
            stream: StreamId(4),
            code: ResetCode::Peer,
        });
        roundtrip(Message::LegOpen {
            session_id: 1,
            stream: StreamId(2),
            generation: 3,
            received: Offset(4),
            service: "postgres".into(),
            handover: false,
            compression: Compression::None,
        });
        roundtrip(Message::LegOpen {
            session_id: 1,
            stream: StreamId(2),
            generation: 3,
            received: Offset(4),
            service: String::new(),
            handover: true,
            compression: Compression::Zstd,
        });
        roundtrip(Message::LegReply {
            result: Ok(Offset(77)),
            detail: String::new(),
        });
        let v6: SocketAddr = "[2001:db8::7]:7700".parse().unwrap();
        let v4: SocketAddr = "10.90.1.2:7700".parse().unwrap();
        roundtrip(Message::Addresses { list: vec![] });
        roundtrip(Message::Addresses { list: vec![v4, v6] });
        roundtrip(Message::Addresses {
            list: vec![v6; MAX_ADDRESSES],
        });
        roundtrip(Message::GoTo { addr: None });
        roundtrip(Message::GoTo { addr: Some(v6) });
        roundtrip(Message::Roam { from: v4, to: v6 });
        roundtrip(Message::FlowOpen {
            flow: FlowId(1),
            service: "dns".into(),
        });
        roundtrip(Message::FlowOpen {
            flow: FlowId(FlowId::GATEWAY | 1),
            service: "telemetry".into(),
        });
        roundtrip(Message::FlowReply {
            flow: FlowId(2),
            result: Ok(()),
            detail: String::new(),
        });
        roundtrip(Message::FlowReply {
            flow: FlowId(u32::MAX),
            result: Err(RefuseReason::ServiceNotAllowed),
            detail: "no".into(),
        });
        roundtrip(Message::FlowClose {
            flow: FlowId(3),
            why: FlowEnd::Idle,
        });
        roundtrip(Message::FlowClose {
            flow: FlowId(3),
            why: FlowEnd::Unknown,
        });
        roundtrip(Message::LegReply {
            result: Err(RefuseReason::TargetUnreachable),
            detail: "connection refused".into(),
        });
    }

    #[test]
    fn preface_checks_magic_and_kind() {
        let p = Preface::new(ConnKind::Leg);
        assert_eq!(Preface::decode(&p.encode()).unwrap(), p);
        assert_eq!(Preface::decode(b"GET / HT"), Err(WireError::BadPreface));
        let mut bad = p.encode();
        bad[6] = b'X';
        assert_eq!(Preface::decode(&bad), Err(WireError::BadPreface));
        let mut v2 = p.encode();
        v2[5] = 2;
        assert_eq!(Preface::decode(&v2).unwrap().version, 2);
    }

    #[test]
    fn exposed_lists_are_bounded_and_names_checked() {
        assert_eq!(
            Message::decode(ty::EXPOSE, &[MAX_EXPOSED as u8 + 1]),
            Err(WireError::TooLong(MAX_EXPOSED + 1))
        );
        assert_eq!(
            Message::decode(ty::EXPOSE, &[1, 0, 3, b'a', b' ', b'b']),
            Err(WireError::Invalid("name"))
        );
        // An address of an unknown family.
        assert_eq!(
            Message::decode(ty::EXPOSED, &[1, 0, 1, b'a', 0, 5, 0, 0]),
            Err(WireError::Invalid("address family"))
        );
    }

    #[test]
    fn oversized_frame_is_rejected_before_allocation() {
        assert_eq!(
            FrameHeader::decode(&[1, 0xff, 0xff]),
            Err(WireError::TooLong(0xffff))
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut buf = Vec::new();
        buf.put_u16(3);
        buf.put_slice(b"a b");
        buf.put_slice(&[0; 32]);
        buf.put_u64(0);
        assert_eq!(
            Message::decode(ty::HELLO, &buf),
            Err(WireError::Invalid("name"))
        );
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(valid_name("laptop-7.office_2"));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        // Family 5, port 0, more entries than the bound, a truncated entry.
        assert_eq!(
            Message::decode(ty::GO_TO, &[1, 5, 1, 2, 3, 4, 0, 80]),
            Err(WireError::Invalid("address family"))
        );
        assert_eq!(
            Message::decode(ty::GO_TO, &[1, 4, 1, 2, 3, 4, 0, 0]),
            Err(WireError::Invalid("port 0"))
        );
        assert_eq!(
            Message::decode(ty::GO_TO, &[2]),
            Err(WireError::Invalid("go-to flag"))
        );
        assert_eq!(
            Message::decode(ty::ADDRESSES, &[MAX_ADDRESSES as u8 + 1]),
            Err(WireError::TooLong(MAX_ADDRESSES + 1))
        );
        assert_eq!(
            Message::decode(ty::ADDRESSES, &[1, 4, 1, 2, 3]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Message::decode(ty::ADDRESSES, &[0, 9]),
            Err(WireError::Trailing(1))
        );
    }

    #[test]
    fn long_detail_is_truncated_on_a_char_boundary() {
        let detail = "é".repeat(400);
        let mut buf = Vec::new();
        Message::Refused {
            reason: RefuseReason::Version,
            detail,
        }
        .encode(&mut buf);
        match Message::decode(buf[0], &buf[3..]).unwrap() {
            Message::Refused { detail, .. } => assert!(detail.len() <= MAX_REASON),
            m => panic!("decoded {m:?}"),
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(ty in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(ty, &payload);
        }

        #[test]
        fn truncated_frames_fail_cleanly(cut in 0usize..60) {
            let mut buf = Vec::new();
            Message::LegOpen {
                session_id: 1, stream: StreamId(2), generation: 3,
                received: Offset(4), service: "svc".into(), handover: false,
            compression: Compression::None,
            }.encode(&mut buf);
            let payload = &buf[3..];
            let cut = cut.min(payload.len().saturating_sub(1));
            prop_assert!(Message::decode(buf[0], &payload[..cut]).is_err());
        }
    }
}
