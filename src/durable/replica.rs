//! This replica's presence in the store: a heartbeat others read to tell a
//! live holder (asked to hand a session over) from a dead one (whose last
//! stored state is taken as it is), and the listener that hands sessions
//! over when another replica asks.
//!
//! The heartbeat key lives [`HEARTBEAT_TTL`] and is renewed every
//! [`HEARTBEAT_EVERY`]: a replica killed without a drain is taken for dead
//! at most [`HEARTBEAT_TTL`] later. The same beat forgets the sessions whose
//! copy here has ended (closed, expired).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::{AsyncCommands, SetExpiry, SetOptions};
use tokio_stream::StreamExt;

use super::scripts::{handover_channel, heartbeat_key};
use super::{unavailable, Connection, Durable};
use crate::metrics;
use crate::rpc::status::CallError;
use crate::session::Session;

/// How long a replica that stopped beating is still taken for alive.
pub const HEARTBEAT_TTL: Duration = Duration::from_millis(1500);
/// How often a replica beats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

/// Beats once (so the replica is alive before it serves), then starts the
/// beating and listening tasks; they end with the process.
pub(super) async fn start(durable: &Durable) -> Result<(), String> {
    beat(durable)
        .await
        .map_err(|e| format!("--session-store: {e}"))?;
    let mut pubsub = durable
        .inner
        .client
        .get_async_pubsub()
        .await
        .map_err(|e| format!("--session-store: cannot subscribe: {e}"))?;
    pubsub
        .subscribe(handover_channel(&durable.inner.replica))
        .await
        .map_err(|e| format!("--session-store: cannot subscribe: {e}"))?;
    let beating = durable.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            ticks.tick().await;
            match beat(&beating).await {
                Ok(()) => metrics::store_up(true),
                Err(error) => {
                    metrics::store_up(false);
                    tracing::warn!(%error, "session store heartbeat failed");
                }
            }
            beating.forget_ended();
        }
    });
    let listening = durable.clone();
    tokio::spawn(async move {
        let mut requests = pubsub.into_on_message();
        while let Some(message) = requests.next().await {
            let Ok(key) = message.get_payload::<String>() else {
                continue;
            };
            let durable = listening.clone();
            tokio::spawn(async move {
                if let Err(error) = durable.hand_over(&key).await {
                    tracing::warn!(%key, %error, "handover asked for failed");
                }
            });
        }
        tracing::error!("session store: the handover subscription ended");
    });
    Ok(())
}

async fn beat(durable: &Durable) -> redis::RedisResult<()> {
    let expiry = SetExpiry::PX(HEARTBEAT_TTL.as_millis() as u64);
    durable
        .connection()
        .set_options(
            heartbeat_key(&durable.inner.replica),
            &durable.inner.replica,
            SetOptions::default().with_expiration(expiry),
        )
        .await
}

/// Whether `replica`'s heartbeat is current.
pub(super) async fn alive(connection: &mut Connection, replica: &str) -> Result<bool, CallError> {
    connection
        .exists(heartbeat_key(replica))
        .await
        .map_err(unavailable)
}

/// Asks `holder` to write session `key` and let go of it.
pub(super) async fn ask_to_hand_over(
    connection: &mut Connection,
    holder: &str,
    key: &str,
) -> Result<(), CallError> {
    let _listeners: i64 = connection
        .publish(handover_channel(holder), key)
        .await
        .map_err(unavailable)?;
    Ok(())
}

impl Durable {
    /// Forgets held sessions whose copy here has ended.
    fn forget_ended(&self) {
        let live: HashSet<*const Session> = self
            .inner
            .store
            .live_sessions()
            .iter()
            .map(|(_, session, _)| Arc::as_ptr(session))
            .collect();
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, h| {
            h.session
                .upgrade()
                .is_some_and(|session| live.contains(&Arc::as_ptr(&session)))
        });
        metrics::store_sessions_held(held.len());
    }
}
