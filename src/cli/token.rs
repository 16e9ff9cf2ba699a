//! `cardvault tokenize | detokenize | metadata | delete`.

use std::io::BufRead;

use clap::{Args, ValueEnum};
use serde_json::json;
use zeroize::Zeroizing;

use super::{ClientOpts, status_text};
use crate::proto;

/// Token format names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// `tok_` + 128 random bits.
    Opaque,
    /// Digits, PAN length, last 4 kept, fails Luhn.
    Fp,
    /// As `fp`, also keeps the first 6 digits.
    FpBin,
}

/// `cardvault tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeCmd {
    /// Tenant.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// Card number. Prefer --pan-stdin: arguments show up in shell history and `ps`.
    #[arg(long, conflicts_with = "pan_stdin")]
    pub pan: Option<String>,
    /// Read the card number from the first line of standard input.
    #[arg(long)]
    pub pan_stdin: bool,
    /// Expiry as MM/YYYY (or MM/YY).
    #[arg(long)]
    pub exp: String,
    /// CVV, held in vault memory only. Prefer --cvv-stdin (see --pan).
    #[arg(long, conflicts_with = "cvv_stdin")]
    pub cvv: Option<String>,
    /// Read the CVV from the next line of standard input (after the card
    /// number's, with --pan-stdin).
    #[arg(long)]
    pub cvv_stdin: bool,
    /// Cardholder name.
    #[arg(long)]
    pub name: Option<String>,
    /// Token format.
    #[arg(long, value_enum, default_value = "opaque")]
    pub format: FormatArg,
    /// Return the existing token if this tenant already has this PAN.
    #[arg(long)]
    pub dedupe: bool,
}

/// `cardvault detokenize`.
#[derive(Debug, Args)]
pub struct DetokenizeCmd {
    /// Tenant.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// The token.
    pub token: String,
    /// Why the card is read (goes to the audit log).
    #[arg(long)]
    pub purpose: String,
    /// Also return (and consume) the held CVV.
    #[arg(long)]
    pub include_cvv: bool,
}

/// `cardvault metadata` and `cardvault delete`.
#[derive(Debug, Args)]
pub struct TokenCmd {
    /// Tenant.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// The token.
    pub token: String,
}

fn parse_exp(exp: &str) -> Result<(u32, u32), String> {
    let (m, y) = exp.split_once('/').ok_or("--exp must look like MM/YYYY")?;
    let m = m
        .trim()
        .parse()
        .map_err(|_| "--exp month is not a number")?;
    let y = y.trim().parse().map_err(|_| "--exp year is not a number")?;
    Ok((m, y))
}

fn timestamp_text(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| t.seconds.to_string())
        .unwrap_or_default()
}

/// Runs `tokenize`; prints the result as JSON.
pub async fn tokenize(opts: &ClientOpts, cmd: TokenizeCmd) -> Result<(), String> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut next_line = || -> Result<Zeroizing<String>, String> {
        let mut line = Zeroizing::new(String::new());
        input.read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(Zeroizing::new(line.trim().to_owned()))
    };
    let pan = match (cmd.pan, cmd.pan_stdin) {
        (Some(p), _) => Zeroizing::new(p),
        (None, true) => next_line()?,
        (None, false) => return Err("give --pan or --pan-stdin".into()),
    };
    let cvv = match (cmd.cvv, cmd.cvv_stdin) {
        (Some(c), _) => Some(c),
        (None, true) => Some(next_line()?.to_string()),
        (None, false) => None,
    };
    let (exp_month, exp_year) = parse_exp(&cmd.exp)?;
    let format = match cmd.format {
        FormatArg::Opaque => proto::TokenFormat::Opaque,
        FormatArg::Fp => proto::TokenFormat::FormatPreserving,
        FormatArg::FpBin => proto::TokenFormat::FormatPreservingKeepBin,
    };
    let mut client = opts.token_client("merchant").await?;
    let r = client
        .tokenize(proto::TokenizeRequest {
            tenant: cmd.tenant,
            pan: pan.to_string(),
            exp_month,
            exp_year,
            cardholder_name: cmd.name,
            cvv,
            format: format as i32,
            dedupe: cmd.dedupe,
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    println!(
        "{}",
        json!({
            "token": r.token, "brand": r.brand, "last4": r.last4, "bin": r.bin,
            "exp_month": r.exp_month, "exp_year": r.exp_year, "fingerprint": r.fingerprint,
            "created_at": timestamp_text(&r.created_at), "existing": r.existing, "cvv_held": r.cvv_held,
        })
    );
    Ok(())
}

/// Runs `detokenize`; prints the card as JSON (this *is* the PAN: the
/// command exists for testing and for processors' tooling).
pub async fn detokenize(opts: &ClientOpts, cmd: DetokenizeCmd) -> Result<(), String> {
    let mut client = opts.token_client("processor").await?;
    let r = client
        .detokenize(proto::DetokenizeRequest {
            tenant: cmd.tenant,
            token: cmd.token,
            purpose: cmd.purpose,
            include_cvv: cmd.include_cvv,
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let cvv_status = proto::CvvStatus::try_from(r.cvv_status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    println!(
        "{}",
        json!({
            "token": r.token, "pan": r.pan, "brand": r.brand, "exp_month": r.exp_month,
            "exp_year": r.exp_year, "cardholder_name": r.cardholder_name, "cvv": r.cvv,
            "cvv_status": cvv_status,
        })
    );
    Ok(())
}

/// Runs `metadata`; prints JSON.
pub async fn metadata(opts: &ClientOpts, cmd: TokenCmd) -> Result<(), String> {
    let mut client = opts.token_client("merchant").await?;
    let r = client
        .get_metadata(proto::GetMetadataRequest {
            tenant: cmd.tenant,
            token: cmd.token,
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    println!(
        "{}",
        json!({
            "token": r.token, "brand": r.brand, "last4": r.last4, "bin": r.bin,
            "exp_month": r.exp_month, "exp_year": r.exp_year, "fingerprint": r.fingerprint,
            "created_at": timestamp_text(&r.created_at), "cvv_held": r.cvv_held, "key_version": r.key_version,
        })
    );
    Ok(())
}

/// Runs `delete`; prints JSON.
pub async fn delete(opts: &ClientOpts, cmd: TokenCmd) -> Result<(), String> {
    let mut client = opts.token_client("merchant").await?;
    let r = client
        .delete_token(proto::DeleteTokenRequest {
            tenant: cmd.tenant,
            token: cmd.token,
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    println!("{}", json!({ "deleted": r.deleted }));
    Ok(())
}
