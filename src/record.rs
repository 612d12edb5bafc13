//! What the journal keeps of a turn: the one mapping from engine events to
//! session records, used by `kiln ask`, the workstation and agents alike.

use crate::engine::EngineEvent;
use crate::store::journal::JournalHandle;
use crate::store::session::Event;

/// A journal record made from an engine event.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Streamed answer text, journaled in batches until the answer ends.
    Chunk(String),
    /// A committed event.
    Event(Event),
}

impl Record {
    /// What `event` leaves in the journal, if anything.
    pub fn of(event: &EngineEvent) -> Option<Record> {
        match event {
            EngineEvent::TurnStarted { .. } => None,
            EngineEvent::ContextTrimmed {
                dropped_messages,
                limit,
                ..
            } => Some(Record::Event(Event::Notice {
                text: trimmed_notice(*dropped_messages, *limit),
            })),
            EngineEvent::Token { text, .. } => Some(Record::Chunk(text.clone())),
            EngineEvent::TurnFinished {
                reply,
                finish,
                stats,
                ..
            } => Some(Record::Event(Event::Answer {
                text: reply.clone(),
                finish: *finish,
                stats: stats.clone(),
            })),
            EngineEvent::TurnFailed { error, .. } => Some(Record::Event(Event::Error {
                text: error.clone(),
            })),
        }
    }

    pub fn write(self, journal: &JournalHandle) {
        match self {
            Record::Chunk(text) => journal.chunk(text),
            Record::Event(event) => journal.event(event),
        }
    }
}

/// The line shown and kept when older messages left the context window.
pub fn trimmed_notice(dropped_messages: usize, limit: usize) -> String {
    format!(
        "the context window ({limit} tokens) was full: the model no longer sees the oldest {dropped_messages} messages"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, GenStats};

    #[test]
    fn each_event_has_its_record() {
        let token = EngineEvent::Token {
            turn: 1,
            text: "hi".into(),
        };
        assert_eq!(Record::of(&token), Some(Record::Chunk("hi".into())));
        let started = EngineEvent::TurnStarted {
            turn: 1,
            prompt_tokens: 3,
            reused_tokens: 0,
        };
        assert_eq!(Record::of(&started), None);
        let finished = EngineEvent::TurnFinished {
            turn: 1,
            reply: "hi".into(),
            finish: FinishReason::Stop,
            stats: GenStats::default(),
        };
        assert!(matches!(
            Record::of(&finished),
            Some(Record::Event(Event::Answer { text, .. })) if text == "hi"
        ));
        let trimmed = EngineEvent::ContextTrimmed {
            turn: 1,
            dropped_messages: 2,
            context_tokens: 100,
            limit: 128,
        };
        assert_eq!(
            Record::of(&trimmed),
            Some(Record::Event(Event::Notice {
                text: trimmed_notice(2, 128)
            }))
        );
    }
}
