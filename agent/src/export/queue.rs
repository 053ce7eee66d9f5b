//! The export queue: spans between the pipeline and the export task, bounded by their
//! encoded size, by their age and (when asked) by their number, each span leaving it
//! counted exactly once: exported, or dropped with a [`DropReason`].
//!
//! Shaped after the OpenTelemetry Collector's sending queue. Offering a span never
//! blocks the pipeline: a span past a bound is dropped and counted at once. The export
//! task takes batches from the front; a batch it is sending, or retrying while the
//! receiver is down, still counts against the bounds until it is settled. Spans leave
//! in the order they came, so the oldest are at the front and expiry looks only there.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::QueueConfig;
use crate::telemetry::{DropReason, Metrics};

/// How often a producer waiting for room looks again on its own (room also comes when
/// queued spans expire, which nobody else may be there to notice).
const ROOM_RECHECK: Duration = Duration::from_millis(500);

/// One queued span, in the form its sink sends it.
pub(super) struct Entry<T> {
    pub item: T,
    /// Encoded size in bytes, what the queue is bounded by.
    pub size: usize,
    pub enqueued: Instant,
}

/// How a taken span ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Exported,
    Dropped(DropReason),
}

pub(super) struct Queue<T> {
    state: Mutex<State<T>>,
    /// Wakes the export task: the first span of a batch came, a batch is full, or the
    /// queue closed.
    arrived: Notify,
    /// Wakes producers waiting for room ([`Queue::offer_waiting`]).
    room: Condvar,
    limits: QueueConfig,
    batch_size: usize,
    metrics: Arc<Metrics>,
}

struct State<T> {
    entries: VecDeque<Entry<T>>,
    /// Spans the export task took in a batch and has not settled yet.
    taken: usize,
    /// Encoded bytes of `entries` and of the taken spans.
    bytes: usize,
    closed: bool,
}

impl<T> Queue<T> {
    pub fn new(limits: QueueConfig, batch_size: usize, metrics: Arc<Metrics>) -> Self {
        let batch_size = batch_size
            .max(1)
            .min(limits.max_spans.unwrap_or(usize::MAX));
        Queue {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                taken: 0,
                bytes: 0,
                closed: false,
            }),
            arrived: Notify::new(),
            room: Condvar::new(),
            limits,
            batch_size,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Queues `item`, `size` bytes encoded, or drops and counts it when it does not fit
    /// or the queue is closed. Never blocks.
    pub fn offer(&self, item: T, size: usize) {
        self.push(item, size, false);
    }

    /// Like [`Queue::offer`], but waits while the queue is full instead of dropping.
    /// Blocks the calling thread: never call it from the runtime's own threads.
    pub fn offer_waiting(&self, item: T, size: usize) {
        self.push(item, size, true);
    }

    fn push(&self, item: T, size: usize, wait: bool) {
        let mut state = self.lock();
        loop {
            if state.closed {
                drop(state);
                self.metrics.spans_dropped.add(DropReason::Shutdown, 1);
                return;
            }
            if self.fits(&state, size) {
                break;
            }
            if self.expire_front(&mut state, Instant::now()) > 0 && self.fits(&state, size) {
                break;
            }
            if !wait || size > self.limits.max_bytes {
                drop(state);
                self.metrics.spans_dropped.add(DropReason::QueueFull, 1);
                return;
            }
            state = self
                .room
                .wait_timeout(state, ROOM_RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.entries.push_back(Entry {
            item,
            size,
            enqueued: Instant::now(),
        });
        state.bytes += size;
        self.publish(&state);
        let queued = state.entries.len();
        drop(state);
        // The task sleeps until a batch's first span has waited long enough, or until
        // the batch is full; other arrivals need not wake it.
        if queued == 1 || queued == self.batch_size {
            self.arrived.notify_one();
        }
    }

    /// The next batch, oldest first: up to the batch size once that many are queued
    /// or the oldest has waited `delay`, and whatever is queued once the queue is
    /// closed. `None` when the queue is closed and empty. The batch stays counted
    /// against the bounds until [`Queue::settle`].
    pub async fn next_batch(&self, delay: Duration) -> Option<Vec<Entry<T>>> {
        loop {
            let due = {
                let mut state = self.lock();
                let now = Instant::now();
                self.expire_front(&mut state, now);
                let due = state.entries.front().map(|e| e.enqueued + delay);
                let ready = state.entries.len() >= self.batch_size
                    || (state.closed && !state.entries.is_empty())
                    || due.is_some_and(|due| due <= now);
                if ready {
                    let n = state.entries.len().min(self.batch_size);
                    let batch: Vec<_> = state.entries.drain(..n).collect();
                    state.taken += n;
                    return Some(batch);
                }
                if state.closed {
                    return None;
                }
                due
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = self.arrived.notified() => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => self.arrived.notified().await,
            }
        }
    }

    /// Counts `spans` taken spans as `outcome` and gives back `bytes` of room.
    pub fn settle(&self, outcome: Outcome, spans: usize, bytes: usize) {
        let mut state = self.lock();
        debug_assert!(spans <= state.taken && bytes <= state.bytes);
        state.taken = state.taken.saturating_sub(spans);
        state.bytes = state.bytes.saturating_sub(bytes);
        let n = spans as u64;
        match outcome {
            Outcome::Exported => Metrics::add(&self.metrics.spans_exported, n),
            Outcome::Dropped(reason) => self.metrics.spans_dropped.add(reason, n),
        }
        self.publish(&state);
        drop(state);
        self.room.notify_all();
    }

    /// Drops and counts queued spans past the age bound. The export task calls it
    /// while it waits for a receiver that is down.
    pub fn expire_queued(&self) {
        let mut state = self.lock();
        if self.expire_front(&mut state, Instant::now()) > 0 {
            drop(state);
            self.room.notify_all();
        }
    }

    /// Takes no more spans: later offers are dropped and counted as `shutdown`; the
    /// export task empties the queue and ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_one();
        self.room.notify_all();
    }

    /// For a shutdown that ran out of time, after the export task was stopped: counts
    /// every span still queued or taken as dropped (`shutdown`) and answers how many.
    pub fn abandon(&self) -> u64 {
        let mut state = self.lock();
        let lost = (state.entries.len() + state.taken) as u64;
        state.entries.clear();
        state.taken = 0;
        state.bytes = 0;
        state.closed = true;
        self.metrics.spans_dropped.add(DropReason::Shutdown, lost);
        self.publish(&state);
        drop(state);
        self.room.notify_all();
        lost
    }

    fn fits(&self, state: &State<T>, size: usize) -> bool {
        state.bytes + size <= self.limits.max_bytes
            && self
                .limits
                .max_spans
                .is_none_or(|max| state.entries.len() + state.taken < max)
    }

    /// Drops and counts the queued spans older than the age bound; answers how many.
    fn expire_front(&self, state: &mut State<T>, now: Instant) -> usize {
        let Some(cutoff) = now.checked_sub(self.limits.max_age) else {
            return 0;
        };
        let mut expired = 0;
        while let Some(entry) = state.entries.front() {
            if entry.enqueued > cutoff {
                break;
            }
            state.bytes -= entry.size;
            state.entries.pop_front();
            expired += 1;
        }
        if expired > 0 {
            self.metrics
                .spans_dropped
                .add(DropReason::Expired, expired as u64);
            self.publish(state);
        }
        expired
    }

    fn publish(&self, state: &State<T>) {
        use std::sync::atomic::Ordering::Relaxed;
        let spans = (state.entries.len() + state.taken) as u64;
        self.metrics.export_queue_spans.store(spans, Relaxed);
        self.metrics
            .export_queue_bytes
            .store(state.bytes as u64, Relaxed);
    }

    /// A panic elsewhere while the lock was held leaves the state consistent (every
    /// update under the lock is a few plain assignments), so a poisoned lock is used
    /// as it is rather than stopping the pipeline.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_bytes: usize, max_age: Duration, max_spans: Option<usize>) -> Queue<u32> {
        Queue::new(
            QueueConfig {
                max_bytes,
                max_age,
                max_spans,
            },
            4,
            Arc::new(Metrics::default()),
        )
    }

    fn items(batch: &[Entry<u32>]) -> Vec<u32> {
        batch.iter().map(|e| e.item).collect()
    }

    #[tokio::test]
    async fn the_byte_bound_drops_what_does_not_fit_and_counts_it() {
        let q = queue(100, Duration::from_secs(60), None);
        q.offer(1, 60);
        q.offer(2, 50); // 110 > 100
        q.offer(3, 40); // exactly 100
        q.offer(4, 1);
        let m = &q.metrics;
        assert_eq!(m.spans_dropped.get(DropReason::QueueFull), 2);
        assert_eq!(
            m.export_queue_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            100
        );
        q.close();
        let batch = q.next_batch(Duration::ZERO).await.unwrap();
        assert_eq!(items(&batch), [1, 3]);
        // Taken but not settled: still no room.
        q.offer(5, 1);
        assert_eq!(m.spans_dropped.get(DropReason::Shutdown), 1);
        q.settle(Outcome::Exported, 2, 100);
        assert_eq!(
            m.spans_exported.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            m.export_queue_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert!(q.next_batch(Duration::ZERO).await.is_none());
    }

    #[tokio::test]
    async fn a_taken_batch_keeps_its_room_until_settled() {
        let q = queue(100, Duration::from_secs(60), None);
        q.offer(1, 100);
        let batch = q.next_batch(Duration::ZERO).await.unwrap();
        assert_eq!(items(&batch), [1]);
        q.offer(2, 1);
        assert_eq!(q.metrics.spans_dropped.get(DropReason::QueueFull), 1);
        q.settle(Outcome::Dropped(DropReason::Rejected), 1, 100);
        q.offer(3, 100);
        assert_eq!(q.metrics.spans_dropped.get(DropReason::Rejected), 1);
        assert_eq!(items(&q.next_batch(Duration::ZERO).await.unwrap()), [3]);
    }

    #[tokio::test]
    async fn the_count_bound_applies_only_when_set() {
        let q = queue(1 << 20, Duration::from_secs(60), Some(2));
        for i in 0..5 {
            q.offer(i, 1);
        }
        assert_eq!(q.metrics.spans_dropped.get(DropReason::QueueFull), 3);
        let q = queue(1 << 20, Duration::from_secs(60), None);
        for i in 0..5000 {
            q.offer(i, 1);
        }
        assert_eq!(q.metrics.spans_dropped.total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spans_past_the_age_bound_expire_oldest_first() {
        let q = queue(1 << 20, Duration::from_secs(10), None);
        q.offer(1, 10);
        tokio::time::advance(Duration::from_secs(6)).await;
        q.offer(2, 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        q.expire_queued();
        assert_eq!(q.metrics.spans_dropped.get(DropReason::Expired), 1);
        assert_eq!(
            q.metrics
                .export_queue_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            10
        );
        assert_eq!(items(&q.next_batch(Duration::ZERO).await.unwrap()), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_room_by_expiring_before_it_drops() {
        let q = queue(10, Duration::from_secs(10), None);
        q.offer(1, 10);
        tokio::time::advance(Duration::from_secs(11)).await;
        q.offer(2, 10);
        let m = &q.metrics;
        assert_eq!(m.spans_dropped.get(DropReason::Expired), 1);
        assert_eq!(m.spans_dropped.get(DropReason::QueueFull), 0);
        assert_eq!(items(&q.next_batch(Duration::ZERO).await.unwrap()), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_its_delay_or_its_size() {
        let q = Arc::new(queue(1 << 20, Duration::from_secs(60), None));
        q.offer(1, 1);
        let started = Instant::now();
        let batch = q.next_batch(Duration::from_secs(1)).await.unwrap();
        assert_eq!(items(&batch), [1]);
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        // A full batch goes at once, and only the batch size is taken.
        for i in 2..8 {
            q.offer(i, 1);
        }
        let started = Instant::now();
        let batch = q.next_batch(Duration::from_secs(1)).await.unwrap();
        assert_eq!(items(&batch), [2, 3, 4, 5]);
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A closed queue hands out the rest without waiting, then says it is done.
        q.close();
        assert_eq!(
            items(&q.next_batch(Duration::from_secs(1)).await.unwrap()),
            [6, 7]
        );
        assert!(q.next_batch(Duration::from_secs(1)).await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_producer_gets_room_when_a_batch_is_settled() {
        let q = Arc::new(queue(10, Duration::from_secs(60), None));
        q.offer(1, 10);
        let producer = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || q.offer_waiting(2, 10))
        };
        let batch = q.next_batch(Duration::ZERO).await.unwrap();
        assert_eq!(items(&batch), [1]);
        q.settle(Outcome::Exported, 1, 10);
        tokio::task::spawn_blocking(move || producer.join().unwrap())
            .await
            .unwrap();
        assert_eq!(items(&q.next_batch(Duration::ZERO).await.unwrap()), [2]);
        assert_eq!(q.metrics.spans_dropped.total(), 0);
        // A span larger than the whole queue can never fit: dropped, not waited for.
        q.offer_waiting(3, 11);
        assert_eq!(q.metrics.spans_dropped.get(DropReason::QueueFull), 1);
    }

    #[tokio::test]
    async fn abandoning_counts_queued_and_taken_spans_as_shutdown() {
        let q = queue(1 << 20, Duration::from_secs(60), None);
        for i in 0..6 {
            q.offer(i, 1);
        }
        let _taken = q.next_batch(Duration::ZERO).await.unwrap();
        assert_eq!(q.abandon(), 6);
        assert_eq!(q.metrics.spans_dropped.get(DropReason::Shutdown), 6);
        q.offer(7, 1);
        assert_eq!(q.metrics.spans_dropped.get(DropReason::Shutdown), 7);
    }
}
