//! The lockout flag as this process knows it (SPEC section 1): once the first key exists,
//! operators' passwords are refused for good, so once the store has said the flag is set (or
//! this process set it), nobody needs to ask the store again.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Lockout(AtomicBool);

impl Lockout {
    /// True once API keys are known to be on.
    pub fn is_known(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// This process created the first key, read the flag, or heard another replica set it.
    pub fn note(&self) {
        self.0.store(true, Ordering::Release);
    }
}
