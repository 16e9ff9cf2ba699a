//! A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` in a temp
//! dir on 127.0.0.1 and a free port, one per test binary, stopped by a
//! watchdog when the test process exits. Where PostgreSQL is not installed
//! the tests that need it print why and skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running cluster.
pub struct PgCluster {
    /// Port on 127.0.0.1.
    pub port: u16,
}

static CLUSTER: OnceLock<Option<PgCluster>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("CARDVAULT_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (initdb
/// refuses to run as root).
fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn start() -> Result<PgCluster, String> {
    let bin = find_bin_dir().ok_or("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql; install the Debian package `postgresql` or set CARDVAULT_PG_BIN")?;
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let root = std::env::temp_dir().join(format!("cardvault-pg-{}", std::process::id()));
    let data = root.join("data");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    if is_root {
        let ids = Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .map_err(|e| e.to_string())?;
        let uid: u32 = String::from_utf8_lossy(&ids.stdout)
            .trim()
            .parse()
            .map_err(|_| "no `postgres` user to run PostgreSQL as (we are root)")?;
        std::os::unix::fs::chown(&root, Some(uid), None).map_err(|e| e.to_string())?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .local_addr()
        .unwrap()
        .port();
    run(
        pg_command(&bin, "initdb", is_root)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]),
        "initdb",
    )?;
    let opts = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=300",
        root.display()
    );
    run(
        pg_command(&bin, "pg_ctl", is_root)
            .args(["-D"])
            .arg(&data)
            .args(["-l"])
            .arg(root.join("log"))
            .args(["-w", "-o", &opts, "start"]),
        "pg_ctl start",
    )?;
    // Stop the cluster and remove its files once this test process is gone.
    let pg_ctl = bin.join("pg_ctl");
    let stop = if is_root {
        format!(
            "runuser -u postgres -- {} -D {} stop -m immediate",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} stop -m immediate",
            pg_ctl.display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {root}",
        pid = std::process::id(),
        root = root.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .map_err(|e| e.to_string())?;
    Ok(PgCluster { port })
}

/// The shared cluster, started on first use; `None` (with the reason
/// printed) when PostgreSQL is not available.
pub fn cluster() -> Option<&'static PgCluster> {
    CLUSTER
        .get_or_init(|| match start() {
            Ok(c) => Some(c),
            Err(why) => {
                assert!(
                    std::env::var_os("CARDVAULT_REQUIRE_PG").is_none(),
                    "CARDVAULT_REQUIRE_PG is set but PostgreSQL is unavailable: {why}"
                );
                // Written to the real stderr (not the captured test output) so
                // the skip is visible in a passing run.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED PostgreSQL tests: {why}");
                None
            }
        })
        .as_ref()
}

impl PgCluster {
    /// Connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// Creates a fresh, empty database and returns its connection string.
    pub async fn fresh_database(&self) -> String {
        let name = format!(
            "cv_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        self.url(&name)
    }
}
