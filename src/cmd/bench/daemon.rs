//! `kiln bench --daemon`: daemon-to-client latency and throughput, for
//! runs and terminals, over the real actor, socket and framing.

use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::agent::Progress;
use crate::cli::Common;
use crate::error::{KilnError, Result};
use crate::host::protocol::{self, Open, Reply, Request, Settings};
use crate::paths::Paths;

use crate::host::daemon::{bench_actor, bind, Model};

#[derive(Debug, serde::Serialize)]
pub struct DeliveryFigures {
    pub clients: usize,
    pub events: usize,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    /// Events per second each client received, publishing flat out.
    pub throughput_per_client: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ScreenFigures {
    pub clients: usize,
    /// From a key sent by one terminal to the frame showing it, at every
    /// attached terminal.
    pub echo_p50_ms: f64,
    pub echo_p99_ms: f64,
    /// Tokens of a streamed answer per second until each terminal shows the
    /// last one (the fake engine streams as fast as the host takes them).
    pub tokens_per_s_per_client: f64,
}

/// `kiln bench --daemon`, the workstation part: the real actor, host,
/// socket and framing, with a scripted engine. Each round types a key in
/// the first terminal and waits until every terminal shows it.
pub async fn bench_screens(clients: usize, rounds: usize) -> Result<ScreenFigures> {
    use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
    let bench_error = |e: std::io::Error| KilnError::io("bench client", e);
    let dir = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let path = dir.path().join("daemon.sock");
    let listener = bind(&path)?;
    const TOKENS: usize = 500;
    let answer = (0..TOKENS)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let paths = Paths::under(dir.path());
    let model = Model::fake(Common::default(), &paths);
    let engine = crate::engine::fake::FakeEngine::new([answer]);
    bench_actor(listener, crate::engine::spawn(engine), &paths, Some(model));

    let mut readers = Vec::new();
    let mut writer = None;
    let mut idle_writers = Vec::new();
    // Each terminal reports when it sees `marker`, asked for by the bench.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, std::time::Instant)>();
    let mut markers = Vec::new();
    for i in 0..clients {
        let s = UnixStream::connect(&path).await.map_err(bench_error)?;
        let (mut read, mut write) = s.into_split();
        let hello = Request::Workstation {
            open: Open::Current,
            size: (120, 40),
            theme: None,
            no_color: true,
            settings: Settings::default(),
        };
        protocol::write(&mut write, &hello)
            .await
            .map_err(bench_error)?;
        let (marker_tx, mut marker_rx) = tokio::sync::watch::channel(String::new());
        markers.push(marker_tx);
        let seen = seen_tx.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Reply::Screen { text }) = protocol::read::<Reply, _>(&mut read).await {
                let marker = marker_rx.borrow_and_update().clone();
                if !marker.is_empty() && text.contains(&marker) {
                    let _ = seen.send((i, std::time::Instant::now()));
                }
            }
        }));
        if i == 0 {
            writer = Some(write);
        } else {
            // Kept open: dropping it would detach this terminal.
            idle_writers.push(write);
        }
    }
    let mut write = writer.expect("one client at least");
    let send_key = |code: KeyCode| {
        let input = crate::host::protocol::Input::from_event(Event::Key(KeyEvent::new(
            code,
            KeyModifiers::NONE,
        )))
        .expect("a key is input");
        protocol::encode(&Request::Input { input })
    };
    use tokio::io::AsyncWriteExt;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut echo = Vec::new();
    for round in 0..rounds {
        // A letter no escape sequence or other text on screen holds.
        let marker = if round % 2 == 0 { "Q" } else { "Z" };
        for m in &markers {
            m.send_replace(marker.to_string());
        }
        let code = KeyCode::Char(marker.chars().next().expect("one letter"));
        let sent = std::time::Instant::now();
        write
            .write_all(&send_key(code))
            .await
            .map_err(bench_error)?;
        for at in seen_by_all(&mut seen_rx, clients).await {
            echo.push(at.duration_since(sent).as_secs_f64() * 1e3);
        }
        write
            .write_all(&send_key(KeyCode::Backspace))
            .await
            .map_err(bench_error)?;
        // Past the ~30 frames/s cap, so that the key is drawn at once:
        // what is measured is the path, not the frame pacing.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in &markers {
        m.send_replace(format!("t{}", TOKENS - 1));
    }
    let sent = std::time::Instant::now();
    write
        .write_all(&send_key(KeyCode::Char('g')))
        .await
        .map_err(bench_error)?;
    write
        .write_all(&send_key(KeyCode::Enter))
        .await
        .map_err(bench_error)?;
    let delivered = seen_by_all(&mut seen_rx, clients).await;
    let slowest = delivered.iter().max().copied().unwrap_or(sent);
    for r in readers {
        r.abort();
    }
    drop(idle_writers);
    echo.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        echo.get(((echo.len() as f64 * q) as usize).min(echo.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(ScreenFigures {
        clients,
        echo_p50_ms: pick(0.5),
        echo_p99_ms: pick(0.99),
        tokens_per_s_per_client: if delivered.len() == clients {
            TOKENS as f64 / slowest.duration_since(sent).as_secs_f64()
        } else {
            f64::NAN
        },
    })
}

/// When each of `n` terminals reported its marker (fewer after 10 s).
async fn seen_by_all(
    seen: &mut mpsc::UnboundedReceiver<(usize, std::time::Instant)>,
    n: usize,
) -> Vec<std::time::Instant> {
    let mut at = Vec::with_capacity(n);
    while at.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
            Ok(Some((_, t))) => at.push(t),
            _ => break,
        }
    }
    at
}

/// `kiln bench --daemon`: the daemon's own actor, framing and socket, with
/// an event source in place of an agent. Latency is from publishing an event
/// to a client having decoded it, at 1,000 events/s; throughput publishes as
/// fast as the actor takes them.
pub async fn bench_delivery(clients: usize, events: usize) -> Result<DeliveryFigures> {
    let dir = tempfile::tempdir().map_err(|e| KilnError::io("temporary folder", e))?;
    let path = dir.path().join("daemon.sock");
    let listener = bind(&path)?;
    let engine = crate::engine::fake::FakeEngine::new(Vec::<String>::new());
    let actor = bench_actor(
        listener,
        crate::engine::spawn(engine),
        &Paths::under(dir.path()),
        None,
    );
    let mut figures = Vec::new();
    for (round, paced) in [("latency", true), ("throughput", false)] {
        let id = format!("bench-{round}");
        actor.open(id.clone());
        let mut readers = Vec::new();
        for _ in 0..clients {
            let mut s = UnixStream::connect(&path)
                .await
                .map_err(|e| KilnError::io("bench client", e))?;
            protocol::write(&mut s, &Request::Attach { id: id.clone() })
                .await
                .map_err(|e| KilnError::io("bench client", e))?;
            let _snapshot: Reply = protocol::read(&mut s)
                .await
                .map_err(|e| KilnError::Store(e.to_string()))?;
            readers.push(tokio::spawn(async move {
                let mut got = Vec::with_capacity(events);
                while got.len() < events {
                    match protocol::read::<Reply, _>(&mut s).await {
                        Ok(Reply::Event { .. }) => got.push(std::time::Instant::now()),
                        // Fell behind and was resynced: the snapshot delivers
                        // what was missed, now.
                        Ok(Reply::Snapshot {
                            dropped,
                            events: all,
                            ..
                        }) => {
                            let now = std::time::Instant::now();
                            let total = dropped as usize + all.len();
                            got.resize(total.max(got.len()), now);
                        }
                        _ => break,
                    }
                }
                got
            }));
        }
        let start = std::time::Instant::now();
        let mut sent = Vec::with_capacity(events);
        for i in 0..events {
            sent.push(std::time::Instant::now());
            actor.progress(id.clone(), Progress::Resumed);
            if paced {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else if i % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut latencies = Vec::new();
        let mut last = start;
        for r in readers {
            let got = r.await.map_err(|e| KilnError::Engine(e.to_string()))?;
            for (i, at) in got.iter().enumerate() {
                latencies.push(at.duration_since(sent[i]).as_secs_f64() * 1e6);
                last = last.max(*at);
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pick =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        figures.push((
            pick(0.5),
            pick(0.99),
            events as f64 / last.duration_since(start).as_secs_f64(),
        ));
    }
    Ok(DeliveryFigures {
        clients,
        events,
        latency_p50_us: figures[0].0,
        latency_p99_us: figures[0].1,
        throughput_per_client: figures[1].2,
    })
}
