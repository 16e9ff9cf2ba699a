//! Process hardening at start-up: keys live in this process's memory, so
//! it must not be dumped to disk (core files, /proc/PID/mem readers) and,
//! optionally, must not be swapped out.

/// Disables core dumps and ptrace-style inspection by unprivileged peers
/// (`PR_SET_DUMPABLE = 0`), and sets `RLIMIT_CORE` to 0. Failures are
/// returned as warnings: the vault still runs, but ops should know.
pub fn harden_process() -> Vec<String> {
    let mut warnings = Vec::new();
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        warnings.push(format!("cannot disable core dumps (PR_SET_DUMPABLE): {e}"));
    }
    let zero = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Core, zero) {
        warnings.push(format!("cannot set RLIMIT_CORE to 0: {e}"));
    }
    warnings
}

/// Locks all current and future pages in RAM (`mlockall`) so key material
/// never reaches swap. Needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK.
pub fn lock_memory() -> Result<(), String> {
    use rustix::mm::{MlockAllFlags, mlockall};
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE)
        .map_err(|e| format!("mlockall failed: {e}"))
}

/// Whether the process is currently marked non-dumpable.
pub fn is_dumpable() -> bool {
    rustix::process::dumpable_behavior()
        .map(|b| b != rustix::process::DumpableBehavior::NotDumpable)
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_makes_the_process_non_dumpable() {
        let warnings = harden_process();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(!is_dumpable());
        let lim = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(lim.current, Some(0));
    }
}
