//! Byte budgets: kept state is reserved against a per-session and a global
//! budget before it is computed, and released when the reservation drops, so
//! the accounting cannot drift; and the per-call limit on the largest array
//! ([`Session::check_work`]). The engine comes here, and only here, of the
//! session's files, once it holds a layer instance.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use bytesize::ByteSize;

use super::Session;
use crate::error::Error;
use crate::layers::Kept;
use crate::metrics;

/// Bytes reserved for one kept state, released on drop.
pub struct Charge {
    pub(super) bytes: u64,
    pub(super) _reservations: [Reservation; 2],
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A byte budget with a limit, shared by everything charged to it.
pub(super) struct Budget {
    used: AtomicU64,
    limit: u64,
    flag: &'static str,
    /// Whether this is the global budget, whose use is the kept-bytes gauge.
    global: bool,
}

impl Budget {
    pub(super) fn new(limit: u64, flag: &'static str, global: bool) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
            flag,
            global,
        }
    }

    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub(super) fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Error> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .map_err(|used| Error::LimitExceeded {
                flag: self.flag,
                limit: ByteSize(self.limit).to_string(),
                detail: format!(
                    "holding {} more would make {} (in use: {})",
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

pub(super) struct Reservation {
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

/// Kept state together with the budget it is charged to.
pub struct KeptEntry {
    pub kept: Kept,
    _charge: Charge,
}

impl KeptEntry {
    /// Binds `kept` to the bytes reserved for it; they are released on drop.
    pub fn new(kept: Kept, charge: Charge) -> KeptEntry {
        debug_assert_eq!(
            kept.bytes(),
            charge.bytes(),
            "kept bytes were declared exactly"
        );
        KeptEntry {
            kept,
            _charge: charge,
        }
    }
}

impl Session {
    /// Fails if a call would build an array of more than `--max-work-bytes`.
    pub fn check_work(&self, bytes: u64) -> Result<(), Error> {
        if bytes <= self.max_work_bytes {
            return Ok(());
        }
        Err(Error::LimitExceeded {
            flag: "--max-work-bytes",
            limit: bytesize::ByteSize(self.max_work_bytes).to_string(),
            detail: format!(
                "the call would build an array of {}",
                bytesize::ByteSize(bytes)
            ),
        })
    }

    /// Reserves `bytes` (kept state, or a layer's values) against this
    /// session's budget and the global one, or says which limit it would
    /// exceed.
    pub fn reserve(&self, bytes: u64) -> Result<Charge, Error> {
        let session = self.kept.reserve(bytes)?;
        let total = self.total_kept.reserve(bytes)?;
        Ok(Charge {
            bytes,
            _reservations: [session, total],
        })
    }
}
