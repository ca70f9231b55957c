//! `--session-store redis://…`: sessions kept in Redis, so that any replica
//! can serve any session and none is lost with the replica holding it.
//!
//! A replica holds the sessions it serves in its own [`Store`], as without
//! a session store; the shared store has each session's last committed state
//! (its checkpoint, [`crate::checkpoint`]) and who holds it ([`scripts`] for
//! the keys). A call for a session this replica does not hold takes it over
//! ([`Durable::session`], `take.rs`): if its holder is alive (its heartbeat,
//! [`replica`]) it is asked to write the session, with what its layers kept
//! for Backward ([`kept`]), and let go; else the last stored state is taken
//! as it is, and a Backward whose Forward ran on the dead holder answers
//! KEPT_STATE_LOST.
//!
//! Invariants:
//! - one holder at a time: a take-over increments the session's epoch
//!   atomically, conditional on the epoch it read, so of two replicas racing
//!   for a session one wins and the other reads again;
//! - fencing: every write and delete is conditional on the epoch and holder
//!   the writer took the session with; a replica whose write is refused has
//!   lost the session: it drops its copy at once and answers SESSION_MOVED
//!   (UNAVAILABLE: the call did not take effect, retry), so stale state can
//!   never overwrite newer state;
//! - `--durability sync`: a call that changes parameters or optimizer state
//!   answers only after the store has the new state (calls that changed it
//!   while a write was under way share the next write); `async`: the newest
//!   state is written behind, at most one write in flight per session;
//! - what is read from the store is validated as ImportSession validates a
//!   file (owner, id, checkpoint, answers): a bad value answers DATA_LOSS
//!   `SESSION_LOST`, never a crash, and never serves a session to another
//!   principal than its owner.

pub mod answers;
mod connection;
pub mod kept;
mod replica;
pub mod scripts;
mod take;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use redis::{AsyncCommands, SetExpiry, SetOptions};
use tokio::time::Instant;

use crate::auth::Principal;
use crate::checkpoint;
use crate::error::Error;
use crate::metrics;
use crate::rpc::status::CallError;
use crate::session::{Session, Store};
pub use connection::Access;
use connection::Connection;
use scripts::{session_key, Keys, COMMIT, CREATE, DELETE, TOUCH};

/// When a call that changed a session answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// After the store has the new state.
    Sync,
    /// At once; the state is written behind.
    Async,
}

/// How long a call waits for a live holder to hand a session over.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// `--durability async`: the least time between two writes of a session,
/// so the steps a crash can lose are those of about this long.
pub const ASYNC_WRITE_SPACING: Duration = Duration::from_millis(20);

/// A handle on the shared session store (cheap to clone).
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    client: redis::Client,
    replica: String,
    durability: Durability,
    store: Store,
    /// The sessions this replica holds, by key.
    held: Mutex<HashMap<String, Arc<Held>>>,
    /// Keys being taken over by a call of this replica (one at a time per key).
    taking: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A session this replica holds.
struct Held {
    keys: Keys,
    owner: Principal,
    id: String,
    epoch: u64,
    idle: Duration,
    session: Weak<Session>,
    /// One write at a time, so a later write always carries later state.
    writer: tokio::sync::Mutex<()>,
    /// Sync mode: changes asked to be stored (one per call that changed the
    /// session, counted after its commit), and how many of them the store
    /// has (as of the last write's start): a write covers every change
    /// counted before it began (a group commit).
    requested: AtomicU64,
    written: AtomicU64,
    /// Async mode: state committed since the last write began.
    dirty: AtomicBool,
    /// Async mode: a writer task is at work.
    writing: AtomicBool,
    /// Handing over: calls no longer start on it here.
    leaving: AtomicBool,
    /// When its idle expiry in the store was last moved on.
    touched: Mutex<Instant>,
    /// Each optimizer's step count as the store has it (as of the last
    /// write, or the take-over).
    stored: Mutex<Vec<(String, u64)>>,
}

impl Durable {
    /// Connects to `url` as `access` says (checked with a PING) and starts
    /// the heartbeat and the handover listener of replica `replica`.
    pub async fn connect(
        url: &str,
        access: &Access,
        replica: String,
        durability: Durability,
        store: Store,
    ) -> Result<Durable, String> {
        let (mut connection, client) = connection::connect(url, access).await?;
        let _: String = connection
            .ping()
            .await
            .map_err(|e| format!("--session-store: {e}"))?;
        let durable = Durable {
            inner: Arc::new(Inner {
                connection,
                client,
                replica,
                durability,
                store,
                held: Mutex::new(HashMap::new()),
                taking: tokio::sync::Mutex::new(HashMap::new()),
            }),
        };
        replica::start(&durable).await?;
        Ok(durable)
    }

    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    fn connection(&self) -> Connection {
        self.inner.connection.clone()
    }

    fn held(&self, key: &str) -> Option<Arc<Held>> {
        let held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(key).cloned()
    }

    fn hold(&self, held: Held) {
        let mut map = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(held.keys.session.clone(), Arc::new(held));
        metrics::store_sessions_held(map.len());
    }

    /// Forgets `held` and drops this replica's copy of the session (unless
    /// the session was taken back since, as a new copy).
    fn let_go(&self, held: &Held) {
        {
            let mut map = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
            if map
                .get(&held.keys.session)
                .is_some_and(|h| h.epoch == held.epoch)
            {
                map.remove(&held.keys.session);
            }
            metrics::store_sessions_held(map.len());
        }
        let store = &self.inner.store;
        let same = match (store.session(&held.owner, &held.id), held.session.upgrade()) {
            (Ok(current), Some(ours)) => Arc::ptr_eq(&current, &ours),
            _ => false,
        };
        if same {
            let _ = store.close(&held.owner, &held.id);
        }
    }

    /// Registers a session just created here (CreateSession, ImportSession):
    /// stores it at epoch 1, held by this replica. SESSION_EXISTS if the
    /// store has a session of that id already (the caller closes its copy).
    pub async fn create(&self, owner: &Principal, session: &Arc<Session>) -> Result<(), CallError> {
        let keys = Keys::of(owner, session.id());
        let state = checkpoint::export(session).await?;
        let idle = session.idle_timeout();
        let started = Instant::now();
        let created: i64 = CREATE
            .key(&keys.session)
            .key(&keys.state)
            .key(&keys.answers)
            .arg(&self.inner.replica)
            .arg(owner.name())
            .arg(session.id())
            .arg(idle.as_secs())
            .arg(state.as_slice())
            .arg(ttl_ms(idle))
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        metrics::store_write(started.elapsed(), state.len());
        if created == 0 {
            return Err(Error::SessionExists {
                session_id: session.id().to_string(),
            }
            .into());
        }
        self.hold(Held::new(keys, owner, session, 1));
        Ok(())
    }

    /// The caller's session: this replica's copy if it holds it, else taken
    /// over from its holder or from the store. SESSION_NOT_FOUND if neither
    /// has it.
    pub async fn session(&self, owner: &Principal, id: &str) -> Result<Arc<Session>, CallError> {
        match self.inner.store.session(owner, id) {
            Ok(session) => match self.held(&session_key(owner, id)) {
                Some(held) if held.leaving.load(Ordering::Acquire) => Err(moved(id, "")),
                Some(held) => {
                    self.touch(&held);
                    Ok(session)
                }
                // Not one of the store's: a KServe sequence's session.
                None => Ok(session),
            },
            Err(Error::SessionNotFound { .. }) => {
                self.take_over(owner, id, Keys::of(owner, id)).await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// After a call changed `session` (parameters, optimizer state, layers):
    /// sync mode writes it now; async mode has it written behind.
    pub async fn persist(&self, owner: &Principal, session: &Session) -> Result<(), CallError> {
        let Some(held) = self.held(&session_key(owner, session.id())) else {
            return Ok(());
        };
        match self.inner.durability {
            Durability::Sync => {
                // Calls that changed the session while a write was under way
                // wait for the writer together; the first of them writes for
                // all, the others find their change stored and answer.
                let change = held.requested.fetch_add(1, Ordering::AcqRel) + 1;
                let _writing = held.writer.lock().await;
                if held.written.load(Ordering::Acquire) >= change {
                    return Ok(());
                }
                let covered = held.requested.load(Ordering::Acquire);
                self.write_locked(&held, false).await?;
                held.written.fetch_max(covered, Ordering::AcqRel);
                Ok(())
            }
            Durability::Async => {
                held.dirty.store(true, Ordering::Release);
                if !held.writing.swap(true, Ordering::AcqRel) {
                    let durable = self.clone();
                    tokio::spawn(async move { durable.write_behind(held).await });
                }
                Ok(())
            }
        }
    }

    /// Async mode: writes until nothing newer was committed, at most one
    /// write per [`ASYNC_WRITE_SPACING`].
    async fn write_behind(&self, held: Arc<Held>) {
        loop {
            held.dirty.store(false, Ordering::Release);
            if let Err(error) = self.write(&held, false).await {
                tracing::warn!(session = %held.id, %error, "writing the session behind failed");
            }
            // Commits meanwhile only set `dirty`: a session training at a
            // step per millisecond is written once per spacing, not per step.
            tokio::time::sleep(ASYNC_WRITE_SPACING).await;
            held.writing.store(false, Ordering::Release);
            // A commit after the flag was cleared sees `writing` false and
            // starts its own writer; one before it left `dirty` set.
            if !held.dirty.load(Ordering::Acquire) || held.writing.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    /// Writes the session's current state, fenced; `release` lets go of it.
    async fn write(&self, held: &Held, release: bool) -> Result<(), CallError> {
        let _writing = held.writer.lock().await;
        self.write_locked(held, release).await
    }

    /// [`Durable::write`], under `held.writer`.
    async fn write_locked(&self, held: &Held, release: bool) -> Result<(), CallError> {
        let Some(session) = held.session.upgrade() else {
            return Ok(());
        };
        let export = checkpoint::export_counted(&session, HashMap::new(), release).await?;
        let (state, counts) = (export.file, export.counts);
        let answers = answers::encode(&export.last);
        let kept = kept::encode(export.kept);
        let started = Instant::now();
        let mut connection = self.connection();
        let staging = held.keys.staging(&self.inner.replica);
        let ttl = ttl_ms(held.idle);
        let () = connection
            .set_options(
                &staging,
                state.as_slice(),
                SetOptions::default().with_expiration(SetExpiry::PX(scripts::STAGING_TTL_MS)),
            )
            .await
            .map_err(unavailable)?;
        let written: i64 = COMMIT
            .key(&held.keys.session)
            .key(&held.keys.state)
            .key(&held.keys.answers)
            .key(&staging)
            .key(&held.keys.kept)
            .arg(held.epoch)
            .arg(&self.inner.replica)
            .arg(answers.as_slice())
            .arg(ttl)
            .arg(if release { "1" } else { "0" })
            .arg(kept.as_slice())
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        metrics::store_write(started.elapsed(), state.len() + answers.len() + kept.len());
        if written < 0 {
            return Err(CallError::StoreUnavailable {
                detail: "the staged state expired before its commit".into(),
            });
        }
        if written == 0 {
            metrics::store_fenced();
            tracing::warn!(session = %held.id, epoch = held.epoch, "write fenced: another replica holds the session now");
            self.let_go(held);
            return Err(moved(&held.id, ""));
        }
        *held.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        *held.stored.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        Ok(())
    }

    /// Each optimizer's step count as the store has it, if this replica
    /// holds session `id` (DescribeSession).
    pub fn stored_steps(&self, owner: &Principal, id: &str) -> Option<Vec<(String, u64)>> {
        let held = self.held(&session_key(owner, id))?;
        let stored = held.stored.lock().unwrap_or_else(|p| p.into_inner());
        Some(stored.clone())
    }

    /// Moves the session's expiry in the store on, at most every quarter of
    /// its idle timeout (calls that change nothing write nothing).
    fn touch(&self, held: &Arc<Held>) {
        {
            let mut touched = held.touched.lock().unwrap_or_else(|p| p.into_inner());
            if touched.elapsed() < held.idle / 4 {
                return;
            }
            *touched = Instant::now();
        }
        let (durable, held) = (self.clone(), held.clone());
        tokio::spawn(async move {
            let touched: Result<i64, _> = TOUCH
                .key(&held.keys.session)
                .key(&held.keys.state)
                .key(&held.keys.answers)
                .arg(held.epoch)
                .arg(&durable.inner.replica)
                .arg(ttl_ms(held.idle))
                .invoke_async(&mut durable.connection())
                .await;
            if let Ok(0) = touched {
                metrics::store_fenced();
                durable.let_go(&held);
            }
        });
    }

    /// Deletes the session from the store and closes this replica's copy
    /// (CloseSession), fenced; false if it is not one this replica holds.
    pub async fn close(&self, owner: &Principal, id: &str) -> Result<bool, CallError> {
        let Some(held) = self.held(&session_key(owner, id)) else {
            return Ok(false);
        };
        let _writing = held.writer.lock().await;
        let deleted: i64 = DELETE
            .key(&held.keys.session)
            .key(&held.keys.state)
            .key(&held.keys.answers)
            .key(&held.keys.kept)
            .arg(held.epoch)
            .arg(&self.inner.replica)
            .invoke_async(&mut self.connection())
            .await
            .map_err(unavailable)?;
        self.let_go(&held);
        if deleted == 0 {
            metrics::store_fenced();
            return Err(moved(id, ""));
        }
        Ok(true)
    }

    /// Writes and lets go of the session `key` (a handover asked for by
    /// another replica, or the drain): calls in flight on it finish first
    /// (the write waits for their locks), later ones answer SESSION_MOVED.
    pub async fn hand_over(&self, key: &str) -> Result<(), CallError> {
        let Some(held) = self.held(key) else {
            return Ok(());
        };
        held.leaving.store(true, Ordering::Release);
        let written = self.write(&held, true).await;
        self.let_go(&held);
        if written.is_ok() {
            metrics::store_handover("out");
        }
        written
    }

    /// Hands over every session this replica holds (the drain on SIGTERM).
    pub async fn hand_over_all(&self) -> usize {
        let keys: Vec<String> = {
            let held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
            held.keys().cloned().collect()
        };
        let mut written = 0;
        for key in keys {
            match self.hand_over(&key).await {
                Ok(()) => written += 1,
                Err(error) => tracing::error!(%key, %error, "cannot hand the session over"),
            }
        }
        written
    }
}

/// A stored value that is a safetensors file, and its metadata entry `key`
/// parsed from JSON (the answers' and the kept state's framing).
fn open_value<'a, T: serde::de::DeserializeOwned>(
    value: &'a [u8],
    key: &str,
) -> Result<(safetensors::SafeTensors<'a>, T), String> {
    use safetensors::SafeTensors;
    let file = SafeTensors::deserialize(value).map_err(|e| format!("not safetensors: {e}"))?;
    let (_, header) = SafeTensors::read_metadata(value).map_err(|e| e.to_string())?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .ok_or_else(|| format!("no {key} metadata"))?;
    let parsed = serde_json::from_str(json).map_err(|e| format!("{key}: {e}"))?;
    Ok((file, parsed))
}

impl Held {
    fn new(keys: Keys, owner: &Principal, session: &Arc<Session>, epoch: u64) -> Held {
        Held {
            keys,
            owner: owner.clone(),
            id: session.id().to_string(),
            epoch,
            idle: session.idle_timeout(),
            session: Arc::downgrade(session),
            writer: tokio::sync::Mutex::new(()),
            requested: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            touched: Mutex::new(Instant::now()),
            stored: Mutex::new(
                session
                    .optimizers_by_id()
                    .iter()
                    .map(|o| (o.id.clone(), o.committed_count()))
                    .collect(),
            ),
        }
    }
}

/// The store's expiry of a session: its idle timeout.
fn ttl_ms(idle: Duration) -> u64 {
    (idle.as_millis() as u64).max(1)
}

fn unavailable(error: redis::RedisError) -> CallError {
    metrics::store_error();
    CallError::StoreUnavailable {
        detail: error.to_string(),
    }
}

fn moved(id: &str, holder: &str) -> CallError {
    CallError::SessionMoved {
        session_id: id.to_string(),
        holder: holder.to_string(),
    }
}
