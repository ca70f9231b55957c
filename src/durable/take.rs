//! Taking a session over ([`Durable::session`] for one this replica does
//! not hold): from a live holder, which is asked to write it and let go, or
//! from the store as it is when its holder is gone; then this replica's copy
//! is built from the stored value, validated as ImportSession validates a
//! file.

use std::{sync::Arc, time::Duration};

use redis::AsyncCommands;
use tokio::time::Instant;

use super::scripts::{Keys, TAKE};
use super::{answers, kept, moved, replica, unavailable, Durable, Held, HANDOVER_WAIT};
use crate::auth::Principal;
use crate::checkpoint;
use crate::error::Error;
use crate::metrics;
use crate::rpc::status::CallError;
use crate::session::Session;

impl Durable {
    /// Takes session `id` over: asks a live holder to let go (waiting up to
    /// [`HANDOVER_WAIT`]), then takes it at the next epoch and builds this
    /// replica's copy from the stored state.
    pub(super) async fn take_over(
        &self,
        owner: &Principal,
        id: &str,
        keys: Keys,
    ) -> Result<Arc<Session>, CallError> {
        let lock = {
            let mut taking = self.inner.taking.lock().await;
            taking.entry(keys.session.clone()).or_default().clone()
        };
        let session_key = keys.session.clone();
        let taken = {
            let _one_at_a_time = lock.lock().await;
            self.take_over_locked(owner, id, keys).await
        };
        let mut taking = self.inner.taking.lock().await;
        if Arc::strong_count(&lock) == 2 {
            taking.remove(&session_key);
        }
        taken
    }

    async fn take_over_locked(
        &self,
        owner: &Principal,
        id: &str,
        keys: Keys,
    ) -> Result<Arc<Session>, CallError> {
        // Another call of this replica may have taken it meanwhile.
        if let Ok(session) = self.inner.store.session(owner, id) {
            return Ok(session);
        }
        let mut connection = self.connection();
        let deadline = Instant::now() + HANDOVER_WAIT;
        let mut asked = false;
        loop {
            let (epoch, holder): (Option<String>, Option<String>) = connection
                .hmget(&keys.session, &["epoch", "holder"])
                .await
                .map_err(unavailable)?;
            let Some(epoch) = epoch else {
                return Err(Error::SessionNotFound {
                    session_id: id.to_string(),
                }
                .into());
            };
            let holder = holder.unwrap_or_default();
            let alive = !holder.is_empty()
                && holder != self.inner.replica
                && replica::alive(&mut connection, &holder).await?;
            if alive {
                if Instant::now() >= deadline {
                    return Err(moved(id, &holder));
                }
                if !asked {
                    replica::ask_to_hand_over(&mut connection, &holder, &keys.session).await?;
                    asked = true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let taken: Vec<Vec<u8>> = TAKE
                .key(&keys.session)
                .key(&keys.state)
                .key(&keys.answers)
                .key(&keys.kept)
                .arg(&epoch)
                .arg(&self.inner.replica)
                .invoke_async(&mut connection)
                .await
                .map_err(unavailable)?;
            if taken.is_empty() {
                continue; // another replica took it first: read again
            }
            let session = self.restore(owner, id, keys, taken).await?;
            // Released (handed over, or by a drain), or taken from a dead holder.
            let released = holder.is_empty();
            metrics::store_handover(if released { "in" } else { "takeover" });
            tracing::info!(session = %id, from = %holder, released, "session taken over");
            return Ok(session);
        }
    }

    /// Builds this replica's copy of a session from what [`TAKE`] answered
    /// (`[epoch, owner, id, idle, state, answers, kept]`), validating all of
    /// it.
    async fn restore(
        &self,
        owner: &Principal,
        id: &str,
        keys: Keys,
        taken: Vec<Vec<u8>>,
    ) -> Result<Arc<Session>, CallError> {
        let lost = |detail: String| CallError::SessionLost {
            session_id: id.to_string(),
            detail,
        };
        let [epoch, stored_owner, stored_id, idle, state, stored_answers, stored_kept]: [Vec<u8>;
            7] = taken
            .try_into()
            .map_err(|got: Vec<_>| lost(format!("expected 7 fields, got {}", got.len())))?;
        let text = |field: &str, bytes: &[u8]| {
            String::from_utf8(bytes.to_vec()).map_err(|_| lost(format!("{field}: not UTF-8")))
        };
        let epoch: u64 = text("epoch", &epoch)?
            .parse()
            .map_err(|_| lost("epoch: not a count".into()))?;
        if text("owner", &stored_owner)? != owner.name() || text("id", &stored_id)? != id {
            return Err(lost(format!(
                "the stored owner and id do not match the key {:?}",
                keys.session
            )));
        }
        let idle: u32 = text("idle", &idle)?
            .parse()
            .map_err(|_| lost("idle: not a number of seconds".into()))?;
        let checkpoint = checkpoint::parse(&state).map_err(|e| lost(format!("state: {e}")))?;
        let answers =
            answers::decode(&stored_answers).map_err(|e| lost(format!("answers: {e}")))?;
        let kept = kept::decode(&stored_kept).map_err(|e| lost(format!("kept: {e}")))?;
        let store = &self.inner.store;
        let idle_timeout = Duration::from_secs(idle.into());
        let session = store.reopen(owner, id, idle, idle_timeout)?;
        checkpoint::restore_new(store, owner, &session, checkpoint).await?;
        for (_, layer) in session.layers_by_id() {
            layer.state.lock().await.kept_lost = true;
        }
        answers::restore(&session, answers).await.map_err(|e| {
            let _ = store.close(owner, id);
            lost(format!("answers: {e}"))
        })?;
        kept::restore(&session, kept).await.map_err(|e| {
            let _ = store.close(owner, id);
            lost(format!("kept: {e}"))
        })?;
        self.hold(Held::new(keys, owner, &session, epoch));
        Ok(session)
    }
}
