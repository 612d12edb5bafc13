//! The subcommands, each over the host and the core.

pub mod agent;
pub mod ask;
pub mod bench;
pub mod cache;
pub mod fit;
pub mod mcp;
pub mod monitor;
pub mod runs;
pub mod sandbox;
pub mod sessions;
