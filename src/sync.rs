//! One way to take a lock: a poisoned lock is recovered, not propagated.
//!
//! A panic while a lock is held poisons it. The vault's locks guard state
//! that every update leaves whole (single map operations, swaps of an
//! `Arc`, counters), so what a panicking thread left behind is still
//! consistent, and refusing every later request would turn one bug into an
//! outage. Where that is not true, the lock's own comment says so and the
//! code does not use this.

use std::sync::LockResult;

/// Takes the guard out of a lock result, poisoned or not.
pub(crate) trait Recover<G> {
    /// The guard, whether or not another thread panicked holding the lock.
    fn recover(self) -> G;
}

impl<G> Recover<G> for LockResult<G> {
    fn recover(self) -> G {
        self.unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_poisoned_lock_is_recovered_with_its_value() {
        let m = Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.lock().recover(), 5);
    }
}
