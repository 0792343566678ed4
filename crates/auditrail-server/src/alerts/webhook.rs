//! Delivery of alerts to webhooks: a JSON body signed with HMAC-SHA256, retried with
//! exponential backoff; every attempt's outcome is kept on the alert.
//!
//! The receiver checks `X-Auditrail-Signature: sha256=<hex>` against
//! `HMAC-SHA256(secret, "<X-Auditrail-Timestamp>.<body>")` and rejects old timestamps, so a
//! captured request can be neither forged nor replayed later.

use super::{Alert, Alerts, WebhookConfig};
use hmac::{KeyInit, Mac};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The signature header's value for `body` sent at `timestamp` (seconds since the epoch).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", super::hex(&digest))
}

/// What a webhook receives for an alert.
pub fn body(alert: &Alert, origin: &str) -> Vec<u8> {
    let mut alert = serde_json::to_value(alert).unwrap_or_default();
    if let Some(a) = alert.as_object_mut() {
        a.remove("deliveries");
    }
    serde_json::to_vec(&json!({"type": "alert", "log": origin, "alert": alert})).unwrap_or_default()
}

async fn send(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    body: Vec<u8>,
    id: &str,
) -> Result<(), String> {
    let timestamp = crate::now_ms() / 1000;
    let response = client
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("x-auditrail-timestamp", timestamp.to_string())
        .header("x-auditrail-signature", signature(&hook.secret, timestamp, &body))
        .header("x-auditrail-alert-id", id)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{}: {}", hook.name, describe(e.without_url())))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{}: answered HTTP {}", hook.name, status.as_u16()))
    }
}

/// A transport error and its causes (the URL left out: it may carry credentials).
fn describe(e: reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Sends what is due until `stop` resolves.
pub async fn deliver(state: Arc<crate::AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    if state.alerts.config().webhooks.is_empty() {
        return;
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("auditrail: alerts: cannot build the webhook client: {e}");
            return;
        }
    };
    let origin = state.config.origin.clone();
    loop {
        let alerts: &Alerts = &state.alerts;
        for (alert, hook) in alerts.due_deliveries(crate::now_ms()) {
            let hook = &alerts.config().webhooks[hook];
            let result = send(&client, hook, body(&alert, &origin), &alert.id).await;
            if let Err(e) = &result {
                eprintln!("auditrail: alerts: delivery of {} failed: {e}", alert.id);
            }
            alerts.delivered(&alert.id, &hook.name, result, crate::now_ms());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // From openssl: printf '1700000000.{}' | openssl dgst -sha256 -hmac 'a-secret-of-16-chars'
        assert_eq!(
            super::signature("a-secret-of-16-chars", 1_700_000_000, b"{}"),
            "sha256=00f65c9cbace71d62f0d6d0b3f2f1d97febd1ee13637b07b6a76c1d5b9370288"
        );
    }
}
