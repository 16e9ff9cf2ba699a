//! A demo merchant shop that collects cards without its backend seeing
//! them. Run next to `cardvault dev`:
//!
//! ```text
//! cargo run --example demo-shop
//! ```
//!
//! It serves two origins: the checkout page (the merchant's, default
//! <http://127.0.0.1:8080>) and the card fields page (what the vault's
//! operator hosts, default <http://127.0.0.1:8081>). The checkout page
//! embeds the fields in an iframe and gets back only a sealed string,
//! which its backend (this program) relays to `TokenizeSealed`. Every
//! request body the backend receives is logged, so that anyone can check
//! the log holds no card number.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cardvault::proto::token_service_client::TokenServiceClient;
use cardvault::proto::{CreateCollectSessionRequest, TokenizeSealedRequest};
use clap::Parser;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(about = "Demo merchant shop for cardvault's sealed card collection")]
struct Args {
    /// Address of the checkout page (the merchant's origin).
    #[arg(long, default_value = "127.0.0.1:8080")]
    shop: SocketAddr,
    /// Address of the card fields page (the fields origin).
    #[arg(long, default_value = "127.0.0.1:8081")]
    fields: SocketAddr,
    /// The vault.
    #[arg(long, default_value = "https://localhost:7443")]
    addr: String,
    /// The dev vault's directory, for its CA and the merchant certificate.
    #[arg(long, default_value = "./cardvault-dev")]
    dev_dir: PathBuf,
    /// Tenant the shop tokenizes into.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Where every request the backend receives is logged.
    #[arg(long, default_value = "demo-shop.log")]
    log: PathBuf,
    /// Directory of the web files (collect.js, fields.html, demo/).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/web"))]
    web: PathBuf,
    /// Also serve the browser test pages (web/test) on the fields origin.
    #[arg(long)]
    test_pages: bool,
}

/// What both servers share.
struct Shop {
    /// The merchant's connection to the vault.
    vault: TokenServiceClient<Channel>,
    tenant: String,
    web: PathBuf,
    /// `http://host:port` of each server.
    shop_origin: String,
    fields_origin: String,
    /// The request log.
    log: Mutex<std::fs::File>,
    test_pages: bool,
}

impl Shop {
    /// Logs a request the backend received, body included.
    fn log(&self, method: &str, path: &str, body: &[u8]) {
        let line = json!({
            "time": cardvault::time::rfc3339(now_ms()),
            "method": method,
            "path": path,
            "body": String::from_utf8_lossy(body),
        });
        println!("{line}");
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{line}");
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let vault = connect(&args).await?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .map_err(|e| format!("cannot open {}: {e}", args.log.display()))?;
    let shop_listener = tokio::net::TcpListener::bind(args.shop)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.shop))?;
    let fields_listener = tokio::net::TcpListener::bind(args.fields)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.fields))?;
    let origin = |l: &tokio::net::TcpListener| {
        l.local_addr()
            .map(|a| format!("http://{a}"))
            .map_err(|e| e.to_string())
    };
    let shop = Arc::new(Shop {
        vault,
        tenant: args.tenant.clone(),
        web: args.web.clone(),
        shop_origin: origin(&shop_listener)?,
        fields_origin: origin(&fields_listener)?,
        log: Mutex::new(log),
        test_pages: args.test_pages,
    });
    let shop_app = Router::new()
        .route("/", get(checkout_page))
        .route("/config", get(config))
        .route("/session", post(create_session))
        .route("/pay", post(pay))
        .fallback(get(shop_file))
        .with_state(shop.clone());
    let fields_app = Router::new()
        .fallback(get(fields_file))
        .with_state(shop.clone());
    println!(
        "demo shop: checkout {}/  (card fields served from {})",
        shop.shop_origin, shop.fields_origin
    );
    println!("demo shop: request log {}", args.log.display());
    let a = axum::serve(shop_listener, shop_app);
    let b = axum::serve(fields_listener, fields_app);
    tokio::select! {
        r = a => r.map_err(|e| e.to_string()),
        r = b => r.map_err(|e| e.to_string()),
    }
}

/// The merchant's mTLS connection to the vault (the dev merchant identity).
async fn connect(args: &Args) -> Result<TokenServiceClient<Channel>, String> {
    let certs = args.dev_dir.join("certs");
    let read = |n: &str| {
        std::fs::read(certs.join(n)).map_err(|e| {
            format!(
                "cannot read {}: {e} (start `cardvault dev` first, or pass --dev-dir)",
                certs.join(n).display()
            )
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read("merchant.pem")?,
            read("merchant.key")?,
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(args.addr.clone())
        .map_err(|e| format!("bad --addr: {e}"))?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach the vault at {}: {e}", args.addr))?;
    Ok(TokenServiceClient::new(channel))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A JSON answer.
fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A vault refusal as the page shows it: the field, the reason, the code.
fn refusal(s: &tonic::Status) -> Response {
    let msg = s.message();
    let (field, reason) = match (s.code(), msg.split_once(": ")) {
        (tonic::Code::InvalidArgument, Some((f, r))) => (f, r),
        _ => ("card", msg),
    };
    let status = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_GATEWAY,
    };
    reply(
        status,
        json!({"error": {"code": format!("{:?}", s.code()), "field": field, "reason": reason}}),
    )
}

async fn checkout_page(State(shop): State<Arc<Shop>>, req: Request) -> Response {
    shop.log("GET", req.uri().path(), b"");
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-src {}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        shop.fields_origin
    );
    serve_file(&shop.web.join("demo/checkout.html"), Some(&csp))
}

async fn config(State(shop): State<Arc<Shop>>) -> Response {
    reply(StatusCode::OK, json!({"fields_origin": shop.fields_origin}))
}

async fn create_session(State(shop): State<Arc<Shop>>, body: Bytes) -> Response {
    shop.log("POST", "/session", &body);
    let mut vault = shop.vault.clone();
    match vault
        .create_collect_session(CreateCollectSessionRequest {
            tenant: shop.tenant.clone(),
            ttl_seconds: None,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            reply(
                StatusCode::OK,
                json!({"session_id": r.session_id, "session_key": r.session_key}),
            )
        }
        Err(s) => refusal(&s),
    }
}

async fn pay(State(shop): State<Arc<Shop>>, body: Bytes) -> Response {
    shop.log("POST", "/pay", &body);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": {"field": "request", "reason": "is not JSON"}}),
        );
    };
    let text = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let mut vault = shop.vault.clone();
    match vault
        .tokenize_sealed(TokenizeSealedRequest {
            tenant: shop.tenant.clone(),
            session_id: text("session_id"),
            sealed: text("sealed"),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            reply(
                StatusCode::OK,
                json!({"token": r.token, "brand": r.brand, "last4": r.last4}),
            )
        }
        Err(s) => refusal(&s),
    }
}

async fn shop_file(State(shop): State<Arc<Shop>>, req: Request) -> Response {
    let path = req.uri().path();
    shop.log("GET", path, b"");
    match path {
        "/checkout.js" | "/shop.css" => serve_file(&shop.web.join("demo").join(&path[1..]), None),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The fields origin: the fields page, its scripts and the vendored HPKE
/// library, nothing else.
async fn fields_file(State(shop): State<Arc<Shop>>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    let allowed = matches!(
        path,
        "fields.html" | "fields.js" | "fields.css" | "collect.js"
    ) || (path.starts_with("vendor/") && path.ends_with(".js"))
        || (shop.test_pages && path.starts_with("test/"));
    let safe = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        && !path.contains("..");
    if !allowed || !safe {
        return StatusCode::NOT_FOUND.into_response();
    }
    // Only the fields page may embed into the shop; test pages are never
    // embedded.
    let csp = if path.ends_with(".html") {
        let ancestors = if path.starts_with("test/") {
            "'none'".to_owned()
        } else {
            shop.shop_origin.clone()
        };
        Some(format!(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {ancestors}"
        ))
    } else {
        None
    };
    serve_file(&shop.web.join(path), csp.as_deref())
}

fn serve_file(path: &Path, csp: Option<&str>) -> Response {
    let Ok(bytes) = std::fs::read(path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Some(csp) = csp.and_then(|c| HeaderValue::from_str(c).ok()) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    r
}
