//! Another machine's instruments: a kiln node's `/kiln/v1/telemetry`
//! stream, read by the kiln at the other end of `--engine remote:NAME` so
//! that its panels show the node's memory, swap and heat beside its own.
//! An endpoint that is not a kiln node says so; nothing is made up.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Sample;
use crate::chat::GenStats;
use crate::engine::remote::{root_cause, Endpoint};

/// One request in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServedRequest {
    pub id: u64,
    /// The client's address, and the `user` it gave.
    pub client: String,
    pub endpoint: String,
    /// `queued`, `prefill` or `decoding`.
    pub phase: String,
    pub seconds: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the node serves now, and the last answer's speeds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Served {
    pub active: Vec<ServedRequest>,
    pub answered: u64,
    /// The last finished answer's figures.
    pub last: Option<GenStats>,
    /// Time the node spent on streamed tokens between the engine and the
    /// client's buffer (shaping, JSON, the send), and the tokens it was
    /// spent on: kiln serve's own cost per token.
    #[serde(default)]
    pub overhead_ns: u64,
    #[serde(default)]
    pub overhead_tokens: u64,
}

impl Served {
    pub fn overhead_us_per_token(&self) -> Option<f64> {
        (self.overhead_tokens > 0)
            .then(|| self.overhead_ns as f64 / 1000.0 / self.overhead_tokens as f64)
    }
}

/// One report of a node's state, as `kiln serve` streams it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The machine's name.
    pub node: String,
    pub model: String,
    /// Conversations leased, and how many the model holds.
    pub seats: (usize, usize),
    pub sample: Sample,
    pub served: Served,
}

/// What the client knows of the node behind its endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RemoteNode {
    /// Not asked yet, or asking.
    #[default]
    Connecting,
    /// The figures cannot be had, and why.
    Unavailable(String),
    Node(Box<NodeReport>),
}

/// Bytes of one report at most; a node that sends more is not believed.
const MAX_REPORT: usize = 1 << 20;
/// Entries of a report's lists kept at most.
const MAX_LISTED: usize = 64;
/// A node that went quiet is asked again after this long.
const RETRY: Duration = Duration::from_secs(5);
/// Reports come once a second; this long without one is a lost node.
const QUIET: Duration = Duration::from_secs(10);

/// Where the node's telemetry is, next to its OpenAI API.
fn telemetry_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let root = base.strip_suffix("/v1").unwrap_or(base);
    format!("{root}/kiln/v1/telemetry")
}

impl NodeReport {
    /// The report with its lists cut to what a panel shows.
    fn bounded(mut self) -> NodeReport {
        self.sample.temperatures.truncate(MAX_LISTED);
        self.served.active.truncate(MAX_LISTED);
        self
    }
}

/// Follow the node behind `endpoint`, for as long as the receiver lives.
pub fn follow(name: &str, endpoint: &Endpoint) -> watch::Receiver<RemoteNode> {
    let (tx, rx) = watch::channel(RemoteNode::Connecting);
    let url = telemetry_url(&endpoint.base_url);
    let key = endpoint
        .api_key_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok());
    let name = name.to_string();
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(RemoteNode::Unavailable(e.to_string()));
                return;
            }
        };
        while !tx.is_closed() {
            let ended = read(&client, &url, key.as_deref(), &tx).await;
            if let Err(why) = ended {
                tx.send_replace(RemoteNode::Unavailable(format!("{name}: {why}")));
                // Another server on this endpoint will not become a node.
                if why.starts_with("not a kiln node") {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Read reports until the stream ends; why it did.
async fn read(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    tx: &watch::Sender<RemoteNode>,
) -> Result<(), String> {
    let mut request = client.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach the node: {}", root_cause(&e)))?;
    match response.status().as_u16() {
        200 => {}
        401 | 403 => return Err("the node refused the API key".into()),
        404 | 405 => {
            return Err(
                "not a kiln node: the endpoint's memory, swap and heat are not available".into(),
            )
        }
        status => return Err(format!("the node answered HTTP {status}")),
    }
    let mut events = response.bytes_stream().eventsource();
    loop {
        let event = match tokio::time::timeout(QUIET, events.next()).await {
            Err(_) => return Err(format!("no report for {} s", QUIET.as_secs())),
            Ok(None) => return Err("the node closed its telemetry".into()),
            Ok(Some(Err(e))) => return Err(format!("the telemetry stream broke: {e}")),
            Ok(Some(Ok(event))) => event,
        };
        if event.data.len() > MAX_REPORT {
            return Err("a report larger than 1 MiB".into());
        }
        let report: NodeReport = serde_json::from_str(&event.data)
            .map_err(|e| format!("not a kiln node's report: {e}"))?;
        tx.send_replace(RemoteNode::Node(Box::new(report.bounded())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_telemetry_sits_beside_the_api() {
        assert_eq!(
            telemetry_url("http://studio:8080/v1"),
            "http://studio:8080/kiln/v1/telemetry"
        );
        assert_eq!(
            telemetry_url("http://studio:8080/v1/"),
            "http://studio:8080/kiln/v1/telemetry"
        );
        assert_eq!(
            telemetry_url("http://h/api"),
            "http://h/api/kiln/v1/telemetry"
        );
    }

    #[test]
    fn a_report_round_trips_and_is_bounded() {
        let mut report = NodeReport {
            node: "studio".into(),
            ..NodeReport::default()
        };
        report.sample.temperatures = (0..500)
            .map(|i| super::super::Temperature {
                label: format!("t{i}"),
                celsius: 40.0,
                critical: None,
            })
            .collect();
        let text = serde_json::to_string(&report).unwrap();
        let back: NodeReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.bounded().sample.temperatures.len(), MAX_LISTED);
    }
}
