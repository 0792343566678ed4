//! The Elasticsearch / OpenSearch destination: an index template installed once at start
//! (`PUT _index_template/<template>`, idempotent) and the fields added since mapping version 1
//! put on the index if it exists, then `_bulk` requests of `index` actions with `_id` =
//! the event's `id`, so sending an event twice leaves one document.
//!
//! Per-item answers decide each event's fate: 2xx delivered; 429 and 5xx retried after a
//! backoff; any other status (a mapping error, say) refused for good, reported with its seq
//! and skipped. A whole request that fails (connection refused, timeout, 5xx, 401) is retried
//! whole. A 413 splits the request in halves; a single event still too large is refused.

use crate::config::ElasticsearchConfig;
use crate::limits::RESPONSE_BYTES_MAX;
use crate::runner::Delivery;
use crate::{FailedEvent, ForwardError, LogEvent};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

pub struct Elasticsearch {
    client: reqwest::Client,
    url: String,
    index: String,
    template: String,
    auth: Auth,
    template_installed: bool,
}

enum Auth {
    None,
    Basic(String, String),
    ApiKey(String),
}

/// The index template: the mapping of `schema/event.schema.json`. Unknown top-level fields
/// are refused (`strict`); `fhir` (the resource as received), `context` (free-form keys) and
/// the `before`/`after` values of `changes` (any JSON) are kept in `_source` but not indexed,
/// so an event can never grow the mapping.
pub fn index_template(index: &str) -> Value {
    let kw = || json!({"type": "keyword"});
    let long_kw = || json!({"type": "keyword", "ignore_above": 1024});
    json!({
        "index_patterns": [index],
        "priority": 500,
        "_meta": {"managed_by": "auditrail", "mapping_version": 2},
        "template": {
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "seq": {"type": "long"},
                    "id": kw(),
                    "recorded_at": {"type": "date"},
                    "occurred_at": {"type": "date"},
                    "category": kw(),
                    "action": kw(),
                    "outcome": kw(),
                    "outcome_code": {"type": "short"},
                    "outcome_desc": {"type": "text"},
                    "actor": {"properties": {
                        "user_id": kw(), "name": kw(), "roles": kw(), "client_id": kw(),
                        "session_id": kw(), "ip": {"type": "ip"}, "user_agent": long_kw(),
                        "device_id": kw(),
                    }},
                    "source": {"properties": {"system": kw(), "site": kw(), "type": kw()}},
                    "patient": {"properties": {"id": kw(), "system": kw()}},
                    "entities": {"type": "nested", "properties": {
                        "type": kw(), "id": kw(), "role": kw(), "system": kw(), "name": kw(),
                    }},
                    "request": {"properties": {
                        "method": kw(), "path": long_kw(), "query": long_kw(),
                        "status": {"type": "short"},
                    }},
                    "purpose_of_use": kw(),
                    "project": kw(),
                    "changes": {"type": "object", "dynamic": false, "properties": {"field": kw()}},
                    "context": {"type": "object", "dynamic": false},
                    "fhir": {"type": "object", "enabled": false},
                    "redactions": redactions_mapping(),
                }
            }
        }
    })
}

/// `redactions` (the privacy filter's record, mapped since version 2). An index created under
/// version 1 lacks it and, being `strict`, would refuse every event carrying it, so it is put
/// on the existing index at start too.
fn redactions_mapping() -> Value {
    json!({"properties": {"rule": {"type": "keyword"}, "field": {"type": "keyword"}}})
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Deserialize)]
struct BulkAnswer {
    #[serde(default)]
    items: Vec<std::collections::HashMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<Value>,
}

fn reason(error: &Option<Value>) -> String {
    match error {
        Some(Value::Object(e)) => {
            let kind = e.get("type").and_then(Value::as_str).unwrap_or("error");
            let why = e.get("reason").and_then(Value::as_str).unwrap_or("");
            format!("{kind}: {why}")
        }
        Some(other) => other.to_string(),
        None => "no reason given".into(),
    }
}

/// Whether a status means "try again later" rather than "never".
fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

impl Elasticsearch {
    pub fn new(config: &ElasticsearchConfig) -> Result<Elasticsearch, ForwardError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(10_000)))
            .user_agent(concat!("auditrail/", env!("CARGO_PKG_VERSION")));
        if config.url.starts_with("https://") {
            let tls = crate::tls::client_config(config.ca_file.as_deref(), None)?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let client = builder
            .build()
            .map_err(|e| ForwardError::config("forward.elasticsearch", e.to_string()))?;
        let auth = if !config.api_key.0.is_empty() {
            Auth::ApiKey(config.api_key.0.clone())
        } else if !config.username.is_empty() {
            Auth::Basic(config.username.clone(), config.password.0.clone())
        } else {
            Auth::None
        };
        Ok(Elasticsearch {
            client,
            url: config.url.trim_end_matches('/').to_string(),
            index: config.index.clone(),
            template: config.template.clone(),
            auth,
            template_installed: false,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}/{path}", self.url));
        match &self.auth {
            Auth::None => r,
            Auth::Basic(user, password) => r.basic_auth(user, Some(password)),
            Auth::ApiKey(key) => r.header(reqwest::header::AUTHORIZATION, format!("ApiKey {key}")),
        }
    }

    /// Sends `request`, returning the status and at most [`RESPONSE_BYTES_MAX`] of the body.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(u16, Vec<u8>), ForwardError> {
        let unavailable = |e: reqwest::Error| {
            // reqwest's messages omit the cause ("error sending request"): add the chain.
            let mut message = format!("{what} at {}: {e}", self.url);
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            ForwardError::Unavailable(message)
        };
        let mut response = request.send().await.map_err(unavailable)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                return Err(ForwardError::Unavailable(format!(
                    "{what}: the answer exceeds {RESPONSE_BYTES_MAX} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    /// Installs (or replaces) the index template; idempotent.
    pub async fn install_template(&mut self) -> Result<(), ForwardError> {
        let request = self
            .request(reqwest::Method::PUT, &format!("_index_template/{}", self.template))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(index_template(&self.index).to_string());
        let (status, body) = self.call(request, "installing the index template").await?;
        if !(200..300).contains(&status) {
            return Err(ForwardError::Unavailable(format!(
                "installing the index template {}: HTTP {status}: {}",
                self.template,
                crate::status::truncate(String::from_utf8_lossy(&body).into_owned(), 512)
            )));
        }
        // A new property may be added to an existing strict mapping; 404: no index yet, and
        // the template will create it complete.
        let request = self
            .request(reqwest::Method::PUT, &format!("{}/_mapping", self.index))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"properties": {"redactions": redactions_mapping()}}).to_string());
        let (status, body) = self.call(request, "adding fields to the index mapping").await?;
        if !(200..300).contains(&status) && status != 404 {
            return Err(ForwardError::Unavailable(format!(
                "adding fields to the mapping of {}: HTTP {status}: {}",
                self.index,
                crate::status::truncate(String::from_utf8_lossy(&body).into_owned(), 512)
            )));
        }
        self.template_installed = true;
        Ok(())
    }

    /// Delivers `events` through `_bulk`; see the module documentation for each outcome.
    pub(crate) async fn send(&mut self, events: &[&LogEvent]) -> Result<Delivery, ForwardError> {
        if !self.template_installed {
            self.install_template().await?;
        }
        let mut delivery = Delivery::default();
        // Ranges still to send; a 413 splits one into halves.
        let mut ranges = vec![(0, events.len())];
        while let Some((lo, hi)) = ranges.pop() {
            let part = &events[lo..hi];
            let mut body = Vec::with_capacity(part.iter().map(|e| e.canonical.len() + 80).sum());
            // (position in `events`, `_id`) of each action in the body, in order.
            let mut sent: Vec<(usize, String)> = Vec::with_capacity(part.len());
            for (k, e) in part.iter().enumerate() {
                // Every stored event has an id; one without could never be indexed, so it is
                // refused (status 0) rather than retried forever.
                let id = match serde_json::from_slice::<IdOnly>(&e.canonical) {
                    Ok(v) => v.id,
                    Err(err) => {
                        delivery.failed.push(FailedEvent {
                            seq: e.seq,
                            id: String::new(),
                            status: 0,
                            reason: format!("the stored event has no id: {err}"),
                        });
                        continue;
                    }
                };
                let action = json!({"index": {"_index": self.index, "_id": id}});
                serde_json::to_writer(&mut body, &action).expect("a JSON value serialises");
                body.push(b'\n');
                body.extend_from_slice(&e.canonical);
                body.push(b'\n');
                sent.push((lo + k, id));
            }
            if sent.is_empty() {
                continue;
            }
            let request = self
                .request(reqwest::Method::POST, "_bulk")
                .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                .body(body);
            let all = sent.iter().map(|(at, _)| *at);
            let (status, answer) = match self.call(request, "_bulk").await {
                Ok(a) => a,
                Err(e) => {
                    delivery.retry.extend(all);
                    delivery.error = Some(e.to_string());
                    continue;
                }
            };
            if status == 413 && part.len() > 1 {
                let mid = lo + part.len() / 2;
                ranges.push((mid, hi));
                ranges.push((lo, mid));
                continue;
            }
            if status == 413 {
                let (at, id) = &sent[0];
                delivery.failed.push(FailedEvent {
                    seq: events[*at].seq,
                    id: id.clone(),
                    status,
                    reason: "the event alone exceeds the cluster's http.max_content_length".into(),
                });
                continue;
            }
            if !(200..300).contains(&status) {
                delivery.retry.extend(all);
                delivery.error = Some(format!(
                    "_bulk: HTTP {status}: {}",
                    crate::status::truncate(String::from_utf8_lossy(&answer).into_owned(), 512)
                ));
                continue;
            }
            let parsed: Result<BulkAnswer, _> = serde_json::from_slice(&answer);
            let items = match parsed {
                Ok(a) if a.items.len() == sent.len() => a.items,
                Ok(a) => {
                    delivery.retry.extend(all);
                    delivery.error = Some(format!(
                        "_bulk answered {} items for {} actions",
                        a.items.len(),
                        sent.len()
                    ));
                    continue;
                }
                Err(e) => {
                    delivery.retry.extend(all);
                    delivery.error = Some(format!("_bulk answer is not a bulk response: {e}"));
                    continue;
                }
            };
            for ((at, id), item) in sent.into_iter().zip(items) {
                let Some(item) = item.into_values().next() else {
                    delivery.retry.push(at);
                    delivery.error = Some("_bulk answered an empty item".into());
                    continue;
                };
                if (200..300).contains(&item.status) {
                    continue;
                }
                if retryable(item.status) {
                    delivery.retry.push(at);
                    delivery.error = Some(format!("HTTP {}: {}", item.status, reason(&item.error)));
                } else {
                    delivery.failed.push(FailedEvent {
                        seq: events[at].seq,
                        id,
                        status: item.status,
                        reason: reason(&item.error),
                    });
                }
            }
        }
        delivery.retry.sort_unstable();
        delivery.failed.sort_by_key(|f| f.seq);
        // A split after a 413 may refuse an unsendable event twice.
        delivery.failed.dedup_by_key(|f| f.seq);
        Ok(delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_maps_every_field_of_the_schema() {
        let schema: Value =
            serde_json::from_str(include_str!("../../../schema/event.schema.json")).unwrap();
        let template = index_template("audit");
        let mapped = &template["template"]["mappings"]["properties"];
        for (name, field) in schema["properties"].as_object().unwrap() {
            assert!(mapped.get(name).is_some(), "{name} is not in the mapping");
            // Objects with a closed set of fields map each of them.
            let nested = field.get("properties").or_else(|| field["items"].get("properties"));
            if let (Some(nested), Some(false)) = (
                nested,
                field
                    .get("additionalProperties")
                    .or_else(|| field["items"].get("additionalProperties"))
                    .and_then(Value::as_bool),
            ) {
                if name == "changes" {
                    continue;
                }
                for sub in nested.as_object().unwrap().keys() {
                    assert!(
                        mapped[name]["properties"].get(sub).is_some(),
                        "{name}.{sub} is not in the mapping"
                    );
                }
            }
        }
        for name in ["seq", "recorded_at", "redactions"] {
            assert!(mapped.get(name).is_some(), "{name} is not in the mapping");
        }
        assert_eq!(mapped["actor"]["properties"]["ip"]["type"], "ip");
        assert_eq!(mapped["occurred_at"]["type"], "date");
        assert_eq!(template["template"]["mappings"]["dynamic"], "strict");
    }
}
