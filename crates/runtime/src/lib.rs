//! baton's drivers: the gateway and the client agent on tokio, around the
//! state machines of `baton-proto`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
mod codec;
pub mod config;
pub mod decide;
mod frame;
pub mod gateway;
pub mod gateway_admin;
pub mod path;
mod shards;
pub mod stream;
pub mod udp;
mod util;
pub mod verify;

pub use client::{Client, LinkState, SessionError};
pub use config::{ClientConfig, ConfigError, GatewayConfig};
pub use gateway::Gateway;
