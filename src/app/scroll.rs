//! Scrolling the conversation. The view is either following the end or
//! anchored at a row of an entry, so text arriving below an anchored view
//! does not move it.

use super::State;
use crate::layout::entries::entry_rows;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scroll {
    Follow,
    /// The top row of the view: row `row` of transcript entry `entry`.
    At {
        entry: usize,
        row: usize,
    },
}

fn rows(state: &State, entry: usize, width: u16) -> usize {
    entry_rows(&state.entry_view(), &state.transcript, entry, width).len()
}

/// The view's top row when it follows the end.
fn follow_top(state: &State, width: u16, height: usize) -> (usize, usize) {
    let mut remaining = height;
    for i in (0..state.transcript.len()).rev() {
        let r = rows(state, i, width);
        if r >= remaining {
            return (i, r - remaining);
        }
        remaining -= r;
    }
    (0, 0)
}

fn current_top(state: &State, width: u16, height: usize) -> (usize, usize) {
    match state.scroll {
        Scroll::Follow => follow_top(state, width, height),
        Scroll::At { entry, row } => (entry, row),
    }
}

fn up(state: &State, (mut i, mut row): (usize, usize), mut n: usize, width: u16) -> (usize, usize) {
    loop {
        if row >= n {
            return (i, row - n);
        }
        n -= row;
        if i == 0 {
            return (0, 0);
        }
        i -= 1;
        row = rows(state, i, width);
    }
}

fn down(
    state: &State,
    (mut i, mut row): (usize, usize),
    mut n: usize,
    width: u16,
) -> (usize, usize) {
    loop {
        let r = rows(state, i, width);
        if row + n < r {
            return (i, row + n);
        }
        n -= r - row;
        if i + 1 >= state.transcript.len() {
            return (i, r);
        }
        i += 1;
        row = 0;
    }
}

/// Anchor at `top`, or follow when everything from `top` fits the view.
fn set(state: &mut State, (entry, row): (usize, usize), width: u16, height: usize) {
    let mut below = 0;
    for i in entry..state.transcript.len() {
        let r = rows(state, i, width);
        below += if i == entry { r.saturating_sub(row) } else { r };
        if below > height {
            state.scroll = Scroll::At { entry, row };
            return;
        }
    }
    state.scroll = Scroll::Follow;
    state.unseen_output = false;
}

pub fn by(state: &mut State, delta: i64) {
    let (width, height) = state.chat_viewport();
    if state.transcript.is_empty() || height == 0 {
        return;
    }
    let top = current_top(state, width, height);
    let n = delta.unsigned_abs() as usize;
    let target = if delta < 0 {
        up(state, top, n, width)
    } else {
        down(state, top, n, width)
    };
    set(state, target, width, height);
}

pub fn page(state: &mut State, direction: i64) {
    let (_, height) = state.chat_viewport();
    by(state, direction * height.saturating_sub(1).max(1) as i64);
}

pub fn top(state: &mut State) {
    let (width, height) = state.chat_viewport();
    if !state.transcript.is_empty() {
        set(state, (0, 0), width, height);
    }
}

/// After a resize the anchor row may be past its entry's end.
pub fn clamp(state: &mut State) {
    if let Scroll::At { entry, row } = state.scroll {
        let (width, height) = state.chat_viewport();
        if entry >= state.transcript.len() {
            state.scroll = Scroll::Follow;
            return;
        }
        let row = row.min(rows(state, entry, width).saturating_sub(1));
        set(state, (entry, row), width, height);
    }
}
