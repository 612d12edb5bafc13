//! kiln: a terminal workstation for running local LLM agents.
//!
//! The crate is a library so that integration tests and benchmarks drive the
//! same code the binary runs; `main.rs` only parses arguments and reports errors.

pub mod agent;
pub mod app;
pub mod ask;
pub mod bandwidth;
pub mod bench;
pub mod budget;
pub mod cache_cmd;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fit;
pub mod gguf;
pub mod keys;
pub mod launch;
pub mod layers;
pub mod logging;
pub mod machines;
pub mod models;
pub mod monitor;
pub mod paths;
pub mod private;
pub mod procinfo;
pub mod protocol;
pub mod runs_cmd;
pub mod runtime;
pub mod session_cmd;
pub mod store;
pub mod telemetry;
pub mod theme;
pub mod transcript;
pub mod tui;
pub mod ui;
pub mod visible;
pub mod window;
pub mod workstation;
