//! CPU time of processes and threads, read from `/proc` (Linux), so that
//! `cardvault-bench` can report the CPU each request cost the server and the
//! client: the split the project's profiling work otherwise reads by hand.
//!
//! Elsewhere (no `/proc`) every reading is `None` and the bench reports
//! throughput and latency only.

use std::time::Duration;

/// Thread name of the in-process baseline server's runtime, which tells its
/// threads apart from the bench client's.
pub(super) const BASELINE_THREAD: &str = "bench-baseline";

/// Whose CPU a run charges to the server.
#[derive(Debug, Clone, Copy)]
pub(super) enum Server {
    /// The vault process with this pid (`--vault-pid`), if known.
    Vault(Option<u32>),
    /// The baseline server's threads in this process.
    Baseline,
}

/// CPU time used so far by the server and by the client (this process,
/// without the baseline server's threads).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    server: Option<Duration>,
    client: Option<Duration>,
}

impl Sample {
    /// Reads the counters now.
    pub(super) fn take(server: Server) -> Sample {
        let own = process("self");
        let baseline = baseline_threads();
        Sample {
            server: match server {
                Server::Vault(pid) => pid.and_then(|p| process(&p.to_string())),
                Server::Baseline => baseline,
            },
            // The whole process, which also counts threads that have exited,
            // minus the baseline's threads (which live as long as it does).
            client: own.zip(baseline).map(|(o, b)| o.saturating_sub(b)),
        }
    }

    /// Microseconds of server and client CPU per request between `self` and
    /// `later`, for a run that completed `ops` requests.
    pub(super) fn per_op(&self, later: &Sample, ops: u64) -> (Option<f64>, Option<f64>) {
        let per = |a: Option<Duration>, b: Option<Duration>| {
            let used = b?.checked_sub(a?)?;
            (ops > 0).then(|| used.as_secs_f64() * 1e6 / ops as f64)
        };
        (
            per(self.server, later.server),
            per(self.client, later.client),
        )
    }
}

/// Whether process `pid` exists and its CPU time can be read.
pub(super) fn readable(pid: u32) -> bool {
    process(&pid.to_string()).is_some()
}

/// User + system CPU time of a process (all its threads, including exited
/// ones); `pid` is a number or `self`.
fn process(pid: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text, rustix::param::clock_ticks_per_second())
}

/// User + system CPU time of this process's baseline server threads (zero
/// when there are none).
fn baseline_threads() -> Option<Duration> {
    let ticks = rustix::param::clock_ticks_per_second();
    let mut sum = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        // A thread that ended meanwhile is skipped: baseline threads do not.
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("stat")) else {
            continue;
        };
        if comm(&text) == Some(BASELINE_THREAD) {
            sum += parse_stat(&text, ticks)?;
        }
    }
    Some(sum)
}

/// The command (thread) name: field 2 of a stat line, in parentheses.
fn comm(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// User + system CPU time from the text of a `/proc/.../stat` file. The
/// name in field 2 may hold spaces and parentheses, so fields are counted
/// from the last `)`.
fn parse_stat(stat: &str, ticks_per_s: u64) -> Option<Duration> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
    // After the name come state (field 3) ... utime (14) and stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    (ticks_per_s > 0).then(|| Duration::from_secs_f64((utime + stime) as f64 / ticks_per_s as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line of a thread whose name has a space and a parenthesis.
    const STAT: &str = "4242 (log (flusher) S 1 4242 4242 0 -1 4194368 120 0 0 0 \
                        250 75 0 0 20 0 9 0 1234 1000 50 18446744073709551615";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        assert_eq!(comm(STAT), Some("log (flusher"));
        // utime 250 + stime 75 ticks at 100 per second.
        assert_eq!(parse_stat(STAT, 100), Some(Duration::from_millis(3250)));
        assert_eq!(parse_stat(STAT, 0), None);
        assert_eq!(parse_stat("4242 (cut", 100), None);
        assert_eq!(parse_stat("4242 (short) S 1 2 3", 100), None);
    }

    #[test]
    fn per_op_divides_the_difference_by_the_requests() {
        let s = |server: u64, client: u64| Sample {
            server: Some(Duration::from_millis(server)),
            client: Some(Duration::from_millis(client)),
        };
        assert_eq!(
            s(100, 50).per_op(&s(300, 150), 1000),
            (Some(200.0), Some(100.0))
        );
        // No requests, no figure; nor from a counter that went backwards.
        assert_eq!(s(100, 50).per_op(&s(300, 150), 0), (None, None));
        assert_eq!(s(300, 50).per_op(&s(100, 150), 1000), (None, Some(100.0)));
        let unknown = Sample {
            server: None,
            client: Some(Duration::from_millis(150)),
        };
        assert_eq!(s(100, 50).per_op(&unknown, 1000), (None, Some(100.0)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn baseline_threads_are_charged_to_the_server_not_the_client() {
        let ticks = rustix::param::clock_ticks_per_second();
        let before = Sample::take(Server::Baseline);
        let (done, spun) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(BASELINE_THREAD.into())
            .spawn(move || {
                // Spin until this thread has used 300 ms of CPU by its own
                // counter, however busy the machine is.
                let own = || {
                    let text = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
                    parse_stat(&text, ticks).unwrap()
                };
                while own() < Duration::from_millis(300) {}
                done.send(()).unwrap();
                // Stay alive until sampled: a thread's counters go with it.
                std::thread::park();
            })
            .unwrap();
        spun.recv().unwrap();
        let after = Sample::take(Server::Baseline);
        thread.thread().unpark();
        thread.join().unwrap();
        let (server, client) = before.per_op(&after, 1);
        assert!(server.unwrap() >= 300_000.0, "baseline CPU {server:?}");
        // The spin is not the client's; the client's figure stays readable.
        assert!(client.is_some());
        assert!(readable(std::process::id()));
        assert!(!readable(u32::MAX));
    }
}
