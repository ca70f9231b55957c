//! The session store: the map of live sessions, its limit, and idle expiry.
//!
//! [`Store`] is a cheap-to-clone handle. A short `std::sync::Mutex` guards the
//! session map and the expiry queue; it is never held while computing.
//!
//! Expiry follows mini-redis: deadlines sit in an ordered set, and a purge task
//! sleeps until the earliest one or until a new session files an earlier one.
//! A call only moves its session's deadline (no reordering under the lock); the
//! purge task refiles entries whose deadline moved. A session past its
//! deadline answers NOT_FOUND even before the purge task has removed it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    sync::Notify,
    time::{sleep_until, Instant},
};

use super::budget::Budget;
use super::ids::{check_id, random_id};
use super::{Limits, Session};
use crate::auth::Principal;
use crate::error::Error;
use crate::metrics::{self, EndCause};

/// A handle on the session store.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// Owns the store's purge task: dropping it stops the task.
pub struct StoreGuard {
    store: Store,
}

pub(super) struct Shared {
    state: Mutex<State>,
    purge_wakeup: Notify,
    limits: Limits,
    total_kept: Arc<Budget>,
}

struct State {
    sessions: HashMap<String, Entry>,
    /// One `(filed deadline, id)` per live session.
    expirations: BTreeSet<(Instant, String)>,
    shutdown: bool,
}

struct Entry {
    session: Arc<Session>,
    /// When the session expires; moved forward by every call.
    deadline: Instant,
    /// The deadline under which it is filed in `expirations` (≤ `deadline`).
    filed: Instant,
}

impl Store {
    /// A new store with its purge task running on the current runtime.
    pub fn start(limits: Limits) -> StoreGuard {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sessions: HashMap::new(),
                expirations: BTreeSet::new(),
                shutdown: false,
            }),
            purge_wakeup: Notify::new(),
            total_kept: Arc::new(Budget::new(
                limits.max_total_kept_bytes,
                "--max-total-kept-bytes",
                true,
            )),
            limits,
        });
        tokio::spawn(purge_expired_sessions(shared.clone()));
        StoreGuard {
            store: Store { shared },
        }
    }

    /// Opens a session. `requested_id` `""` picks a random id; an idle timeout
    /// of 0 gets the default, one above the maximum gets the maximum.
    pub fn create(
        &self,
        owner: &Principal,
        requested_id: &str,
        idle_timeout_seconds: u32,
    ) -> Result<(String, Duration), Error> {
        let (id, idle_timeout, _) = self.open(owner, requested_id, idle_timeout_seconds, None)?;
        Ok((id, idle_timeout))
    }

    /// Opens session `id` of `owner` as it was saved (`--state-dir`): its idle
    /// timeout, and `remaining` of it before it expires. Returns the session
    /// itself: looking it up with [`Store::session`] would restart its idle
    /// time.
    pub fn reopen(
        &self,
        owner: &Principal,
        id: &str,
        idle_timeout_seconds: u32,
        remaining: Duration,
    ) -> Result<Arc<Session>, Error> {
        check_id("session_id", id)?;
        let (_, _, session) = self.open(owner, id, idle_timeout_seconds, Some(remaining))?;
        Ok(session)
    }

    /// Every live session with its owner and the idle time it has left.
    pub fn live_sessions(&self) -> Vec<(Principal, Arc<Session>, Duration)> {
        let now = Instant::now();
        let state = self.shared.lock_state();
        state
            .sessions
            .iter()
            .filter(|(_, entry)| entry.deadline > now)
            .map(|(key, entry)| {
                let owner = key.split('\0').next().unwrap_or_default();
                (
                    Principal::named(owner),
                    entry.session.clone(),
                    entry.deadline - now,
                )
            })
            .collect()
    }

    fn open(
        &self,
        owner: &Principal,
        requested_id: &str,
        idle_timeout_seconds: u32,
        remaining: Option<Duration>,
    ) -> Result<(String, Duration, Arc<Session>), Error> {
        let limits = &self.shared.limits;
        let requested = match idle_timeout_seconds {
            0 => limits.default_idle_timeout,
            s => Duration::from_secs(s.into()),
        };
        let idle_timeout = requested.min(limits.max_idle_timeout);
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut state = self.shared.lock_state();
        let (id, key) = if requested_id.is_empty() {
            loop {
                let id = random_id();
                let key = key(owner, &id);
                if !state.sessions.contains_key(&key) {
                    break (id, key);
                }
            }
        } else {
            check_id("session_id", requested_id)?;
            let key = key(owner, requested_id);
            if let Some(entry) = state.sessions.get(&key) {
                if entry.deadline > now {
                    return Err(Error::SessionExists {
                        session_id: requested_id.to_string(),
                    });
                }
                expired.extend(state.remove(&key));
                metrics::sessions_ended(EndCause::Idle, 1);
            }
            (requested_id.to_string(), key)
        };
        if state.sessions.len() >= limits.max_sessions {
            // Sessions past their deadline do not count against the limit.
            let before = expired.len();
            expired.extend(state.remove_expired(now));
            metrics::sessions_ended(EndCause::Idle, expired.len() - before);
            if state.sessions.len() >= limits.max_sessions {
                return Err(Error::LimitExceeded {
                    flag: "--max-sessions",
                    limit: limits.max_sessions.to_string(),
                    detail: format!("{} sessions are open", state.sessions.len()),
                });
            }
        }
        let session = Arc::new(Session::new(
            id.clone(),
            idle_timeout,
            limits,
            self.shared.total_kept.clone(),
        ));
        let deadline = now + remaining.map_or(idle_timeout, |r| r.min(idle_timeout));
        let wake_purge = state
            .expirations
            .first()
            .is_none_or(|(first, _)| deadline < *first);
        state.expirations.insert((deadline, key.clone()));
        state.sessions.insert(
            key,
            Entry {
                session: session.clone(),
                deadline,
                filed: deadline,
            },
        );
        drop(state);
        metrics::session_opened();
        if wake_purge {
            self.shared.purge_wakeup.notify_one();
        }
        drop(expired);
        Ok((id, idle_timeout, session))
    }

    /// `owner`'s live session `id`, with its idle deadline moved to now + its
    /// timeout. Another principal's session of that id is not found.
    pub fn session(&self, owner: &Principal, id: &str) -> Result<Arc<Session>, Error> {
        let now = Instant::now();
        let key = key(owner, id);
        let mut state = self.shared.lock_state();
        match state.sessions.get_mut(&key) {
            Some(entry) if entry.deadline > now => {
                entry.deadline = now + entry.session.idle_timeout();
                Ok(entry.session.clone())
            }
            Some(_) => {
                let expired = state.remove(&key);
                drop(state);
                metrics::sessions_ended(EndCause::Idle, 1);
                drop(expired);
                Err(not_found(id))
            }
            None => Err(not_found(id)),
        }
    }

    /// Closes `owner`'s session `id`, freeing what it kept once in-flight
    /// calls end.
    pub fn close(&self, owner: &Principal, id: &str) -> Result<(), Error> {
        let now = Instant::now();
        let mut state = self.shared.lock_state();
        let removed = state.remove(&key(owner, id)).ok_or_else(|| not_found(id))?;
        drop(state);
        if removed.deadline <= now {
            metrics::sessions_ended(EndCause::Idle, 1);
            return Err(not_found(id));
        }
        metrics::sessions_ended(EndCause::Closed, 1);
        Ok(())
    }

    /// Sessions in the map (live, or expired and not yet purged).
    pub fn session_count(&self) -> usize {
        self.shared.lock_state().sessions.len()
    }

    /// Bytes of kept state across all sessions.
    pub fn kept_bytes(&self) -> u64 {
        self.shared.total_kept.used()
    }
}

impl StoreGuard {
    pub fn store(&self) -> Store {
        self.store.clone()
    }
}

impl Drop for StoreGuard {
    fn drop(&mut self) {
        self.store.shared.lock_state().shutdown = true;
        self.store.shared.purge_wakeup.notify_one();
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across code that can panic on input, so a
        // poisoned lock still guards consistent data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes expired sessions; returns the next filed deadline, if any.
    fn purge(&self) -> Option<Instant> {
        let mut state = self.lock_state();
        if state.shutdown {
            return None;
        }
        let expired = state.remove_expired(Instant::now());
        let next = state.expirations.first().map(|(when, _)| *when);
        drop(state);
        if !expired.is_empty() {
            tracing::debug!(count = expired.len(), "expired idle sessions");
            metrics::sessions_ended(EndCause::Idle, expired.len());
        }
        // Kept state is freed here, outside the lock.
        drop(expired);
        next
    }
}

async fn purge_expired_sessions(shared: Arc<Shared>) {
    while !shared.lock_state().shutdown {
        match shared.purge() {
            Some(when) => {
                tokio::select! {
                    _ = sleep_until(when) => {}
                    _ = shared.purge_wakeup.notified() => {}
                }
            }
            None => shared.purge_wakeup.notified().await,
        }
    }
}

impl State {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.sessions.remove(id)?;
        self.expirations.remove(&(entry.filed, id.to_string()));
        Some(entry)
    }

    /// Takes out every session whose deadline is not after `now`, refiling
    /// those whose deadline moved since they were filed.
    fn remove_expired(&mut self, now: Instant) -> Vec<Entry> {
        let mut expired = Vec::new();
        while let Some((filed, _)) = self.expirations.first() {
            if *filed > now {
                break;
            }
            let (_, id) = self.expirations.pop_first().expect("first exists");
            let entry = self
                .sessions
                .get_mut(&id)
                .expect("every filed deadline belongs to a session in the map");
            if entry.deadline <= now {
                expired.extend(self.sessions.remove(&id));
            } else {
                entry.filed = entry.deadline;
                self.expirations.insert((entry.deadline, id));
            }
        }
        expired
    }
}

fn not_found(id: &str) -> Error {
    Error::SessionNotFound {
        session_id: id.to_string(),
    }
}

/// The store's key of `owner`'s session `id`. Ids cannot contain NUL, so
/// principals never share a key.
fn key(owner: &Principal, id: &str) -> String {
    let mut key = String::with_capacity(owner.name().len() + 1 + id.len());
    key.push_str(owner.name());
    key.push('\0');
    key.push_str(id);
    key
}

/// Closes a session its creating call made, unless that call succeeded
/// ([`CloseOnDrop::disarm`]): a sequence_start or an ImportSession that
/// failed, timed out or was cancelled leaves no session behind.
pub struct CloseOnDrop {
    pub store: Store,
    pub owner: Principal,
    /// `None` once the call succeeded.
    pub session_id: Option<String>,
}

impl CloseOnDrop {
    pub fn disarm(mut self) {
        self.session_id = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(session_id) = &self.session_id {
            let _ = self.store.close(&self.owner, session_id);
        }
    }
}
