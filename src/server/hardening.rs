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

/// Raises the soft limit on open files to the hard limit (a connection is
/// a file) and returns the limit now in force.
pub fn raise_open_files() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Where the kernel lists active swap areas.
pub const PROC_SWAPS: &str = "/proc/swaps";

/// The swap areas listed in a `/proc/swaps` table (every line after the
/// header names one active area).
pub fn active_swaps(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Whether the kernel keeps this process's memory out of swap through its
/// cgroup (v2): `memory.swap.max` is `0` for its cgroup or an ancestor, as
/// systemd's `MemorySwapMax=0` and Kubernetes for Guaranteed pods set it.
/// `cgroup` is `/proc/self/cgroup`; `read` reads a cgroup file by its path
/// under the cgroup2 mount.
pub fn cgroup_keeps_out_of_swap(cgroup: &str, read: impl Fn(&str) -> Option<String>) -> bool {
    let Some(path) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let mut at = path.trim_end_matches('/').to_owned();
    loop {
        if read(&format!("{at}/memory.swap.max")).is_some_and(|v| v.trim() == "0") {
            return true;
        }
        match at.rfind('/') {
            Some(i) => at.truncate(i),
            None => return false,
        }
    }
}

/// The real `cgroup_keeps_out_of_swap`: cgroup2 mounted at
/// `/sys/fs/cgroup`, or at `/sys/fs/cgroup/unified` on hybrid systems.
pub fn this_cgroup_keeps_out_of_swap() -> bool {
    let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
        return false;
    };
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .any(|root| {
            cgroup_keeps_out_of_swap(&cgroup, |p| {
                std::fs::read_to_string(format!("{root}{p}")).ok()
            })
        })
}

/// What start-up does about swap, given the active swap areas, whether
/// memory is locked, whether `keys.allow_swap` is set, and whether this
/// is production (`serve`) or dev mode: `Err` refuses to start, `Ok(Some)`
/// is a warning to log.
pub fn swap_verdict(
    swaps: &[String],
    locked: bool,
    allow_swap: bool,
    production: bool,
) -> Result<Option<String>, String> {
    if swaps.is_empty() || locked {
        return Ok(None);
    }
    let what = format!(
        "swap is on ({}) and memory is not locked: card numbers, CVVs, collect session keys and data keys could be written to swap",
        swaps.join(", ")
    );
    if production && !allow_swap {
        return Err(format!(
            "{what}. Set keys.mlock = true (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK; the shipped systemd unit grants it), keep the process out of swap with its cgroup (memory.swap.max = 0: systemd MemorySwapMax=0, a Kubernetes Guaranteed pod), turn swap off, or accept the risk with keys.allow_swap = true"
        ));
    }
    Ok(Some(what))
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
    fn swap_refuses_production_unless_locked_or_allowed() {
        let table = "Filename\tType\tSize\tUsed\tPriority\n/swapfile file 1048572 0 -2\n/dev/sdb2 partition 8 0 -3\n";
        let on = active_swaps(table);
        assert_eq!(on, vec!["/swapfile", "/dev/sdb2"]);
        assert!(active_swaps("Filename\tType\tSize\tUsed\tPriority\n").is_empty());
        assert!(active_swaps("").is_empty());
        let e = swap_verdict(&on, false, false, true).unwrap_err();
        assert!(
            e.contains("/swapfile") && e.contains("keys.mlock") && e.contains("allow_swap"),
            "{e}"
        );
        assert!(swap_verdict(&on, true, false, true).unwrap().is_none());
        assert!(swap_verdict(&on, false, true, true).unwrap().is_some());
        assert!(swap_verdict(&on, false, false, false).unwrap().is_some());
        assert!(swap_verdict(&[], false, false, true).unwrap().is_none());
    }

    #[test]
    fn a_cgroup_with_swap_max_zero_keeps_memory_out_of_swap() {
        let files = |map: &'static [(&'static str, &'static str)]| {
            move |p: &str| {
                map.iter()
                    .find(|(k, _)| *k == p)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let unit = "0::/system.slice/cardvault.service\n";
        assert!(cgroup_keeps_out_of_swap(
            unit,
            files(&[("/system.slice/cardvault.service/memory.swap.max", "0\n")])
        ));
        // An ancestor's limit holds for everything below it.
        assert!(cgroup_keeps_out_of_swap(
            "0::/kubepods/pod1/c2\n",
            files(&[
                ("/kubepods/pod1/c2/memory.swap.max", "max\n"),
                ("/kubepods/pod1/memory.swap.max", "0\n")
            ])
        ));
        assert!(!cgroup_keeps_out_of_swap(
            unit,
            files(&[("/system.slice/cardvault.service/memory.swap.max", "max\n")])
        ));
        assert!(!cgroup_keeps_out_of_swap(unit, files(&[])));
        // cgroup v1 only: no "0::" line.
        assert!(!cgroup_keeps_out_of_swap("4:memory:/x\n", files(&[])));
    }

    #[test]
    fn hardening_makes_the_process_non_dumpable() {
        let warnings = harden_process();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(!is_dumpable());
        let lim = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(lim.current, Some(0));
    }
}
