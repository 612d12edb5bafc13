//! `kiln serve`: the loaded model as an OpenAI-compatible endpoint, for
//! editors, scripts written against the `openai` client, and another kiln
//! (`--engine remote:NAME`), which also reads the node's memory, swap and
//! heat from `/kiln/v1/telemetry`.
//!
//! The daemon serves it: the HTTP listener is one more user of the loaded
//! model, each request a conversation leased from the shared engine beside
//! the workstation's and agent runs'. No TCP listener runs unless asked
//! (`kiln serve`, or `listen` in `[serve]`), and one that other machines
//! can reach needs an API key. axum routes; hyper serves each connection
//! with a header timeout, under a cap on open connections, so idle or
//! slow clients cannot pile up.

pub mod admission;
pub mod answer;
pub mod error;
pub mod ledger;
pub mod openai;
mod routes;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Semaphore};

use crate::engine::{EngineHandle, SamplerSettings};
use crate::error::{KilnError, Result};
use crate::telemetry::Sample;
pub use admission::Caps;
use ledger::{Ledger, Served};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// A request's headers must arrive within this long; an idle connection
/// is closed after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A key shorter than this is a password, not an API key.
const MIN_KEY: usize = 16;

/// `[serve]` in config.toml: a daemon with `listen` set serves while it
/// runs.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// ADDR:PORT to listen on.
    pub listen: Option<String>,
    /// The environment variable that holds the API key.
    pub api_key_env: Option<String>,
    /// Keep each served request and its answer as a session; off, the
    /// node keeps no transcript of what it serves.
    pub journal_requests: bool,
    pub limits: Caps,
}

/// What `kiln serve` asks for, on top of `[serve]`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct ServeArgs {
    /// Where to listen (default 127.0.0.1:8080). An address other machines
    /// can reach needs --api-key-env.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// The environment variable holding the API key clients must send
    /// (`Authorization: Bearer KEY`); the key itself is never written down.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Keep each served request and its answer as a session (`kiln
    /// sessions`); without it the node keeps no transcript of them.
    #[arg(long)]
    pub journal_requests: bool,
}

impl ServeConfig {
    /// The flags over the config's settings; `None` when nothing asks for
    /// a listener.
    pub fn with(&self, args: Option<&ServeArgs>) -> Option<ServeConfig> {
        let listen = args
            .and_then(|a| a.listen.clone())
            .or_else(|| self.listen.clone())
            .or_else(|| args.map(|_| DEFAULT_LISTEN.to_string()))?;
        Some(ServeConfig {
            listen: Some(listen),
            api_key_env: args
                .and_then(|a| a.api_key_env.clone())
                .or_else(|| self.api_key_env.clone()),
            journal_requests: self.journal_requests || args.is_some_and(|a| a.journal_requests),
            limits: self.limits.clone(),
        })
    }
}

/// A listener bound and checked, waiting for the model.
pub struct Listening {
    listener: std::net::TcpListener,
    pub addr: SocketAddr,
    key: Option<String>,
    caps: Caps,
    pub journal_requests: bool,
}

/// Check the address and the key, and bind: before the model loads, so a
/// refused start costs nothing.
pub fn bind(config: &ServeConfig) -> Result<Listening> {
    let listen = config.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let bad = |why: String| KilnError::BadArgument(format!("--listen {listen}: {why}"));
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|e| bad(format!("not an address to listen on ({e})")))?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    let key = match &config.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(key) if key.trim().len() >= MIN_KEY => Some(key.trim().to_string()),
            Ok(_) => {
                return Err(KilnError::BadArgument(format!(
                    "--api-key-env {var}: the key is shorter than {MIN_KEY} characters"
                )))
            }
            Err(_) => {
                return Err(KilnError::BadArgument(format!(
                    "--api-key-env {var}: the variable is not set"
                )))
            }
        },
    };
    if key.is_none() && !addr.ip().is_loopback() {
        return Err(bad(
            "other machines can reach this address, and no API key is set; give one with --api-key-env VAR (or [serve] api_key_env), or listen on 127.0.0.1".into(),
        ));
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| bad(format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| KilnError::io("the listener", e))?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(Listening {
        listener,
        addr,
        key,
        caps: config.limits.clone(),
        journal_requests: config.journal_requests,
    })
}

/// A listener serving: what it serves now, for `kiln ps`.
pub struct Serving {
    pub served: watch::Receiver<Served>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Take no more connections; the model goes when the open ones close.
    pub fn stop(self) {
        self.accepting.abort();
    }
}

/// Serve `engine` on `listening` until stopped or the runtime ends;
/// `store` keeps the requests where `journal_requests` asks.
pub fn start(
    listening: Listening,
    engine: EngineHandle,
    sampler: SamplerSettings,
    samples: watch::Receiver<Sample>,
    store: Option<crate::store::SessionStore>,
) -> Result<Serving> {
    let listener = tokio::net::TcpListener::from_std(listening.listener)
        .map_err(|e| KilnError::io("the listener", e))?;
    let (_, seats) = engine.seats();
    let (ledger, served) = Ledger::spawn();
    let caps = listening.caps;
    let node = Arc::new(routes::Node {
        info: engine.info().clone(),
        engine,
        sampler,
        gate: admission::Gate::new(listening.key.as_deref(), caps.clone(), seats),
        ledger,
        samples,
        served: served.clone(),
        name: sysinfo::System::host_name().unwrap_or_else(|_| "node".to_string()),
        tag: rand::random(),
        journal: store.filter(|_| listening.journal_requests),
    });
    let connections = caps
        .max_connections
        .min(open_files_allowed().saturating_sub(64))
        .max(16);
    let accepting = tokio::spawn(accept(listener, routes::router(node), connections));
    tracing::info!("serving on http://{}", listening.addr);
    Ok(Serving { served, accepting })
}

/// Raise this process's open-file limit to what it may, and say how many
/// it has.
fn open_files_allowed() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        // macOS refuses more than OPEN_MAX (10240) whatever the hard
        // limit says, and starts processes at 256.
        for wanted in [limit.rlim_max.min(65536), limit.rlim_max.min(10240)] {
            if limit.rlim_cur >= wanted {
                break;
            }
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = wanted;
            }
        }
    }
    limit.rlim_cur as usize
}

async fn accept(listener: tokio::net::TcpListener, app: axum::Router, connections: usize) {
    use tower_service::Service;
    let open = Arc::new(Semaphore::new(connections));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some back.
                tracing::warn!("serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(addr));
                app.clone().call(request)
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("serve: {addr}: {e}");
            }
            drop(permit);
        });
    }
}

/// A connection past the cap: one 503 and closed, without reading it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = error::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "this node has as many connections open as it takes; try again shortly",
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, key_env: Option<&str>) -> ServeConfig {
        ServeConfig {
            listen: Some(listen.into()),
            api_key_env: key_env.map(String::from),
            journal_requests: false,
            limits: Caps::default(),
        }
    }

    #[test]
    fn a_reachable_address_without_a_key_is_refused_at_start() {
        let e = bind(&config("0.0.0.0:0", None)).err().unwrap().to_string();
        assert!(
            e.contains("no API key") && e.contains("--api-key-env"),
            "{e}"
        );
        let e = bind(&config("127.0.0.1:0", Some("KILN_TEST_UNSET_KEY")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("KILN_TEST_UNSET_KEY") && e.contains("not set"),
            "{e}"
        );
        std::env::set_var("KILN_TEST_SHORT_KEY", "abc");
        let e = bind(&config("127.0.0.1:0", Some("KILN_TEST_SHORT_KEY")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("shorter") && !e.contains("abc"), "{e}");
        assert!(bind(&config("127.0.0.1:0", None)).is_ok());
        std::env::set_var("KILN_TEST_GOOD_KEY", "sk-0123456789abcdef");
        assert!(bind(&config("0.0.0.0:0", Some("KILN_TEST_GOOD_KEY"))).is_ok());
    }

    #[test]
    fn flags_go_over_the_config_and_nothing_listens_unasked() {
        let none = ServeConfig::default();
        assert_eq!(none.with(None), None);
        let args = ServeArgs::default();
        assert_eq!(
            none.with(Some(&args)).unwrap().listen.as_deref(),
            Some(DEFAULT_LISTEN)
        );
        let configured = config("127.0.0.1:9000", Some("K"));
        assert_eq!(
            configured.with(None).unwrap().listen.as_deref(),
            Some("127.0.0.1:9000")
        );
        let args = ServeArgs {
            listen: Some("127.0.0.1:9001".into()),
            api_key_env: None,
            journal_requests: true,
        };
        let both = configured.with(Some(&args)).unwrap();
        assert_eq!(
            (both.listen.as_deref(), both.api_key_env.as_deref()),
            (Some("127.0.0.1:9001"), Some("K"))
        );
        assert!(both.journal_requests && !configured.with(None).unwrap().journal_requests);
    }
}
