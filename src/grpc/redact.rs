//! Hand-written `Debug` for generated messages that carry a PAN, CVV or
//! name. prost's derived `Debug` prints every field, so `build.rs` turns it
//! off for these types and this module prints masks instead: a stray
//! `{:?}` in a log line or a test failure cannot leak a card.

use std::fmt;

use crate::proto::{
    DetokenizeBatchResponse, DetokenizeBatchResult, DetokenizeResponse, InitResponse,
    SubmitRekeyShareRequest, TokenizeBatchItem, TokenizeBatchRequest, TokenizeRequest,
    UnsealRequest, detokenize_batch_result,
};

/// A field's presence, never its value.
fn secret(s: &str) -> &'static str {
    if s.is_empty() {
        "<empty>"
    } else {
        "<redacted>"
    }
}

fn opt_secret(s: &Option<String>) -> &'static str {
    match s {
        None => "<none>",
        Some(s) => secret(s),
    }
}

impl fmt::Debug for TokenizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizeRequest")
            .field("tenant", &self.tenant)
            .field("pan", &secret(&self.pan))
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cardholder_name", &opt_secret(&self.cardholder_name))
            .field("cvv", &opt_secret(&self.cvv))
            .field("format", &self.format)
            .field("dedupe", &self.dedupe)
            .finish()
    }
}

impl fmt::Debug for TokenizeBatchItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizeBatchItem")
            .field("reference", &self.reference)
            .field("pan", &secret(&self.pan))
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cardholder_name", &opt_secret(&self.cardholder_name))
            .field("cvv", &opt_secret(&self.cvv))
            .finish()
    }
}

impl fmt::Debug for TokenizeBatchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizeBatchRequest")
            .field("tenant", &self.tenant)
            .field("items", &self.items)
            .field("format", &self.format)
            .field("dedupe", &self.dedupe)
            .finish()
    }
}

impl fmt::Debug for DetokenizeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeResponse")
            .field("token", &self.token)
            .field("pan", &secret(&self.pan))
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cardholder_name", &secret(&self.cardholder_name))
            .field("cvv", &opt_secret(&self.cvv))
            .field("cvv_status", &self.cvv_status)
            .field("brand", &self.brand)
            .finish()
    }
}

impl fmt::Debug for DetokenizeBatchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeBatchResult")
            .field("reference", &self.reference)
            .field("result", &self.result)
            .finish()
    }
}

impl fmt::Debug for detokenize_batch_result::Result {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok(r) => f.debug_tuple("Ok").field(r).finish(),
            Self::Error(e) => f.debug_tuple("Error").field(e).finish(),
        }
    }
}

impl fmt::Debug for DetokenizeBatchResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeBatchResponse")
            .field("results", &self.results)
            .finish()
    }
}

impl fmt::Debug for InitResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The shares are encrypted to their custodians; their count is
        // enough for a log line.
        f.debug_struct("InitResponse")
            .field("shares", &format_args!("<{} encrypted>", self.shares.len()))
            .field("threshold", &self.threshold)
            .field("key_generation", &self.key_generation)
            .finish()
    }
}

impl fmt::Debug for SubmitRekeyShareRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitRekeyShareRequest")
            .field("nonce", &self.nonce)
            .field("share", &secret(&self.share))
            .finish()
    }
}

impl fmt::Debug for UnsealRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealRequest")
            .field("share", &secret(&self.share))
            .field("reset", &self.reset)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secrets() {
        let req = TokenizeRequest {
            tenant: "demo".into(),
            pan: "4111111111111111".into(),
            cvv: Some("737".into()),
            cardholder_name: Some("Ada Lovelace".into()),
            ..Default::default()
        };
        let batch = TokenizeBatchRequest {
            items: vec![TokenizeBatchItem {
                pan: "4111111111111111".into(),
                cvv: Some("737".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let resp = DetokenizeBatchResponse {
            results: vec![DetokenizeBatchResult {
                reference: "r".into(),
                result: Some(detokenize_batch_result::Result::Ok(DetokenizeResponse {
                    pan: "4111111111111111".into(),
                    cvv: Some("737".into()),
                    cardholder_name: "Ada Lovelace".into(),
                    ..Default::default()
                })),
            }],
        };
        for text in [
            format!("{req:?}"),
            format!("{batch:?}"),
            format!("{resp:?}"),
        ] {
            assert!(!text.contains("4111"), "{text}");
            assert!(!text.contains("737"), "{text}");
            assert!(!text.contains("Lovelace"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
}
