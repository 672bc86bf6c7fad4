//! baton's protocol: wire format, handshake, keyed control frames, session
//! liveness and stream bookkeeping.
//!
//! This crate opens no socket and reads no clock: the drivers in
//! `baton-runtime` feed it bytes and `now`, and act on what it returns. That
//! keeps every rule of the protocol unit-testable and deterministic.

#![forbid(unsafe_code)]

pub mod crypto;
pub mod datagram;
pub mod probe;
pub mod replay;
pub mod session;
pub mod stream;
pub mod wire;

pub use crypto::{
    ClientHandshake, ClientKey, ControlCipher, CryptoError, GatewayHandshake, LegKey, PublicKey,
    Role, SessionKeys,
};
pub use datagram::FlowId;
pub use replay::{ReplayBuffer, ReplayError};
pub use session::{Liveness, LivenessAction};
pub use stream::{Admission, AdmitError, Offset, StreamId, StreamState, StreamTable};
pub use wire::FlowEnd;
pub use wire::{Compression, ConnKind, Message, Preface, RefuseReason, ResetCode, WireError};
