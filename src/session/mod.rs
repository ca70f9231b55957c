//! Sessions: their layer instances and kept state, the limits on all of
//! them, and idle expiry.
//!
//! - [`store`]: the map of live sessions, its limit, expiry (a purge task);
//! - [`budget`]: kept-byte budgets, per session and global;
//! - [`ids`]: the id rules and server-picked ids;
//! - [`optimizer`]: optimizers, the layers they own and their state;
//! - [`queue`]: each optimizer's queue of steps and its runner thread;
//! - this module: a session and its layer instances.
//!
//! Each layer instance has its own async mutex, which serialises the calls on
//! that instance (and only those) across the await of a computation. Memory is
//! reserved against a per-session and a global budget before it is allocated,
//! and released when its holder drops, so the accounting cannot drift: a
//! layer's parameters, gradients and buffers at CreateLayer (held until the
//! layer goes with its session), kept state before Forward computes (held
//! until a later Forward replaces it, SetParams drops it, or the session
//! closes or expires).

mod budget;
mod ids;
mod optimizer;
pub mod queue;
mod store;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use budget::Budget;
pub use budget::{Charge, KeptEntry};
pub use ids::check_id;
pub use optimizer::{Applied, Optimizer, OptimizerState, Progress, Steps, TrainAnswer, Turn};
pub use store::{CloseOnDrop, Store, StoreGuard};

use crate::error::Error;
use crate::layers::{Chain, MemberState};
use crate::spec::{NewLayer, Recipe};

/// Limits on sessions and the state they keep.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_layers_per_session: usize,
    pub max_session_kept_bytes: u64,
    pub max_total_kept_bytes: u64,
    /// The largest array one call may build (an output or a scratch array).
    pub max_work_bytes: u64,
    pub default_idle_timeout: Duration,
    pub max_idle_timeout: Duration,
}

/// One client session: its layer instances and its kept-state budget.
pub struct Session {
    id: String,
    idle_timeout: Duration,
    layers: Mutex<HashMap<String, Arc<LayerInstance>>>,
    optimizers: Mutex<HashMap<String, Arc<Optimizer>>>,
    kept: Arc<Budget>,
    total_kept: Arc<Budget>,
    max_layers: usize,
    max_work_bytes: u64,
}

/// One layer instance in a session.
pub struct LayerInstance {
    /// Its math (kind, config, dtype), fixed at creation.
    pub chain: Arc<Chain>,
    /// Its specification as the client gave it, for checkpoints.
    pub recipe: Recipe,
    /// Its values and kept state; locked for the whole of each call.
    pub state: tokio::sync::Mutex<InstanceState>,
    /// The bytes of its parameters, gradients and buffers.
    _held: Charge,
}

/// What a layer instance holds, changed only by a call's commit.
pub struct InstanceState {
    /// Per member of the chain: parameters, buffers, gradients, generator.
    pub members: Vec<MemberState>,
    /// What the last keeping Forward kept.
    pub kept: Option<Arc<KeptEntry>>,
    /// The optimizer owning its parameters, and that optimizer's state for them.
    pub optimizer: Option<OptimizerState>,
    /// The session came to this replica (a session store) without the kept
    /// state of the last keeping Forward (taken from a holder that died), so
    /// a Backward now answers KEPT_STATE_LOST rather than NOTHING_KEPT.
    /// Cleared by the next commit of kept state, and by SetParams.
    pub kept_lost: bool,
}

impl Session {
    fn new(
        id: String,
        idle_timeout: Duration,
        limits: &Limits,
        total_kept: Arc<Budget>,
    ) -> Session {
        Session {
            id,
            idle_timeout,
            layers: Mutex::new(HashMap::new()),
            optimizers: Mutex::new(HashMap::new()),
            kept: Arc::new(Budget::new(
                limits.max_session_kept_bytes,
                "--max-session-kept-bytes",
                false,
            )),
            total_kept,
            max_layers: limits.max_layers_per_session,
            max_work_bytes: limits.max_work_bytes,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Adds a layer instance `layer_id` of `chain` with client-given
    /// `values` (checked by [`Chain::check_values`]). Its parameters,
    /// gradients and buffers are charged to the budgets before any is
    /// allocated.
    pub fn create_layer(
        &self,
        layer_id: &str,
        layer: NewLayer,
    ) -> Result<Arc<LayerInstance>, Error> {
        check_id("layer_id", layer_id)?;
        self.check_room(layer_id)?;
        let held = self.reserve(layer.chain.held_bytes())?;
        let members = layer.chain.initial_state(layer.params);
        self.insert(layer_id, layer.chain, layer.recipe, members, held)
    }

    /// The layer instance `layer_id`, added as `chain` (one without
    /// parameters) if the session has none of that name; one of another kind
    /// is an error.
    pub fn layer_or_create(
        &self,
        layer_id: &str,
        chain: Chain,
    ) -> Result<Arc<LayerInstance>, Error> {
        check_id("layer_id", layer_id)?;
        if let Ok(existing) = self.layer(layer_id) {
            self.check_kind(layer_id, &existing, &chain)?;
            return Ok(existing);
        }
        let created = self.check_room(layer_id).and_then(|()| {
            let held = self.reserve(chain.held_bytes())?;
            let members = chain.initial_state(HashMap::new());
            let recipe = Recipe::plain(chain.kind());
            self.insert(layer_id, chain.clone(), recipe, members, held)
        });
        match created {
            // Another call created it meanwhile.
            Err(Error::LayerExists { .. }) => {
                let existing = self.layer(layer_id)?;
                self.check_kind(layer_id, &existing, &chain)?;
                Ok(existing)
            }
            result => result,
        }
    }

    /// Fails if `layer_id` exists or the session is full.
    fn check_room(&self, layer_id: &str) -> Result<(), Error> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        if layers.contains_key(layer_id) {
            return Err(Error::LayerExists {
                session_id: self.id.clone(),
                layer_id: layer_id.to_string(),
            });
        }
        if layers.len() >= self.max_layers {
            return Err(Error::LimitExceeded {
                flag: "--max-layers-per-session",
                limit: self.max_layers.to_string(),
                detail: format!("session {:?} has {} layers", self.id, layers.len()),
            });
        }
        Ok(())
    }

    /// Inserts a built instance, checking again what may have changed while
    /// it was built without the lock.
    fn insert(
        &self,
        layer_id: &str,
        chain: Chain,
        recipe: Recipe,
        members: Vec<MemberState>,
        held: Charge,
    ) -> Result<Arc<LayerInstance>, Error> {
        self.check_room(layer_id)?;
        let instance = Arc::new(LayerInstance {
            chain: Arc::new(chain),
            recipe,
            state: tokio::sync::Mutex::new(InstanceState {
                members,
                kept: None,
                kept_lost: false,
                optimizer: None,
            }),
            _held: held,
        });
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers.insert(layer_id.to_string(), instance.clone());
        Ok(instance)
    }

    /// Fails unless `layer` (this session's `layer_id`) has `chain`'s kind.
    pub fn check_kind(
        &self,
        layer_id: &str,
        layer: &LayerInstance,
        chain: &Chain,
    ) -> Result<(), Error> {
        let kind = chain.kind();
        if layer.chain.kind() == kind {
            return Ok(());
        }
        Err(Error::invalid(
            "layer_id",
            format!("a layer of kind {kind} (or a new id)"),
            format!(
                "{layer_id:?}, a {} layer in session {:?}",
                layer.chain.kind(),
                self.id
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

    /// Its layer instances, sorted by id (the order calls lock them in).
    pub fn layers_by_id(&self) -> Vec<(String, Arc<LayerInstance>)> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted: Vec<_> = layers
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted
    }

    /// Its optimizers, sorted by id (the order calls lock them in).
    pub fn optimizers_by_id(&self) -> Vec<Arc<Optimizer>> {
        let optimizers = self.optimizers.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted: Vec<_> = optimizers.values().cloned().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted
    }

    /// Bytes held by this session (kept state, parameters, gradients, buffers).
    pub fn kept_bytes(&self) -> u64 {
        self.kept.used()
    }
}

#[cfg(test)]
mod tests {
    use super::ids::random_id;
    use super::*;
    use crate::auth::Principal;
    use crate::layers::Kind;
    use crate::tensor::Tensor;

    fn limits() -> Limits {
        Limits {
            max_sessions: 3,
            max_layers_per_session: 2,
            max_session_kept_bytes: 1000,
            max_total_kept_bytes: 1500,
            max_work_bytes: 1 << 20,
            default_idle_timeout: Duration::from_secs(60),
            max_idle_timeout: Duration::from_secs(600),
        }
    }

    fn plain(kind: crate::layers::Kind) -> Chain {
        Chain::single(crate::layers::Spec::unconfigured(kind).unwrap(), None)
    }

    fn add(session: &Session, id: &str, kind: crate::layers::Kind) -> Result<(), Error> {
        let layer = NewLayer {
            chain: plain(kind),
            params: HashMap::new(),
            recipe: Recipe::plain(kind),
        };
        session.create_layer(id, layer).map(drop)
    }

    fn anon() -> Principal {
        Principal::default()
    }

    #[tokio::test(start_paused = true)]
    async fn each_principal_has_its_own_id_space() {
        let (alice, bob) = (Principal::named("alice"), Principal::named("bob"));
        let guard = Store::start(limits());
        let store = guard.store();
        store.create(&alice, "s", 10).unwrap();
        add(&store.session(&alice, "s").unwrap(), "l", Kind::Relu).unwrap();
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
        add(&session, "l1", Kind::Relu).unwrap();
        assert!(matches!(
            add(&session, "l1", Kind::Relu),
            Err(Error::LayerExists { .. })
        ));
        add(&session, "l2", Kind::Sigmoid).unwrap();
        let err = add(&session, "l3", Kind::Relu).unwrap_err();
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
        let chain = plain(Kind::Sigmoid);
        let plan = chain.plan(&x, None, false).unwrap();
        let state = [MemberState::default()];
        let kept = chain
            .forward(&state, &x, None, &plan, false, true)
            .kept
            .unwrap();
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
