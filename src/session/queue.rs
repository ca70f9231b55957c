//! Each optimizer's queue of steps (TrainSteps), and the runner that applies
//! them one after another on a blocking thread. The queue knows a step only
//! as a [`StepCall`]: training ([`crate::training`]) says what one computes.
//!
//! A pipelining client keeps several numbered TrainSteps in flight; the
//! server decodes them concurrently, but an optimizer applies one update at a
//! time. Instead of each call waiting on the async side for its turn and then
//! handing its computation to the blocking pool and back (two thread
//! hand-offs and a wake-up per step, a tenth of an MLP step), a call queues
//! itself and awaits its answer; one runner thread per busy optimizer takes
//! the queued step whose turn it is, computes and commits it, answers, and
//! goes straight on to the next.
//!
//! Invariants:
//! - at most one runner per optimizer (`running`); it holds the optimizer's
//!   step lock while it runs a step, taking locks in the same order as every
//!   other updating call (steps, then layers in id order, then a compute
//!   slot), so it cannot deadlock with them;
//! - a numbered call (`x-layerd-after-steps: N`) runs only when the count is
//!   N; it fails with STEP_OUT_OF_ORDER, changing nothing, as soon as the
//!   count is past N (at submission, or when the count moves past it while
//!   it waits) — unless it is a retry of the update just applied
//!   ([`Optimizer::retried`]), which gets that update's answer again;
//!   unnumbered calls run in arrival order when no numbered call is due;
//! - whoever moves the count ([`Optimizer::set_count`]: a Step, an import,
//!   the runner) wakes the queue ([`kick`]), so a call whose turn came is
//!   never left waiting without a runner;
//! - a call that goes away (cancelled, past its deadline) takes its entry
//!   out of the queue; if it was already running, its results are not
//!   committed — a step is applied only while its caller still waits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, MutexGuard as StateGuard};
use tracing::Span;

use super::{Applied, InstanceState, Optimizer, Steps};
use crate::error::Error;

/// A step to apply as its optimizer's next update.
pub trait StepCall: Send + 'static {
    type Answer: Send + 'static;

    /// Runs the step as update `steps.count + 1`, on this thread, under the
    /// optimizer's step lock and its layers' locks (`states`, in the
    /// optimizer's layer order); commits its results unless `abandoned()`
    /// says nobody waits for them any more.
    fn run(
        self,
        optimizer: &Arc<Optimizer>,
        steps: &mut Steps,
        states: &mut [StateGuard<'_, InstanceState>],
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Self::Answer, Error>;

    /// The answer of an earlier attempt of this call, applied as `applied`.
    fn replayed(applied: &Applied) -> Self::Answer;
}

/// What the runner does with a job.
enum Outcome<'a, 'b> {
    /// Run it (unless its caller went away) and answer.
    Run {
        optimizer: &'a Arc<Optimizer>,
        steps: &'a mut Steps,
        states: &'a mut [StateGuard<'b, InstanceState>],
    },
    /// Answer this error without running it.
    Fail(Error),
    /// Answer as this earlier attempt did, without running it.
    Replay(Arc<Applied>),
}

/// An optimizer's waiting TrainSteps.
#[derive(Default)]
pub struct StepQueue {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Numbered calls by (N, arrival).
    numbered: BTreeMap<(u64, u64), Job>,
    /// Unnumbered calls by arrival.
    unnumbered: BTreeMap<u64, Job>,
    arrivals: u64,
    /// Whether a runner is at work (or about to be).
    running: bool,
}

/// Where a call waits in the queue.
#[derive(Clone, Copy)]
enum Slot {
    Numbered(u64, u64),
    Unnumbered(u64),
}

/// A queued call with its answer's channel, its type erased.
struct Job {
    settle: Box<dyn for<'a, 'b> FnOnce(Outcome<'a, 'b>) + Send>,
    /// The request's fingerprint, to recognise a retry.
    request: u64,
    span: Span,
}

impl Job {
    fn new<C: StepCall>(
        call: C,
        request: u64,
        answer: oneshot::Sender<Result<C::Answer, Error>>,
    ) -> Job {
        let settle = move |outcome: Outcome<'_, '_>| match outcome {
            Outcome::Fail(error) => {
                let _ = answer.send(Err(error));
            }
            Outcome::Replay(applied) => {
                let _ = answer.send(Ok(C::replayed(&applied)));
            }
            Outcome::Run {
                optimizer,
                steps,
                states,
            } => {
                if answer.is_closed() {
                    return;
                }
                let result = call.run(optimizer, steps, states, &|| answer.is_closed());
                let _ = answer.send(result);
            }
        };
        Job {
            settle: Box::new(settle),
            request,
            span: Span::current(),
        }
    }
}

impl StepQueue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A runner that panicked left the queue consistent (it panics only
        // inside a step, with nothing of the queue borrowed).
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pending {
    fn remove(&mut self, slot: Slot) -> Option<Job> {
        match slot {
            Slot::Numbered(after, arrival) => self.numbered.remove(&(after, arrival)),
            Slot::Unnumbered(arrival) => self.unnumbered.remove(&arrival),
        }
    }

    /// The calls that can no longer run because the count is past them.
    fn take_stale(&mut self, count: u64) -> Vec<((u64, u64), Job)> {
        let due = self.numbered.split_off(&(count, 0));
        std::mem::replace(&mut self.numbered, due)
            .into_iter()
            .collect()
    }

    /// Whether a runner has something to do at `count`: a call to run, or
    /// one to fail because the count is past it.
    fn has_work(&self, count: u64) -> bool {
        self.numbered.range(..=(count, u64::MAX)).next().is_some() || !self.unnumbered.is_empty()
    }

    /// The next call to run at `count`: a numbered one due now first.
    fn take_due(&mut self, count: u64) -> Option<Job> {
        let numbered = self
            .numbered
            .range((count, 0)..=(count, u64::MAX))
            .next()
            .map(|(key, _)| *key);
        match numbered {
            Some(key) => self.numbered.remove(&key),
            None => self.unnumbered.pop_first().map(|(_, job)| job),
        }
    }
}

/// Queues `call` (`request`: its fingerprint) on `optimizer` and waits for
/// its answer.
pub async fn submit<C: StepCall>(
    optimizer: &Arc<Optimizer>,
    after: Option<u64>,
    request: u64,
    call: C,
) -> Result<C::Answer, Error> {
    let (answer, answered) = oneshot::channel();
    let job = Job::new(call, request, answer);
    let slot = {
        let mut pending = optimizer.queue.lock();
        let count = optimizer.committed_count();
        let arrival = pending.arrivals;
        pending.arrivals += 1;
        if let Some(after) = after {
            optimizer.check_not_lost(after)?;
        }
        let slot = match after {
            Some(after) if after < count => {
                return optimizer
                    .retried(after, request, count)
                    .map(|applied| C::replayed(&applied));
            }
            Some(after) => {
                pending.numbered.insert((after, arrival), job);
                Slot::Numbered(after, arrival)
            }
            None => {
                pending.unnumbered.insert(arrival, job);
                Slot::Unnumbered(arrival)
            }
        };
        start_if_due(optimizer, &mut pending, count);
        slot
    };
    let _leave = Leave { optimizer, slot };
    answered
        .await
        .map_err(|_| Error::Internal("the training step's runner stopped".into()))?
}

/// Takes a call's entry out of the queue when the call ends, so one that
/// was cancelled or timed out before its turn leaves nothing behind.
struct Leave<'a> {
    optimizer: &'a Arc<Optimizer>,
    slot: Slot,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        // Dropped after the lock is released: the call may hold the last
        // reference to its session.
        let job = self.optimizer.queue.lock().remove(self.slot);
        drop(job);
    }
}

/// Starts a runner if none is at work and a call can run at `count`.
pub fn kick(optimizer: &Arc<Optimizer>, count: u64) {
    let mut pending = optimizer.queue.lock();
    start_if_due(optimizer, &mut pending, count);
}

fn start_if_due(optimizer: &Arc<Optimizer>, pending: &mut Pending, count: u64) {
    if pending.running || !pending.has_work(count) {
        return;
    }
    pending.running = true;
    let optimizer = optimizer.clone();
    tokio::task::spawn_blocking(move || run(&optimizer));
}

/// The runner: applies due calls until none is left.
fn run(optimizer: &Arc<Optimizer>) {
    let _stopped = Stopped(optimizer);
    loop {
        let mut steps = optimizer.steps.blocking_lock();
        let (stale, job) = {
            let mut pending = optimizer.queue.lock();
            let stale = pending.take_stale(steps.count);
            let job = pending.take_due(steps.count);
            if job.is_none() {
                pending.running = false;
            }
            (stale, job)
        };
        for ((after, _), job) in stale {
            let outcome = optimizer.retried(after, job.request, steps.count);
            (job.settle)(outcome.map_or_else(Outcome::Fail, Outcome::Replay));
        }
        let Some(Job { settle, span, .. }) = job else {
            return;
        };
        span.in_scope(|| {
            let mut states = optimizer.lock_layers_blocking();
            settle(Outcome::Run {
                optimizer,
                steps: &mut steps,
                states: &mut states,
            });
        });
        drop(steps);
    }
}

/// Lets another runner start if this one panicked (its calls then answer
/// INTERNAL, their senders dropped).
struct Stopped<'a>(&'a Arc<Optimizer>);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.queue.lock().running = false;
        }
    }
}
