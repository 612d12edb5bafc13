//! The requests a node is serving, as `kiln ps`, the panels and
//! `/kiln/v1/telemetry` show them: a task that request handlers tell what
//! they do, publishing the list on a `watch` channel.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::chat::GenStats;
pub use crate::telemetry::remote::{Served, ServedRequest};

#[derive(Debug)]
enum Note {
    Open {
        id: u64,
        client: String,
        endpoint: &'static str,
    },
    Started {
        id: u64,
        prompt_tokens: usize,
    },
    /// The tokens streamed so far.
    Tokens(u64, usize),
    Closed {
        id: u64,
        stats: Option<GenStats>,
        overhead: (Duration, u64),
    },
}

/// A handler's line to the ledger.
#[derive(Clone, Debug)]
pub struct Ledger {
    notes: mpsc::UnboundedSender<Note>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// One request's entry; closing it (or dropping it) takes it off.
pub struct Entry {
    id: u64,
    notes: mpsc::UnboundedSender<Note>,
    stats: Option<GenStats>,
    overhead: (Duration, u64),
    tokens: usize,
}

/// Tokens between two notes of a request's progress.
const TOKENS_A_NOTE: usize = 8;

impl Entry {
    /// Unique among the node's requests.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn started(&self, prompt_tokens: usize) {
        let _ = self.notes.send(Note::Started {
            id: self.id,
            prompt_tokens,
        });
    }

    /// A token streamed; the ledger hears of them in batches, which is
    /// all a listing shows.
    pub fn token(&mut self) {
        self.tokens += 1;
        if self.tokens % TOKENS_A_NOTE == 1 {
            let _ = self.notes.send(Note::Tokens(self.id, self.tokens));
        }
    }

    pub fn finished(&mut self, stats: GenStats) {
        self.stats = Some(stats);
    }

    /// `spent` handling `tokens` streamed tokens.
    pub fn spent(&mut self, spent: Duration, tokens: u64) {
        self.overhead = (spent, tokens);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = self.notes.send(Note::Closed {
            id: self.id,
            stats: self.stats.take(),
            overhead: self.overhead,
        });
    }
}

/// Progress is published this often at most; opening and closing at once.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

impl Ledger {
    pub fn spawn() -> (Ledger, watch::Receiver<Served>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (publish, served) = watch::channel(Served::default());
        tokio::spawn(async move {
            let mut open: BTreeMap<u64, (Instant, ServedRequest)> = BTreeMap::new();
            let mut view = Served::default();
            let mut published = Instant::now();
            while let Some(note) = rx.recv().await {
                let now_too = matches!(note, Note::Open { .. } | Note::Closed { .. });
                match note {
                    Note::Open {
                        id,
                        client,
                        endpoint,
                    } => {
                        let request = ServedRequest {
                            id,
                            client,
                            endpoint: endpoint.into(),
                            phase: "queued".into(),
                            seconds: 0.0,
                            prompt_tokens: 0,
                            completion_tokens: 0,
                        };
                        open.insert(id, (Instant::now(), request));
                    }
                    Note::Started { id, prompt_tokens } => {
                        if let Some((_, r)) = open.get_mut(&id) {
                            r.phase = "prefill".into();
                            r.prompt_tokens = prompt_tokens;
                        }
                    }
                    Note::Tokens(id, tokens) => {
                        if let Some((_, r)) = open.get_mut(&id) {
                            r.phase = "decoding".into();
                            r.completion_tokens = tokens;
                        }
                    }
                    Note::Closed {
                        id,
                        stats,
                        overhead: (spent, tokens),
                    } => {
                        open.remove(&id);
                        view.overhead_ns += spent.as_nanos() as u64;
                        view.overhead_tokens += tokens;
                        if let Some(stats) = stats {
                            view.answered += 1;
                            view.last = Some(stats);
                        }
                    }
                }
                if now_too || published.elapsed() >= PUBLISH_EVERY {
                    view.active = open
                        .values()
                        .map(|(since, r)| ServedRequest {
                            seconds: since.elapsed().as_secs_f64(),
                            ..r.clone()
                        })
                        .collect();
                    publish.send_replace(view.clone());
                    published = Instant::now();
                }
            }
        });
        let ledger = Ledger {
            notes: tx,
            next: Default::default(),
        };
        (ledger, served)
    }

    pub fn open(&self, client: String, endpoint: &'static str) -> Entry {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let _ = self.notes.send(Note::Open {
            id,
            client,
            endpoint,
        });
        Entry {
            id,
            notes: self.notes.clone(),
            stats: None,
            overhead: (Duration::ZERO, 0),
            tokens: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_shows_while_it_runs_and_leaves_its_figures() {
        let (ledger, mut served) = Ledger::spawn();
        let mut entry = ledger.open("127.0.0.1 (alice)".into(), "chat");
        entry.started(12);
        entry.token();
        served.changed().await.unwrap();
        assert_eq!(served.borrow().active[0].client, "127.0.0.1 (alice)");
        // Another request's opening publishes the first's progress.
        let other = ledger.open("10.0.0.2".into(), "completion");
        loop {
            served.changed().await.unwrap();
            if served.borrow().active.len() == 2 {
                break;
            }
        }
        let first = served.borrow().active[0].clone();
        assert_eq!(
            (
                first.phase.as_str(),
                first.completion_tokens,
                first.prompt_tokens
            ),
            ("decoding", 1, 12)
        );
        drop(other);
        entry.finished(GenStats {
            completion_tokens: 3,
            ..GenStats::default()
        });
        drop(entry);
        loop {
            served.changed().await.unwrap();
            let now = served.borrow().clone();
            if now.active.is_empty() && now.answered == 1 {
                assert_eq!(now.answered, 1);
                assert_eq!(now.last.unwrap().completion_tokens, 3);
                break;
            }
        }
    }
}
