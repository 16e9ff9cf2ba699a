//! The `cardvault` CLI against a dev vault, as the README and the dev
//! banner tell a newcomer to use it.

mod common;

use std::process::Command;

use common::{Opts, VaultProcess, exp_year};

fn cli(v: &VaultProcess, args: &[&str]) -> (bool, String, String) {
    let port = v.addr.rsplit(':').next().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .args(["--addr", &format!("https://localhost:{port}"), "--dev-dir"])
        .arg(&v.data_dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn newcomer_flow_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    // No retire grace, so the walkthrough can retire v1 right after its rewrap.
    let opts = Opts {
        env: vec![("CARDVAULT_RETIRE_GRACE_SECS".into(), "0".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&dir.path().join("data"), &opts);
    let exp = format!("12/{}", exp_year());
    let (ok, out, err) = cli(
        &v,
        &[
            "tokenize",
            "--pan",
            "4111111111111111",
            "--exp",
            &exp,
            "--cvv",
            "123",
        ],
    );
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let token = t["token"].as_str().unwrap().to_owned();
    assert_eq!(t["last4"], "1111");

    let (ok, out, err) = cli(&v, &["metadata", &token]);
    assert!(ok, "{err}");
    assert!(out.contains("\"cvv_held\":true"), "{out}");

    let (ok, out, err) = cli(
        &v,
        &[
            "detokenize",
            &token,
            "--purpose",
            "authorization",
            "--include-cvv",
        ],
    );
    assert!(ok, "{err}");
    let c: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (c["pan"].as_str(), c["cvv"].as_str()),
        (Some("4111111111111111"), Some("123"))
    );

    // A merchant identity cannot read the card, and says why.
    let (ok, _, err) = cli(
        &v,
        &["--as", "merchant", "detokenize", &token, "--purpose", "x"],
    );
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");
    // Bad input: the field and the reason, never the value.
    let (ok, _, err) = cli(
        &v,
        &["tokenize", "--pan", "4111111111111112", "--exp", &exp],
    );
    assert!(
        !ok && err.contains("pan: fails the Luhn check") && !err.contains("4111111111111112"),
        "{err}"
    );

    let cert = v.data_dir.join("certs/processor.pem");
    let (ok, out, err) = cli(
        &v,
        &[
            "audit",
            "blast-radius",
            "--certificate",
            cert.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["distinct_tokens"], 1);
    assert_eq!(r["tenants"][0]["tokens"][0]["token"], token.as_str());

    let (ok, out, err) = cli(&v, &["audit", "query", "--action", "Detokenize"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&token) && out.contains("PERMISSION_DENIED"),
        "{out}"
    );
    let (ok, out, err) = cli(&v, &["audit", "verify"]);
    assert!(ok && out.contains("audit log intact"), "{out}{err}");

    let (ok, out, err) = cli(&v, &["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("sealed: false")
            && out.contains("mode: dev")
            && out.contains("tenant demo: active v1"),
        "{out}"
    );
    let (ok, out, err) = cli(&v, &["keys", "rotate", "--tenant", "demo"]);
    assert!(ok && out.contains("now v2"), "{out}{err}");
    let (ok, out, err) = cli(&v, &["keys", "rewrap"]);
    assert!(ok && out.contains("rewrapped 1 records"), "{out}{err}");
    // The progress bar is for a terminal: none in a pipe or a log.
    assert!(
        !err.contains('[') && !err.contains('\r') && !err.contains('\x1b'),
        "progress bar off a terminal: {err:?}"
    );
    let (ok, out, err) = cli(
        &v,
        &["keys", "retire", "--tenant", "demo", "--version", "1"],
    );
    assert!(ok && out.contains("v1 destroyed"), "{out}{err}");
    let (ok, out, _) = cli(&v, &["status"]);
    assert!(ok && out.contains("v1    retired=20"), "{out}");
    let (ok, out, _) = cli(&v, &["detokenize", &token, "--purpose", "after rewrap"]);
    assert!(ok && out.contains("4111111111111111"));

    // Readiness for exec probes: SERVING while unsealed, not after a seal.
    let (ok, out, err) = cli(&v, &["health"]);
    assert!(
        ok && out.contains("cardvault.v1.TokenService: SERVING"),
        "{out}{err}"
    );
    let (ok, _, err) = cli(&v, &["seal"]);
    assert!(ok, "{err}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (ok, out, _) = cli(&v, &["health"]);
    assert!(!ok && out.contains("NOT_SERVING"), "{out}");
    let (ok, out, _) = cli(&v, &["health", "--service", "cardvault.v1.KeyService"]);
    assert!(
        ok && out.contains("SERVING"),
        "KeyService stays up while sealed: {out}"
    );
}

/// Secrets from standard input, not argv (where `ps` and shell history see
/// them): `--pan-stdin --cvv-stdin` read a line each. And `audit query`
/// says when it stopped at --limit, and where to go on from.
#[tokio::test]
async fn secrets_from_stdin_and_audit_query_paging() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let port = v.addr.rsplit(':').next().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .args(["--addr", &format!("https://localhost:{port}"), "--dev-dir"])
        .arg(&v.data_dir)
        .args(["tokenize", "--pan-stdin", "--cvv-stdin", "--exp"])
        .arg(format!("12/{}", exp_year()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"5555 5555 5555 4444\n737\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (t["last4"].as_str(), t["cvv_held"].as_bool()),
        (Some("4444"), Some(true))
    );

    // Several records now (tokenize, the CLI's own queries...): one at a time.
    let (ok, out, err) = cli(&v, &["audit", "query", "--json", "--limit", "1"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let first: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let seq = first["seq"].as_u64().unwrap();
    assert!(err.contains(&format!("--after-seq {seq}")), "{err}");
    let (ok, out, err) = cli(
        &v,
        &["audit", "query", "--json", "--after-seq", &seq.to_string()],
    );
    assert!(ok, "{err}");
    let next: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(next["seq"].as_u64().unwrap() > seq, "{out}");
    assert!(!err.contains("limit of"), "{err}");
}

/// What a newcomer types wrong gets an answer that says what to type, not
/// "transport error"; the dev server refuses the client's name for its
/// directory instead of ignoring it; logs to a file carry no colour codes.
#[tokio::test]
async fn mistakes_get_answers_that_say_what_to_type() {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    let port = v.addr.rsplit(':').next().unwrap().to_owned();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(args)
            .arg("--dev-dir")
            .arg(&v.data_dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["status", "--addr", &format!("127.0.0.1:{port}")]);
    assert!(
        !ok && err.contains(&format!("https://127.0.0.1:{port}")),
        "{err}"
    );
    let (ok, err) = run(&["status", "--addr", &format!("http://127.0.0.1:{port}")]);
    assert!(!ok && err.contains("only TLS"), "{err}");
    let (ok, err) = run(&["status", "--addr", "https://127.0.0.1:1"]);
    assert!(!ok && err.to_lowercase().contains("refused"), "{err}");
    let (ok, out) = run(&["status", "--addr", &format!("https://localhost:{port}")]);
    assert!(ok, "{out}");
    // Times print as RFC 3339 (the first query finds its own record only
    // on the second run: a query is recorded after it scans).
    let query = || {
        Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(["audit", "query", "--json", "--addr"])
            .arg(format!("https://localhost:{port}"))
            .arg("--dev-dir")
            .arg(&v.data_dir)
            .output()
            .unwrap()
    };
    query();
    let out = query();
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    let time = event["time"].as_str().unwrap();
    assert!(
        time.len() == 20 && time.ends_with('Z') && time.contains('T'),
        "{time}"
    );
    let (ok, err) = run(&["dev", "--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("--data-dir"), "{err}");
    // The vault's stderr here is a file: no ANSI escape codes in it.
    assert!(!v.logs().contains('\u{1b}'), "colour codes in a log file");
}

/// The server commands take only their own flags: `dev --help` lists no
/// client flag, and a client flag given to `dev` or `serve` is refused,
/// before or after the command. Client commands take them after the
/// command as well as before it.
#[test]
fn server_and_client_commands_take_only_their_own_flags() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cardvault"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for server in ["dev", "serve"] {
        let (ok, help, _) = run(&[server, "--help"]);
        assert!(ok);
        for flag in [
            "--addr",
            "--ca ",
            "--cert",
            "--as ",
            "--dev-dir",
            "--server-name",
        ] {
            assert!(
                !help.contains(flag),
                "{server} --help lists {flag}:\n{help}"
            );
        }
        let (ok, _, err) = run(&["--addr", "https://localhost:1", server]);
        assert!(!ok && err.contains("--addr is a client flag"), "{err}");
        let (ok, _, err) = run(&[server, "--as", "merchant"]);
        assert!(!ok && err.contains("--as"), "{err}");
    }
    let (ok, help, _) = run(&["tokenize", "--help"]);
    assert!(
        ok && help.contains("--addr") && help.contains("--dev-dir"),
        "{help}"
    );
    let (_, _, err) = run(&["--dev-dir", "/nonexistent-dir", "status"]);
    assert!(err.contains("/nonexistent-dir/certs"), "{err}");
    let (_, _, err) = run(&["audit", "query", "--dev-dir", "/nonexistent-dir"]);
    assert!(err.contains("/nonexistent-dir/certs"), "{err}");
    // The vault ships no load generator: that is `cardvault-bench`.
    let (ok, help, _) = run(&["--help"]);
    assert!(ok && !help.contains("bench"), "{help}");
    let (ok, _, err) = run(&["bench", "--op", "tokenize"]);
    assert!(
        !ok && err.contains("unrecognized subcommand 'bench'"),
        "{err}"
    );
}
