//! The host: the long-lived process that holds the model and serves the
//! front ends. `daemon` serves clients over a private socket; `workstation`
//! is one conversation and its terminals; `runtime` performs the effects
//! `update` returns; `protocol` is kiln's wire format; `terminal` is the
//! client side of a terminal; `launch` starts the engine.

pub mod daemon;
pub mod launch;
pub mod protocol;
pub mod runtime;
pub mod terminal;
pub mod workstation;
