//! baton's decision engine: when the client agent switches networks, and to
//! which interface.
//!
//! This is the seed's "decision task" (seed 000: Check Activity, Search
//! Activity, manual and automatic modes, Figures 19 and 20; seed 001 claims
//! 30 to 34): an interface table with user attributes and measurements,
//! warning and critical thresholds, a score with hysteresis and a dwell
//! time, and the user's own requests.
//!
//! Like `baton-proto`, this crate opens no socket and reads no clock: the
//! client agent feeds [`Engine`] the kernel's interface table, probe
//! results and `now`, and acts on the [`Decision`]s it returns. So every
//! rule of the policy can be tested on synthetic timelines.

#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod table;

pub use config::{
    Attributes, ConfigError, InterfaceRule, Kind, Mode, PolicyConfig, Thresholds, Weights,
};
pub use engine::{
    Decision, Engine, Health, IfaceStatus, PathStatus, Reason, Refusal, Trigger, MAX_TARGETS,
};
pub use table::{Interface, Sample, Stats};

#[cfg(test)]
mod tests;
