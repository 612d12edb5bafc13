//! Who may ask, and how many at once: the bearer key (compared in
//! constant time, as hashes, so neither its bytes nor its length leak),
//! a cap per client address, and a cap on everything waiting for a seat.
//! Past a cap the answer is 429 or 503 at once, never a wait without end.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The caps, from `[serve]` in config.toml.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Caps {
    /// Bytes of one request body.
    pub max_body_bytes: usize,
    /// Requests one client address has in flight (queued or answering).
    pub max_per_client: usize,
    /// Requests waiting for a conversation, all clients together.
    pub max_queued: usize,
    /// Seconds a request waits for a conversation before a 503.
    pub queue_wait_s: u64,
    /// Open connections, idle ones included.
    pub max_connections: usize,
    /// Events a streamed answer keeps for a client that does not read;
    /// past them the client is dropped and its turn cancelled.
    pub stream_buffer: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_body_bytes: 8 << 20,
            max_per_client: 32,
            max_queued: 64,
            queue_wait_s: 120,
            max_connections: 4096,
            stream_buffer: 512,
        }
    }
}

pub struct Gate {
    key: Option<[u8; 32]>,
    caps: Caps,
    /// Requests in flight per address. A plain lock, held for an insert or
    /// a decrement and never across an await.
    clients: Mutex<HashMap<IpAddr, usize>>,
    /// Permits for everyone admitted: the seats and the queue behind them.
    admitted: Arc<Semaphore>,
    /// Permits for those answering: one per conversation the model holds.
    seats: Arc<Semaphore>,
}

/// A request let in; dropping it gives its place back.
pub struct Ticket {
    gate: Arc<Gate>,
    client: IpAddr,
    _admitted: OwnedSemaphorePermit,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut clients = self.gate.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

fn digest(text: &[u8]) -> [u8; 32] {
    Sha256::digest(text).into()
}

impl Gate {
    pub fn new(key: Option<&str>, caps: Caps, seats: usize) -> Arc<Gate> {
        Arc::new(Gate {
            key: key.map(|k| digest(k.as_bytes())),
            admitted: Arc::new(Semaphore::new(seats + caps.max_queued)),
            seats: Arc::new(Semaphore::new(seats)),
            clients: Mutex::new(HashMap::new()),
            caps,
        })
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// The request's bearer key is the node's, where it has one.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this node needs an API key: Authorization: Bearer KEY",
            ));
        };
        match bool::from(digest(given.as_bytes()).ct_eq(key)) {
            true => Ok(()),
            false => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the API key is wrong",
            )),
        }
    }

    /// Let a request from `client` in, or say which cap it is past.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Ticket, ApiError> {
        let permit = self.admitted.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "every conversation is busy and {} requests are queued; try again shortly",
                    self.caps.max_queued
                ),
            )
        })?;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let n = clients.entry(client).or_default();
        if *n >= self.caps.max_per_client {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{client} has {} requests in flight, the most one client may",
                    self.caps.max_per_client
                ),
            ));
        }
        *n += 1;
        Ok(Ticket {
            gate: self.clone(),
            client,
            _admitted: permit,
        })
    }

    /// Wait for a seat (a conversation to answer on), a bounded while.
    pub async fn seat(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let wait = Duration::from_secs(self.caps.queue_wait_s);
        match tokio::time::timeout(wait, self.seats.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no conversation came free in {} s; try again shortly",
                    wait.as_secs()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(axum::http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_nodes_key_is_let_in() {
        let gate = Gate::new(Some("sk-local-1234"), Caps::default(), 1);
        assert!(gate
            .authorize(&headers(Some("Bearer sk-local-1234")))
            .is_ok());
        for bad in [
            None,
            Some("Bearer sk-local-123"),
            Some("Bearer "),
            Some("sk-local-1234"),
            Some("Basic sk-local-1234"),
        ] {
            let e = gate.authorize(&headers(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad:?}");
            assert!(!e.message.contains("sk-local"));
        }
        assert!(Gate::new(None, Caps::default(), 1)
            .authorize(&headers(None))
            .is_ok());
    }

    #[test]
    fn each_cap_answers_at_once_and_places_come_back() {
        let caps = Caps {
            max_per_client: 2,
            max_queued: 1,
            ..Caps::default()
        };
        let gate = Gate::new(None, caps, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = gate.admit(a).unwrap();
        let _t2 = gate.admit(a).unwrap();
        assert_eq!(
            gate.admit(a).err().unwrap().status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let _t3 = gate.admit(b).unwrap();
        // Two seats and one place in the queue are taken.
        assert_eq!(
            gate.admit(b).err().unwrap().status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(t1);
        assert!(gate.admit(a).is_ok());
    }
}
