//! Byte budgets: kept state is reserved against a per-session and a global
//! budget before it is computed, and released when the reservation drops, so
//! the accounting cannot drift.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use bytesize::ByteSize;

use crate::error::Error;
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
