//! The session store: sessions, their layer instances and kept state, the
//! limits on all of them, and idle expiry.
//!
//! [`Store`] is a cheap-to-clone handle. A short `std::sync::Mutex` guards the
//! session map and the expiry queue; it is never held while computing. Each
//! layer instance has its own async mutex, which serialises the calls on that
//! instance (and only those) across the await of a computation.
//!
//! Expiry follows mini-redis: deadlines sit in an ordered set, and a purge task
//! sleeps until the earliest one or until a new session files an earlier one.
//! A call only moves its session's deadline (no reordering under the lock); the
//! purge task refiles entries whose deadline moved. A session past its
//! deadline answers NOT_FOUND even before the purge task has removed it.
//!
//! Kept-state bytes are reserved against a per-session and a global budget
//! before Forward computes, and released when the state is dropped (replaced
//! by a later Forward, or its session closed or expired), so the accounting
//! cannot drift.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use bytesize::ByteSize;
use tokio::{
    sync::Notify,
    time::{sleep_until, Instant},
};

use crate::auth::Principal;
use crate::error::Error;
use crate::layers::{Kept, Kind};
use crate::metrics::{self, EndCause};

/// Limits on sessions and the state they keep.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_layers_per_session: usize,
    pub max_session_kept_bytes: u64,
    pub max_total_kept_bytes: u64,
    pub default_idle_timeout: Duration,
    pub max_idle_timeout: Duration,
}

/// Session and layer ids: 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    let valid = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        return Ok(());
    }
    let got = if id.len() > 140 {
        format!("{} characters", id.chars().count())
    } else {
        format!("{id:?}")
    };
    Err(Error::invalid(
        field,
        "1 to 128 characters of [A-Za-z0-9._:-]",
        got,
        "INVALID_ID",
    ))
}

/// A handle on the session store.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// Owns the store's purge task: dropping it stops the task.
pub struct StoreGuard {
    store: Store,
}

struct Shared {
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

/// One client session: its layer instances and its kept-state budget.
pub struct Session {
    id: String,
    idle_timeout: Duration,
    layers: Mutex<HashMap<String, Arc<LayerInstance>>>,
    kept: Arc<Budget>,
    total_kept: Arc<Budget>,
    max_layers: usize,
}

/// One layer instance in a session.
pub struct LayerInstance {
    pub kind: Kind,
    /// What the last keeping Forward kept; locked for the whole of each call.
    pub kept: tokio::sync::Mutex<Option<Arc<KeptEntry>>>,
}

/// Kept state together with the budget it is charged to.
pub struct KeptEntry {
    pub kept: Kept,
    _charge: Charge,
}

impl KeptEntry {
    /// Binds `kept` to the bytes reserved for it; they are released on drop.
    pub fn new(kept: Kept, charge: Charge) -> KeptEntry {
        debug_assert_eq!(
            kept.bytes() as u64,
            charge.bytes(),
            "kept bytes were declared exactly"
        );
        KeptEntry {
            kept,
            _charge: charge,
        }
    }
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
        let session = Arc::new(Session {
            id: id.clone(),
            idle_timeout,
            layers: Mutex::new(HashMap::new()),
            kept: Arc::new(Budget::new(
                limits.max_session_kept_bytes,
                "--max-session-kept-bytes",
                false,
            )),
            total_kept: self.shared.total_kept.clone(),
            max_layers: limits.max_layers_per_session,
        });
        let deadline = now + idle_timeout;
        let wake_purge = state
            .expirations
            .first()
            .is_none_or(|(first, _)| deadline < *first);
        state.expirations.insert((deadline, key.clone()));
        state.sessions.insert(
            key,
            Entry {
                session,
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
        Ok((id, idle_timeout))
    }

    /// `owner`'s live session `id`, with its idle deadline moved to now + its
    /// timeout. Another principal's session of that id is not found.
    pub fn session(&self, owner: &Principal, id: &str) -> Result<Arc<Session>, Error> {
        let now = Instant::now();
        let key = key(owner, id);
        let mut state = self.shared.lock_state();
        match state.sessions.get_mut(&key) {
            Some(entry) if entry.deadline > now => {
                entry.deadline = now + entry.session.idle_timeout;
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

/// 128 bits from the operating system's CSPRNG, as 32 hex digits.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Adds a layer instance of `kind` as `layer_id`.
    pub fn create_layer(&self, layer_id: &str, kind: Kind) -> Result<(), Error> {
        self.add_layer(layer_id, kind, false).map(drop)
    }

    /// The layer instance `layer_id`, added as a `kind` if the session has
    /// none of that name; one of another kind is an error.
    pub fn layer_or_create(&self, layer_id: &str, kind: Kind) -> Result<Arc<LayerInstance>, Error> {
        self.add_layer(layer_id, kind, true)
    }

    fn add_layer(
        &self,
        layer_id: &str,
        kind: Kind,
        reuse: bool,
    ) -> Result<Arc<LayerInstance>, Error> {
        check_id("layer_id", layer_id)?;
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = layers.get(layer_id) {
            if !reuse {
                return Err(Error::LayerExists {
                    session_id: self.id.clone(),
                    layer_id: layer_id.to_string(),
                });
            }
            self.check_kind(layer_id, existing, kind)?;
            return Ok(existing.clone());
        }
        if layers.len() >= self.max_layers {
            return Err(Error::LimitExceeded {
                flag: "--max-layers-per-session",
                limit: self.max_layers.to_string(),
                detail: format!("session {:?} has {} layers", self.id, layers.len()),
            });
        }
        let instance = Arc::new(LayerInstance {
            kind,
            kept: tokio::sync::Mutex::new(None),
        });
        layers.insert(layer_id.to_string(), instance.clone());
        Ok(instance)
    }

    /// Fails unless `layer` (this session's `layer_id`) is a `kind` layer.
    pub fn check_kind(
        &self,
        layer_id: &str,
        layer: &LayerInstance,
        kind: Kind,
    ) -> Result<(), Error> {
        if layer.kind == kind {
            return Ok(());
        }
        Err(Error::invalid(
            "layer_id",
            format!("a layer of kind {kind} (or a new id)"),
            format!(
                "{layer_id:?}, a {} layer in session {:?}",
                layer.kind, self.id
            ),
            "LAYER_KIND_MISMATCH",
        ))
    }

    /// The layer instance `layer_id`.
    pub fn layer(&self, layer_id: &str) -> Result<Arc<LayerInstance>, Error> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .get(layer_id)
            .cloned()
            .ok_or_else(|| Error::LayerNotFound {
                session_id: self.id.clone(),
                layer_id: layer_id.to_string(),
            })
    }

    /// Reserves `bytes` of kept state against this session's budget and the
    /// global one, or says which limit it would exceed.
    pub fn reserve(&self, bytes: usize) -> Result<Charge, Error> {
        let bytes = bytes as u64;
        let session = self.kept.reserve(bytes)?;
        let total = self.total_kept.reserve(bytes)?;
        Ok(Charge {
            bytes,
            _reservations: [session, total],
        })
    }

    /// Bytes of kept state held by this session.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.used()
    }
}

/// Bytes reserved for one kept state, released on drop.
pub struct Charge {
    bytes: u64,
    _reservations: [Reservation; 2],
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A byte budget with a limit, shared by everything charged to it.
struct Budget {
    used: AtomicU64,
    limit: u64,
    flag: &'static str,
    /// Whether this is the global budget, whose use is the kept-bytes gauge.
    global: bool,
}

impl Budget {
    fn new(limit: u64, flag: &'static str, global: bool) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
            flag,
            global,
        }
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Error> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .map_err(|used| Error::LimitExceeded {
                flag: self.flag,
                limit: ByteSize(self.limit).to_string(),
                detail: format!(
                    "keeping {} more would make {} (in use: {})",
                    ByteSize(bytes),
                    ByteSize(used.saturating_add(bytes)),
                    ByteSize(used)
                ),
            })?;
        if self.global {
            metrics::kept_bytes_changed(bytes as i64);
        }
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        if self.budget.global {
            metrics::kept_bytes_changed(-(self.bytes as i64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn limits() -> Limits {
        Limits {
            max_sessions: 3,
            max_layers_per_session: 2,
            max_session_kept_bytes: 1000,
            max_total_kept_bytes: 1500,
            default_idle_timeout: Duration::from_secs(60),
            max_idle_timeout: Duration::from_secs(600),
        }
    }

    fn anon() -> Principal {
        Principal::default()
    }

    #[tokio::test(start_paused = true)]
    async fn each_principal_has_its_own_id_space() {
        let auth =
            crate::auth::Authenticator::parse("aaaaaaaaaaaaaaaa alice\nbbbbbbbbbbbbbbbb bob\n")
                .unwrap();
        let principal = |token: &str| {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            use tonic::service::Interceptor;
            Principal::of(auth.clone().call(request).unwrap().extensions()).unwrap()
        };
        let (alice, bob) = (principal("aaaaaaaaaaaaaaaa"), principal("bbbbbbbbbbbbbbbb"));
        let guard = Store::start(limits());
        let store = guard.store();
        store.create(&alice, "s", 10).unwrap();
        store
            .session(&alice, "s")
            .unwrap()
            .create_layer("l", Kind::Relu)
            .unwrap();
        for other in [&bob, &anon()] {
            assert!(matches!(
                store.session(other, "s"),
                Err(Error::SessionNotFound { .. })
            ));
            assert!(matches!(
                store.close(other, "s"),
                Err(Error::SessionNotFound { .. })
            ));
        }
        // Bob's own "s" is another session; Alice's is untouched.
        store.create(&bob, "s", 10).unwrap();
        assert!(store.session(&bob, "s").unwrap().layer("l").is_err());
        assert!(store.session(&alice, "s").unwrap().layer("l").is_ok());
        store.close(&bob, "s").unwrap();
        assert!(store.session(&alice, "s").is_ok());
    }

    fn ones(len: usize) -> Tensor {
        Tensor::from_array(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[len]), 1.0f32))
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("session_id", "a.B_c:d-9").is_ok());
        assert!(check_id("session_id", &"x".repeat(128)).is_ok());
        for bad in ["", "a b", "é", "a/b", &"x".repeat(129)] {
            let err = check_id("layer_id", bad).unwrap_err();
            assert!(
                err.to_string().starts_with("layer_id: expected 1 to 128"),
                "{err}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_expire_and_calls_keep_them_alive() {
        let guard = Store::start(limits());
        let store = guard.store();
        let (a, granted) = store.create(&anon(), "a", 1).unwrap();
        assert_eq!(granted, Duration::from_secs(1));
        store.create(&anon(), "b", 3).unwrap();
        // Over the maximum is lowered to it; 0 is the default.
        assert_eq!(
            store.create(&anon(), "c", 9999).unwrap().1,
            Duration::from_secs(600)
        );
        store.close(&anon(), "c").unwrap();
        assert_eq!(
            store.create(&anon(), "", 0).unwrap().1,
            Duration::from_secs(60)
        );

        tokio::time::sleep(Duration::from_millis(700)).await;
        store.session(&anon(), &a).unwrap(); // moves a's deadline to 1.7 s
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            store.session(&anon(), "a").is_ok(),
            "a call 0.7 s ago keeps it alive"
        );
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert!(matches!(
            store.session(&anon(), "a"),
            Err(Error::SessionNotFound { .. })
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The purge task removed b (3 s) without any call touching it.
        assert_eq!(store.session_count(), 1);
        assert!(store.session(&anon(), "b").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn session_and_layer_limits() {
        let guard = Store::start(limits());
        let store = guard.store();
        for id in ["s1", "s2", "s3"] {
            store.create(&anon(), id, 1).unwrap();
        }
        let err = store.create(&anon(), "s4", 1).unwrap_err();
        assert!(err.to_string().contains("--max-sessions"), "{err}");
        assert!(matches!(
            store.create(&anon(), "s1", 1),
            Err(Error::SessionExists { .. })
        ));
        // Expired sessions do not count against the limit, even before the purge.
        tokio::time::advance(Duration::from_secs(2)).await;
        store.create(&anon(), "s4", 1).unwrap();
        store.create(&anon(), "s1", 1).unwrap();

        let session = store.session(&anon(), "s4").unwrap();
        session.create_layer("l1", Kind::Relu).unwrap();
        assert!(matches!(
            session.create_layer("l1", Kind::Relu),
            Err(Error::LayerExists { .. })
        ));
        session.create_layer("l2", Kind::Sigmoid).unwrap();
        let err = session.create_layer("l3", Kind::Relu).unwrap_err();
        assert!(
            err.to_string().contains("--max-layers-per-session"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn kept_bytes_are_charged_and_released_exactly() {
        let guard = Store::start(limits());
        let store = guard.store();
        store.create(&anon(), "s1", 10).unwrap();
        store.create(&anon(), "s2", 10).unwrap();
        let s1 = store.session(&anon(), "s1").unwrap();
        let s2 = store.session(&anon(), "s2").unwrap();

        let x = ones(200); // sigmoid keeps 800 bytes of f32
        let (_, kept) = Kind::Sigmoid.forward(&x);
        let entry = KeptEntry::new(kept, s1.reserve(800).unwrap());
        assert_eq!((s1.kept_bytes(), store.kept_bytes()), (800, 800));
        // 800 + 800 > the session's 1000.
        let err = s1.reserve(800).err().unwrap();
        assert!(
            err.to_string().contains("--max-session-kept-bytes"),
            "{err}"
        );
        // 800 + 800 > the total's 1500, though s2 itself would fit.
        let err = s2.reserve(800).err().unwrap();
        assert!(err.to_string().contains("--max-total-kept-bytes"), "{err}");
        // A failed reservation leaves nothing behind.
        assert_eq!(
            (s1.kept_bytes(), s2.kept_bytes(), store.kept_bytes()),
            (800, 0, 800)
        );

        drop(entry);
        assert_eq!(store.kept_bytes(), 0);
        let held = s2.reserve(700).unwrap();
        drop(s2);
        store.close(&anon(), "s2").unwrap();
        // The charge outlives its session until its holder drops it.
        assert_eq!(store.kept_bytes(), 700);
        drop(held);
        assert_eq!(store.kept_bytes(), 0);
    }

    #[test]
    fn random_ids_are_128_bits_of_hex() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_id());
        check_id("session_id", &a).unwrap();
    }
}
