//! Prometheus metrics on a separate plain-HTTP port.
//!
//! Labels are deliberately coarse: RPC method, gRPC code and caller role.
//! No PAN, token, CVV or principal ever becomes a label (tokens would also
//! explode cardinality). Per-request counts and latencies come from a tower
//! layer around every gRPC service; gauges are computed at scrape time.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::auth::Authorizer;
use crate::server::tls::Peer;
use crate::sync::Recover;
use crate::vault::Vault;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Request counters and latency histograms.
#[derive(Default)]
pub struct Metrics {
    /// (rpc, code, role) -> count. Labels are static strings from bounded
    /// sets, so counting a request allocates nothing.
    requests: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    /// rpc -> latency histogram.
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Connections refused at the TLS handshake.
    pub tls_handshake_failures: AtomicU64,
    /// Connections established and not yet closed.
    pub connections_open: std::sync::atomic::AtomicUsize,
    /// Connections closed at once: the connection limit was reached.
    pub connections_refused: AtomicU64,
    /// Handshakes closed to make room for a newer connection (the
    /// handshake limit was reached).
    pub handshakes_evicted: AtomicU64,
    /// Gauges read from the store, refreshed in the background so that a
    /// scrape never waits on the store (see [`serve`]).
    store_gauges: Mutex<StoreGauges>,
    /// Whether per-tenant gauges carry the tenant's name as a label
    /// (config `metrics.tenant_labels`); off, they are summed up.
    pub tenant_labels: std::sync::atomic::AtomicBool,
}

/// The gauges read from the store, as of their last refresh.
#[derive(Default)]
struct StoreGauges {
    /// Records in the audit chain.
    audit_records: Option<u64>,
    /// Tenant -> (active data key version, versions that can decrypt).
    data_keys: Option<BTreeMap<String, (u32, u32)>>,
}

/// How often the store-read gauges are refreshed.
pub(crate) const STORE_GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);
/// Scrapes served at once; more get 503 at once.
pub(crate) const MAX_CONCURRENT_SCRAPES: usize = 4;

/// Every method the server serves, as `package.Service/Method`, read once
/// from the services' descriptor sets (so the list follows the protos).
/// Any other path is counted as `unknown`, so a client cannot create label
/// values at will.
static METHODS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
    std::sync::LazyLock::new(|| {
        use prost::Message;
        let mut set = std::collections::HashSet::new();
        for fds in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let fds = prost_types::FileDescriptorSet::decode(fds)
                .expect("built-in descriptor sets decode");
            for f in &fds.file {
                for svc in &f.service {
                    for m in &svc.method {
                        let name = format!("{}.{}/{}", f.package(), svc.name(), m.name());
                        // Leaked once per method of a fixed set.
                        set.insert(&*Box::leak(name.into_boxed_str()));
                    }
                }
            }
        }
        set.insert("grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        set.insert("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
        set
    });

fn rpc_label(path: &str) -> &'static str {
    path.strip_prefix('/')
        .and_then(|p| METHODS.get(p).copied())
        .unwrap_or("unknown")
}

impl Metrics {
    /// Records one finished request.
    pub fn observe(&self, rpc: &'static str, code: &'static str, role: &'static str, seconds: f64) {
        *self
            .requests
            .lock()
            .recover()
            .entry((rpc, code, role))
            .or_insert(0) += 1;
        let mut lat = self.latency.lock().recover();
        let h = lat.entry(rpc).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Renders everything in the Prometheus text format.
    pub async fn render(&self, vault: &Vault, auth: &Authorizer) -> String {
        let mut out = String::new();
        out.push_str("# HELP cardvault_requests_total gRPC requests by method, status code and caller role.\n");
        out.push_str("# TYPE cardvault_requests_total counter\n");
        for ((rpc, code, role), n) in self.requests.lock().recover().iter() {
            out.push_str(&format!(
                "cardvault_requests_total{{rpc=\"{rpc}\",code=\"{code}\",role=\"{role}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP cardvault_request_duration_seconds gRPC request latency (to response headers).\n");
        out.push_str("# TYPE cardvault_request_duration_seconds histogram\n");
        for (rpc, h) in self.latency.lock().recover().iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                out.push_str(&format!(
                    "cardvault_request_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"{b}\"}} {}\n",
                    h.counts[i]
                ));
            }
            out.push_str(&format!(
                "cardvault_request_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}} {}\n\
                 cardvault_request_duration_seconds_sum{{rpc=\"{rpc}\"}} {}\n\
                 cardvault_request_duration_seconds_count{{rpc=\"{rpc}\"}} {}\n",
                h.count, h.sum, h.count
            ));
        }
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        gauge(
            &mut out,
            "cardvault_sealed",
            "1 while the vault holds no keys.",
            "gauge",
            vault.is_sealed() as u64,
        );
        gauge(
            &mut out,
            "cardvault_cvv_held",
            "CVVs currently held in memory.",
            "gauge",
            vault.cvv_holder().len() as u64,
        );
        gauge(
            &mut out,
            "cardvault_collect_sessions",
            "Collect session keys currently held in memory.",
            "gauge",
            vault.collect_sessions().len() as u64,
        );
        gauge(
            &mut out,
            "cardvault_rate_limited_total",
            "Detokenize calls refused by a principal's budget.",
            "counter",
            auth.rate_limited_total(),
        );
        gauge(
            &mut out,
            "cardvault_tokenize_rate_limited_total",
            "Cards refused by a principal's tokenize or collision budget.",
            "counter",
            auth.tokenize_limited_total(),
        );
        gauge(
            &mut out,
            "cardvault_enumeration_locks_total",
            "Buckets the enumeration guard locked (too many distinct cards with the same visible digits).",
            "counter",
            vault.enumeration_locks(),
        );
        gauge(
            &mut out,
            "cardvault_enumeration_refusals_total",
            "Tokenizes refused because their bucket was locked.",
            "counter",
            vault.enumeration_refusals(),
        );
        gauge(
            &mut out,
            "cardvault_audit_write_failures_total",
            "Audit appends that failed (the operation failed with them).",
            "counter",
            vault.audit_write_failures(),
        );
        gauge(
            &mut out,
            "cardvault_audit_sink_dropped_total",
            "Audit SIEM lines dropped because the sink could not keep up.",
            "counter",
            vault.audit_sink_dropped(),
        );
        gauge(
            &mut out,
            "cardvault_tls_handshake_failures_total",
            "Connections refused during the TLS handshake.",
            "counter",
            self.tls_handshake_failures.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "cardvault_connections_open",
            "TLS connections established and open.",
            "gauge",
            self.connections_open.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "cardvault_connections_refused_total",
            "Connections closed at once because the connection limit was reached.",
            "counter",
            self.connections_refused.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "cardvault_handshakes_evicted_total",
            "TLS handshakes closed to make room for newer connections (handshake limit reached).",
            "counter",
            self.handshakes_evicted.load(Ordering::Relaxed),
        );
        let cached = self.store_gauges.lock().recover();
        if let Some(n) = cached.audit_records {
            gauge(
                &mut out,
                "cardvault_audit_records",
                "Records in the audit chain.",
                "gauge",
                n,
            );
        }
        if let Some(active) = &cached.data_keys {
            if self.tenant_labels.load(Ordering::Relaxed) {
                out.push_str(
                    "# HELP cardvault_data_key_active_version Active data key version per tenant.\n",
                );
                out.push_str("# TYPE cardvault_data_key_active_version gauge\n");
                for (t, (v, _)) in active {
                    out.push_str(&format!(
                        "cardvault_data_key_active_version{{tenant=\"{t}\"}} {v}\n"
                    ));
                }
                out.push_str("# HELP cardvault_data_key_versions Data key versions that can still decrypt, per tenant.\n");
                out.push_str("# TYPE cardvault_data_key_versions gauge\n");
                for (t, (_, n)) in active {
                    out.push_str(&format!(
                        "cardvault_data_key_versions{{tenant=\"{t}\"}} {n}\n"
                    ));
                }
            } else {
                // Tenant names are customer names: not in labels unless asked.
                gauge(
                    &mut out,
                    "cardvault_tenants_with_keys",
                    "Tenants that have data keys.",
                    "gauge",
                    active.len() as u64,
                );
                gauge(
                    &mut out,
                    "cardvault_data_key_versions_max",
                    "Most data key versions that can still decrypt, over all tenants (retire old ones).",
                    "gauge",
                    u64::from(active.values().map(|(_, n)| *n).max().unwrap_or(0)),
                );
            }
        }
        out
    }
}

impl Metrics {
    /// Reads the store-backed gauges into the cache.
    pub async fn refresh_store_gauges(&self, vault: &Vault) {
        let audit_records = vault
            .store()
            .audit_head()
            .await
            .ok()
            .map(|h| h.map_or(0, |h| h.0));
        let data_keys = vault.store().list_keys("tenant/").await.ok().map(|keys| {
            let mut active: BTreeMap<String, (u32, u32)> = BTreeMap::new();
            for (name, _) in keys {
                let mut parts = name.split('/');
                if let (Some("tenant"), Some(t), Some("dek"), Some(v)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                    && let Ok(v) = v.parse::<u32>()
                {
                    let e = active.entry(t.to_owned()).or_insert((0, 0));
                    e.0 = e.0.max(v);
                    e.1 += 1;
                }
            }
            active
        });
        let mut g = self.store_gauges.lock().recover();
        // A failed read keeps the last good value.
        if audit_records.is_some() {
            g.audit_records = audit_records;
        }
        if data_keys.is_some() {
            g.data_keys = data_keys;
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted. A tiny
/// HTTP/1.1 responder: one request per connection, no keep-alive. The
/// gauges read from the store are refreshed every [`STORE_GAUGE_REFRESH`]
/// in the background, so a scrape costs the store nothing (scrapes used to
/// wait on its commit barrier); at most [`MAX_CONCURRENT_SCRAPES`] run at
/// once.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    vault: Arc<Vault>,
    auth: Arc<Authorizer>,
) {
    let refresh = {
        let (metrics, vault) = (metrics.clone(), vault.clone());
        async move {
            loop {
                metrics.refresh_store_gauges(&vault).await;
                tokio::time::sleep(STORE_GAUGE_REFRESH).await;
            }
        }
    };
    tokio::select! {
        () = refresh => {}
        () = serve_scrapes(listener, metrics, vault, auth) => {}
    }
}

async fn serve_scrapes(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    vault: Arc<Vault>,
    auth: Arc<Authorizer>,
) {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning (the gRPC
                // listener shares the descriptor limit).
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            // Turned away without rendering anything. The request is read
            // (a little, briefly) after the answer, so that closing the
            // socket does not reset it before the scraper reads the 503.
            tokio::spawn(async move {
                let _ = sock
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = sock.shutdown().await;
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    while let Ok(n) = sock.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            });
            continue;
        };
        let (metrics, vault, auth) = (metrics.clone(), vault.clone(), auth.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded in size and time).
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", metrics.render(&vault, &auth).await)
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Tower layer that counts and times every gRPC request.
#[derive(Clone)]
pub(crate) struct MetricsLayer {
    /// Where observations go.
    pub metrics: Arc<Metrics>,
    /// To turn the caller's certificate into a role label.
    pub auth: Arc<Authorizer>,
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`MetricsLayer`].
#[derive(Clone)]
pub(crate) struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let rpc = rpc_label(req.uri().path());
        let principal = req.extensions().get::<Peer>().and_then(Peer::principal);
        let role = self.layer.auth.role_label(principal);
        let metrics = self.layer.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                // Unary errors are "trailers-only": the status is in the headers.
                // Otherwise it follows in the trailers, after a successful start.
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", |c| code_name(c)),
                Err(_) => "TRANSPORT_ERROR",
            };
            metrics.observe(rpc, code, role, start.elapsed().as_secs_f64());
            res
        })
    }
}

fn code_name(c: i32) -> &'static str {
    match tonic::Code::from_i32(c) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_rpc_labels() {
        for m in [
            "cardvault.v1.TokenService/Tokenize",
            "cardvault.v1.TokenService/Detokenize",
            "cardvault.v1.KeyService/Rewrap",
            "cardvault.v1.AuditService/Verify",
            "grpc.health.v1.Health/Check",
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(rpc_label(&format!("/{m}")), m);
        }
        for p in [
            "/cardvault.v1.TokenService/Tokenize2",
            "/cardvault.v1.TokenService/",
            "cardvault.v1.TokenService/Tokenize",
            "/x",
            "",
        ] {
            assert_eq!(rpc_label(p), "unknown", "{p}");
        }
    }
}
