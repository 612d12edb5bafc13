//! kiln: a terminal workstation for running local LLM agents.
//!
//! The crate is a library so that integration tests and benchmarks drive the
//! same code the binary runs; `main.rs` only parses arguments and reports errors.
//!
//! The modules, bottom up (each imports only those below it; `tests/layers.rs`
//! holds the rules):
//! 1. facts: `budget`, `gguf`, `layers`, `machines`, `models`, `window`, and
//!    `chat`, the plain types the engine and the store share;
//! 2. `store`;
//! 3. `engine`;
//! 4. `telemetry`;
//! 5. `agent`, and `record` (what the journal keeps of a turn);
//! 6. `app` and `ui`, over `layout`;
//! 7. `host`: the daemon, the workstation, the runtime, the protocol and the
//!    terminal client;
//! 8. `cmd`: the subcommands.
//!
//! Beside them: `cli` and `config` (the settings), and small helpers used
//! anywhere (`error`, `paths`, `private`, `visible`, `logging`, ...).

pub mod agent;
pub mod app;
pub mod bandwidth;
pub mod budget;
pub mod chat;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod host;
pub mod keys;
pub mod layers;
pub mod layout;
pub mod logging;
pub mod machines;
pub mod models;
pub mod paths;
pub mod private;
pub mod procinfo;
pub mod record;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod theme;
pub mod ui;
pub mod visible;
pub mod window;
