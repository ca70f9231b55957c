//! The order in which `ModelInfer` calls arrived on their connection, so that
//! the requests of one sequence take effect in that order.
//!
//! gRPC orders nothing between concurrent unary calls, and the server runs
//! each call as its own task: calls that arrive together may run in either
//! order (tokio tends to run the newest task first). A client that sends a
//! sequence's next request before the answer to the one before — perf_analyzer
//! does when it ends its sequences — would see its `sequence_end` close the
//! sequence under the request sent just before it, or find no sequence because
//! the `sequence_start` sent just before has not run yet. Triton's sequence
//! batcher runs a sequence's requests one at a time in arrival order; layerd
//! does the same for the calls of one connection.
//!
//! # How the order is known
//!
//! The service sees a request only on the request's own task, too late to
//! know when it arrived. But the service stack is copied on the connection's
//! task: tonic makes one copy per connection, and hyper-util's bridge to
//! hyper makes one copy of the connection's per request, as the request's
//! stream opens, in stream order (hyper's `Service::call` takes `&self`, a
//! tower service needs `&mut self`). [`Arrival`], the outermost layer, counts
//! those copies: the copy of the original is a connection's, and a copy of a
//! connection's is a request's, holding its [`Ticket`] from that moment. The
//! request's `call` moves the ticket into its extensions (only a `ModelInfer`
//! keeps it).
//!
//! # The rule
//!
//! - Once a call has read its parameters it [declares](Ticket::declare) its
//!   session, or that it has none.
//! - A call in a sequence then [waits its turn](Ticket::wait_turn): until
//!   every call that arrived before it on its connection has declared, and
//!   those in its own sequence have ended.
//! - A ticket is given back when its call ends, however it ends: it is dropped
//!   with the call (or with the unused copy of the service).
//!
//! The wait is bounded by [`MAX_ORDER_WAIT`], after which the call runs
//! anyway: the order is a courtesy to clients that pipeline, not a lock that a
//! stalled upload on a shared connection (a proxy may carry several clients on
//! one) could hold for long. Calls on different connections keep no order:
//! none is defined between them. Where the stack is not copied so (another
//! transport), calls carry no ticket and run as they come.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::Notify;
use tower::{Layer, Service};

// The calls that keep their ticket.
use super::wire::MODEL_INFER_PATH;

/// The longest a call waits for the calls that arrived before it.
pub const MAX_ORDER_WAIT: Duration = Duration::from_secs(1);

/// One connection's calls in progress, by arrival number.
#[derive(Default)]
struct Connection {
    calls: Mutex<Calls>,
    changed: Notify,
}

#[derive(Default)]
struct Calls {
    next: u64,
    in_progress: BTreeMap<u64, Declared>,
}

/// What a call in progress has said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Declared {
    /// Not yet: it has not been read, or parsed.
    Nothing,
    /// It works on this session until it ends.
    Session(String),
}

impl Connection {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        // Nothing panics while holding the lock; a poisoned one is still sound.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arrive(self: &Arc<Self>) -> Ticket {
        let mut calls = self.calls();
        let number = calls.next;
        calls.next += 1;
        calls.in_progress.insert(number, Declared::Nothing);
        Ticket(Arc::new(Held {
            connection: self.clone(),
            number,
        }))
    }

    /// Sets (or, with `None`, ends) what a call declared, and wakes waiters.
    fn set(&self, number: u64, declared: Option<Declared>) {
        {
            let mut calls = self.calls();
            match declared {
                Some(declared) => calls.in_progress.insert(number, declared),
                None => calls.in_progress.remove(&number),
            };
        }
        self.changed.notify_waiters();
    }

    /// Whether the call that arrived as `number`, on `session`, may go ahead.
    fn may_go(&self, number: u64, session: &str) -> bool {
        let calls = self.calls();
        calls
            .in_progress
            .range(..number)
            .all(|(_, declared)| match declared {
                Declared::Nothing => false,
                Declared::Session(other) => other != session,
            })
    }
}

/// A call's place in its connection's arrival order; given back when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Ticket(Arc<Held>);

struct Held {
    connection: Arc<Connection>,
    number: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.connection.set(self.number, None);
    }
}

impl Ticket {
    /// Says which session the call works on (`None`: none, and nothing waits
    /// for it from now on).
    pub fn declare(&self, session: Option<&str>) {
        let declared = session.map(|s| Declared::Session(s.to_string()));
        self.0.connection.set(self.0.number, declared);
    }

    /// Waits until the calls that arrived before this one on its connection
    /// have declared, and those on `session` have ended — at most
    /// [`MAX_ORDER_WAIT`]. Declare first: later calls wait for that.
    pub async fn wait_turn(&self, session: &str) {
        let Held { connection, number } = &*self.0;
        let deadline = tokio::time::Instant::now() + MAX_ORDER_WAIT;
        loop {
            // Registered before the check, so no change between the two is missed.
            let changed = connection.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if connection.may_go(*number, session) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::debug!(
                    session,
                    "ran before calls that arrived earlier: they took too long"
                );
                return;
            }
        }
    }
}

/// The tower layer that gives calls their [`Ticket`]; outermost.
#[derive(Clone, Copy, Default)]
pub struct ArrivalLayer;

impl<S> Layer<S> for ArrivalLayer {
    type Service = Arrival<S>;

    fn layer(&self, inner: S) -> Arrival<S> {
        Arrival {
            inner,
            role: Role::Original,
        }
    }
}

/// The service of [`ArrivalLayer`]: which copy of the stack this is tells
/// what it stands for (see the module's doc).
pub struct Arrival<S> {
    inner: S,
    role: Role,
}

enum Role {
    Original,
    Connection(Arc<Connection>),
    /// `None` once its call took the ticket.
    Request(Option<Ticket>),
}

impl<S: Clone> Clone for Arrival<S> {
    fn clone(&self) -> Self {
        let role = match &self.role {
            Role::Original => Role::Connection(Arc::default()),
            Role::Connection(connection) => Role::Request(Some(connection.arrive())),
            Role::Request(_) => Role::Request(None),
        };
        Arrival {
            inner: self.inner.clone(),
            role,
        }
    }
}

impl<S, B> Service<http::Request<B>> for Arrival<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Role::Request(ticket) = &mut self.role {
            // Other calls give theirs back here: no ModelInfer waits for them.
            if let Some(ticket) = ticket.take() {
                if request.uri().path() == MODEL_INFER_PATH {
                    request.extensions_mut().insert(ticket);
                }
            }
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_earlier_undeclared_calls_and_its_own_sequence() {
        let connection = Arc::new(Connection::default());
        let (first, second, third) = (
            connection.arrive(),
            connection.arrive(),
            connection.arrive(),
        );
        third.declare(Some("seq:1"));
        let turn = || connection.may_go(third.0.number, "seq:1");
        assert!(!turn(), "calls before it have not declared");
        first.declare(None);
        second.declare(Some("seq:2"));
        assert!(turn(), "another sequence is no reason to wait");
        second.declare(Some("seq:1"));
        let waiting = tokio::spawn({
            let third = third.clone();
            async move { third.wait_turn("seq:1").await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "the same sequence, arrived before, in progress"
        );
        drop(second);
        tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("woken when the earlier call ends")
            .unwrap();
        drop((first, third));
        assert!(
            connection.calls().in_progress.is_empty(),
            "tickets are given back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded() {
        let connection = Arc::new(Connection::default());
        let _stalled = connection.arrive();
        let later = connection.arrive();
        later.declare(Some("seq:1"));
        let started = tokio::time::Instant::now();
        later.wait_turn("seq:1").await;
        assert_eq!(started.elapsed(), MAX_ORDER_WAIT);
    }

    #[test]
    fn copies_of_the_stack_stand_for_a_connection_then_its_requests() {
        let original = ArrivalLayer.layer(());
        let connection = original.clone();
        let Role::Connection(calls) = &connection.role else {
            panic!("a copy of the original is a connection's");
        };
        let (first, second) = (connection.clone(), connection.clone());
        assert_eq!(
            calls.calls().in_progress.len(),
            2,
            "a copy per request, in order"
        );
        drop(first);
        assert_eq!(
            calls
                .calls()
                .in_progress
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [1],
            "an unused copy gives its ticket back"
        );
        drop(second);
        assert!(calls.calls().in_progress.is_empty());
    }
}
