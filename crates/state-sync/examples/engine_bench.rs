//! Engine micro-benchmarks; prints one JSON object per workload.
//!
//! ```text
//! cargo run --release -p state-sync --example engine_bench
//! ```
//!
//! - `stale_storm`: 1 000 000 invalidations at or below the local revision
//!   1000 (none may fetch), each built in the loop as the JavaScript
//!   engine's benchmark does (`{topic, revision: String(i % 1000)}`); also
//!   with the revision given as a number, through the gate alone with
//!   prebuilt events, and the text alone (`text_ns_per_event`: formatting
//!   and reading back the revision, no event delivered);
//! - `burst`: 100 000 publishes, each with its invalidation, until the
//!   replica has the last one — the cost of coalescing;
//! - `fanout`: 10 000 handles on one source, 20 updates each awaited until
//!   every handle applied it; plus the resident memory of an idle handle.
//!   `fanout_on_delivery`: the same with each handle refreshing inside the
//!   publish (`SyncHandleBuilder::refresh_on_delivery`), not on its worker;
//! - `baseline_clone`: cloning one event per iteration, the floor any
//!   event-passing design pays, measured in the same run for comparison;
//! - `baseline_spawn_watch`: per handle and update, one spawned task that
//!   sends on a `watch` channel, awaited — the floor of fan-out through one
//!   Tokio task per replica, measured in the same run;
//! - `baseline_parked_wake`: one parked task per handle, woken through a
//!   flag and an `AtomicWaker`, that stores the revision and wakes its
//!   waiter — the floor of the engine's own design, with nothing of a
//!   refresh in it.
//!
//! `engine_bench fanout_only N` runs only the engine's fan-out, on one
//! thread, with `N` updates: for instruction and cache-miss counts, where
//! the difference between runs with two values of `N` (under
//! `valgrind --tool=cachegrind`) is the cost of the updates alone.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use state_sync::{
    BoxError, FetchError, FetchRequest, Fetched, InvalidationEvent, InvalidationSink, MemorySource,
    Provider, Revision, Subscriber, Subscription, SyncHandle, Topic, applier,
};

/// Counts fetches on the way to the real provider.
#[derive(Clone)]
struct Counting<P> {
    inner: P,
    fetches: Arc<AtomicU64>,
}

impl<P: Provider> Provider for Counting<P> {
    type Data = P::Data;

    async fn fetch(&self, request: &FetchRequest) -> Result<Fetched<P::Data>, FetchError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.inner.fetch(request).await
    }

    fn fetch_now(&self, request: &FetchRequest) -> Option<Fetched<P::Data>> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.inner.fetch_now(request)
    }
}

/// Hands the sink to the benchmark so it can deliver events directly.
#[derive(Clone, Default)]
struct Capture(Arc<OnceLock<InvalidationSink>>);

impl Subscriber for Capture {
    async fn subscribe(&self, _: &Topic, sink: InvalidationSink) -> Result<Subscription, BoxError> {
        let _ = self.0.set(sink);
        Ok(Subscription::noop())
    }
}

fn noop_applier() -> impl state_sync::Applier<u64> {
    applier::from_fn(|_s: state_sync::SnapshotEnvelope<u64>| Ok::<_, std::convert::Infallible>(()))
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

async fn stale_storm() -> Result<(), BoxError> {
    const EVENTS: u64 = 1_000_000;
    let topic = Topic::new("bench")?;
    let source = MemorySource::new(topic.clone(), 0u64);
    for i in 1..=1000 {
        source.publish(i);
    }
    let fetches = Arc::new(AtomicU64::new(0));
    let capture = Capture::default();
    let provider = Counting {
        inner: source.clone(),
        fetches: fetches.clone(),
    };
    let handle =
        SyncHandle::from_parts(topic.clone(), capture.clone(), provider, noop_applier()).build();
    handle.start().await?;
    assert_eq!(handle.local_revision(), Revision::new(1000));
    let sink = capture.0.get().ok_or("not subscribed")?.clone();
    let events: Vec<_> = (0..=1000u64)
        .map(|r| InvalidationEvent::new(topic.clone(), Revision::new(r)))
        .collect();

    let t = Instant::now();
    for i in 0..EVENTS {
        sink.deliver(black_box(&events[(i % 1001) as usize]));
    }
    let gate_ns = t.elapsed().as_nanos() as f64 / EVENTS as f64;

    // As the JavaScript workload does: each event built in the loop, its
    // revision read from decimal text (`String(i % 1000)`).
    let t = Instant::now();
    let mut text = itoa::Buffer::new();
    for i in 0..EVENTS {
        let revision: Revision = text.format(black_box(i % 1000)).parse()?;
        sink.deliver(&InvalidationEvent::new(topic.clone(), revision));
    }
    let built_ns = t.elapsed().as_nanos() as f64 / EVENTS as f64;

    // The text alone, no event delivered: how much of `built_ns` is the
    // workload's `String(i % 1000)` and reading it back.
    let t = Instant::now();
    for i in 0..EVENTS {
        black_box(text.format(black_box(i % 1000)).parse::<Revision>()?);
    }
    let text_ns = t.elapsed().as_nanos() as f64 / EVENTS as f64;

    // The same with the revision given as a number, as Rust transports
    // hand it over.
    let t = Instant::now();
    for i in 0..EVENTS {
        let revision = Revision::new(black_box(i % 1000));
        sink.deliver(&InvalidationEvent::new(topic.clone(), revision));
    }
    let typed_ns = t.elapsed().as_nanos() as f64 / EVENTS as f64;

    let t = Instant::now();
    for i in 0..EVENTS {
        black_box(black_box(&events[(i % 1001) as usize]).clone());
    }
    let clone_ns = t.elapsed().as_nanos() as f64 / EVENTS as f64;

    tokio::task::yield_now().await;
    let extra_fetches = fetches.load(Ordering::Relaxed) - 1;
    assert_eq!(extra_fetches, 0, "a stale event caused a fetch");
    println!(
        r#"{{"workload":"stale_storm","events":{EVENTS},"ns_per_event":{built_ns:.2},"typed_ns_per_event":{typed_ns:.2},"text_ns_per_event":{text_ns:.2},"gate_only_ns_per_event":{gate_ns:.2},"fetches":{extra_fetches}}}"#
    );
    println!(
        r#"{{"workload":"baseline_clone","events":{EVENTS},"ns_per_event":{clone_ns:.2},"ratio_stale_storm_to_baseline":{:.2}}}"#,
        gate_ns / clone_ns
    );
    handle.stop().await;
    Ok(())
}

async fn burst() -> Result<(), BoxError> {
    const EVENTS: u64 = 100_000;
    let topic = Topic::new("bench")?;
    let source = MemorySource::new(topic.clone(), 0u64);
    let fetches = Arc::new(AtomicU64::new(0));
    let provider = Counting {
        inner: source.clone(),
        fetches: fetches.clone(),
    };
    let handle = SyncHandle::from_parts(topic, source.clone(), provider, noop_applier()).build();
    handle.start().await?;
    fetches.store(0, Ordering::Relaxed);

    let t = Instant::now();
    let mut last = Revision::ZERO;
    for i in 1..=EVENTS {
        last = source.publish(i);
    }
    handle.wait_for_revision(last).await?;
    let elapsed = t.elapsed();
    println!(
        r#"{{"workload":"burst","events":{EVENTS},"ms":{:.2},"ns_per_event":{:.1},"fetches":{}}}"#,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_nanos() as f64 / EVENTS as f64,
        fetches.load(Ordering::Relaxed)
    );
    handle.stop().await;
    Ok(())
}

async fn fanout(runtime: &str) -> Result<(), BoxError> {
    const UPDATES: u64 = 20;
    let (per, bytes_per_handle) = engine_fanout(UPDATES, false).await?;
    println!(
        r#"{{"workload":"fanout","runtime":"{runtime}","handles":{HANDLES},"updates":{UPDATES},"us_per_update_per_handle":{per:.3},"bytes_per_handle":{bytes_per_handle:.0}}}"#
    );
    let (on_delivery, _) = engine_fanout(UPDATES, true).await?;
    println!(
        r#"{{"workload":"fanout_on_delivery","runtime":"{runtime}","handles":{HANDLES},"updates":{UPDATES},"us_per_update_per_handle":{on_delivery:.3}}}"#
    );
    // Measured after the engine's run so they do not skew its memory figure.
    let baseline = spawn_watch_baseline().await?;
    println!(
        r#"{{"workload":"baseline_spawn_watch","runtime":"{runtime}","us_per_update_per_handle":{baseline:.3},"ratio_fanout_to_baseline":{:.2}}}"#,
        per / baseline
    );
    let floor = parked_wake_baseline().await;
    println!(
        r#"{{"workload":"baseline_parked_wake","runtime":"{runtime}","us_per_update_per_handle":{floor:.3},"ratio_fanout_to_baseline":{:.2}}}"#,
        per / floor
    );
    Ok(())
}

const HANDLES: usize = 10_000;

/// 10 000 started handles on one source, `updates` updates each awaited
/// on all; with `on_delivery`, each handle refreshes inside the publish
/// (`SyncHandleBuilder::refresh_on_delivery`). Returns µs per handle per
/// update, and resident bytes per idle handle.
async fn engine_fanout(updates: u64, on_delivery: bool) -> Result<(f64, f64), BoxError> {
    let topic = Topic::new("bench")?;
    let source = MemorySource::new(topic.clone(), 0u64);

    let rss_before = rss_bytes();
    let mut handles = Vec::with_capacity(HANDLES);
    for _ in 0..HANDLES {
        let h = SyncHandle::from_parts(
            topic.clone(),
            source.clone(),
            source.clone(),
            noop_applier(),
        )
        .refresh_on_delivery(on_delivery)
        .build();
        h.start().await?;
        handles.push(h);
    }
    let bytes_per_handle = rss_bytes().saturating_sub(rss_before) as f64 / HANDLES as f64;

    let t = Instant::now();
    for i in 1..=updates {
        let r = source.publish(i);
        for h in &handles {
            h.wait_for_revision(r).await?;
        }
    }
    let per = t.elapsed().as_nanos() as f64 / 1e3 / (HANDLES as f64 * updates.max(1) as f64);
    for h in &handles {
        h.stop().await;
    }
    Ok((per, bytes_per_handle))
}

/// One parked task per handle, as the engine has: woken through a flag
/// and an `AtomicWaker`, it stores the published revision and wakes the
/// waiter, if any. Returns µs per handle per update.
async fn parked_wake_baseline() -> f64 {
    const UPDATES: u64 = 20;
    #[derive(Default)]
    struct Slot {
        woken: AtomicBool,
        waker: futures::task::AtomicWaker,
        revision: AtomicU64,
        waiters: AtomicUsize,
        applied: tokio::sync::Notify,
    }
    let source = Arc::new(AtomicU64::new(0));
    let slots: Vec<Arc<Slot>> = (0..HANDLES).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = slots
        .iter()
        .map(|slot| {
            let (slot, source) = (slot.clone(), source.clone());
            tokio::spawn(async move {
                loop {
                    std::future::poll_fn(|cx| {
                        if slot.woken.swap(false, Ordering::AcqRel) {
                            return std::task::Poll::Ready(());
                        }
                        slot.waker.register(cx.waker());
                        if slot.woken.swap(false, Ordering::AcqRel) {
                            std::task::Poll::Ready(())
                        } else {
                            std::task::Poll::Pending
                        }
                    })
                    .await;
                    slot.revision
                        .store(source.load(Ordering::Acquire), Ordering::Release);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if slot.waiters.load(Ordering::SeqCst) > 0 {
                        slot.applied.notify_waiters();
                    }
                }
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let t = Instant::now();
    for update in 1..=UPDATES {
        source.store(update, Ordering::Release);
        for slot in &slots {
            slot.woken.store(true, Ordering::Release);
            slot.waker.wake();
        }
        for slot in &slots {
            loop {
                let applied = slot.applied.notified();
                slot.waiters.fetch_add(1, Ordering::SeqCst);
                let done = slot.revision.load(Ordering::Acquire) >= update;
                if !done {
                    applied.await;
                }
                slot.waiters.fetch_sub(1, Ordering::SeqCst);
                if done {
                    break;
                }
            }
        }
    }
    let per = t.elapsed().as_nanos() as f64 / 1e3 / (HANDLES as f64 * UPDATES as f64);
    for task in tasks {
        task.abort();
    }
    per
}

/// The fan-out floor: one task spawn and one `watch` send per handle and
/// update. Returns µs per handle per update.
async fn spawn_watch_baseline() -> Result<f64, BoxError> {
    const HANDLES: usize = 10_000;
    const UPDATES: u64 = 20;
    let senders: Vec<_> = (0..HANDLES)
        .map(|_| Arc::new(tokio::sync::watch::channel(0u64).0))
        .collect();
    let t = Instant::now();
    for i in 0..UPDATES {
        let mut tasks = Vec::with_capacity(HANDLES);
        for s in &senders {
            let s = s.clone();
            tasks.push(tokio::spawn(async move { s.send_modify(|v| *v = i) }));
        }
        for task in tasks {
            task.await?;
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / 1e3 / (HANDLES as f64 * UPDATES as f64))
}

fn main() -> Result<(), BoxError> {
    // `engine_bench current_thread|multi_thread` runs only that fan-out,
    // `engine_bench burst|stale` only the burst or the stale storm, 20 times
    // (for profiling).
    let only = std::env::args().nth(1);
    if only.as_deref() == Some("fanout_only") {
        let updates = std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .ok_or("usage: engine_bench fanout_only <updates>")?;
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let (per, _) = engine_fanout(updates, false).await?;
                println!(r#"{{"workload":"fanout","updates":{updates},"us_per_update_per_handle":{per:.3}}}"#);
                Ok(())
            });
    }
    if only.as_deref() == Some("stale") {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                for _ in 0..20 {
                    stale_storm().await?;
                }
                Ok(())
            });
    }
    if only.as_deref() == Some("current_thread") {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(fanout("current_thread"));
    }
    if only.as_deref() == Some("multi_thread") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return rt.block_on(async { tokio::spawn(fanout("multi_thread(2)")).await? });
    }
    if only.as_deref() == Some("burst") {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                for _ in 0..20 {
                    tokio::spawn(burst()).await??;
                }
                Ok(())
            });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Run on a worker thread, as application code would: tasks spawned from
    // there go to the local run queue.
    rt.block_on(async {
        tokio::spawn(async {
            stale_storm().await?;
            burst().await?;
            fanout("multi_thread(2)").await
        })
        .await?
    })?;
    // The same fan-out on one thread: no cross-thread wake-ups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fanout("current_thread"))
}
